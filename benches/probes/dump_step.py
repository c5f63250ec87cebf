"""Dumps one real optimizer step of ``benches/train.py``'s model as two raw files:
the bytes of every trained matrix before the step (``OUT.old``) and after it
(``OUT.new``), concatenated in parameter order. They are the input of the
codec's measurement on real data:

    python benches/probes/dump_step.py adamw 1e-5 /tmp/adamw
    cargo run --release -p apollo_sync_core --example codec_files -- /tmp/adamw.old /tmp/adamw.new

``--size-gb`` (default 0.15) picks the model's size as ``train.py`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("optimizer", choices=sorted(train.OPTIMIZERS))
    ap.add_argument("lr", type=float)
    ap.add_argument("out", help="prefix of the two files written")
    ap.add_argument("--size-gb", type=float, default=0.15)
    a = ap.parse_args()
    argv = ["--size-gb", str(a.size_gb), "--steps", "1"]
    args = train.parse_args([*argv, "--optimizers", a.optimizer, "--lr", str(a.lr)])
    model = train.build_model(args, train.pick_layers(args))
    optimizer = train.OPTIMIZERS[a.optimizer](model, a.lr, args)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    train.train_step(model, optimizer, args, gen)
    new = dict(model.named_parameters())
    o = torch.cat([old[n].reshape(-1) for n in old]).view(torch.uint8).numpy()
    w = torch.cat([new[n].detach().reshape(-1) for n in old]).view(torch.uint8).numpy()
    o.tofile(a.out + ".old")
    w.tofile(a.out + ".new")
    changed = (o.view(np.uint16) != w.view(np.uint16)).mean()
    print(f"{a.optimizer} lr {a.lr}: {o.nbytes / 1e6:.0f} MB, {changed:.2%} of elements changed")


if __name__ == "__main__":
    main()
