"""Where the fixed cost of a small in-process sync goes.

A model of ``--gb`` GB (bf16, 64 tensors, a shard per ``--shard-gb``) on ``--device``;
each round changes ``--fraction`` of its 4 KiB blocks (one element each),
then times a dry run and a logged sync, and profiles one sync with cProfile
(what Python waits in: the feed, ``finish``, the commit, ``state.json``).

    python benches/probes/fixed_cost.py --device cuda --gb 6 --dir /tmp/fc
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import apollo_sync
from apollo_sync.journal import Layout, wait_flushes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/apollo-fixed-cost"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    n_t = 64
    per = int(args.gb * 1e9 / 2 / n_t) // 2048 * 2048
    g = torch.Generator().manual_seed(0)
    cpu = {
        f"model.layers.{i}.mlp.down_proj.weight": (
            torch.randn(per // 2048, 2048, generator=g) * 0.02
        ).to(torch.bfloat16)
        for i in range(n_t)
    }
    per_shard = max(1, int(args.shard_gb * 1e9 // (per * 2)))
    names = list(cpu)
    for s in range(0, n_t, per_shard):
        part = {k: cpu[k] for k in names[s : s + per_shard]}
        save_file(part, str(args.dir / f"model-{s // per_shard:05d}.safetensors"))
    live = {k: v.to(args.device) for k, v in cpu.items()}
    del cpu
    apollo_sync.sync(args.dir, live)  # the first sync: the log directory made
    blocks = sum(t.numel() for t in live.values()) // 2048
    size = sum(t.numel() * 2 for t in live.values()) / 1e9
    print(f"{size:.2f} GB on {args.device}, {blocks} blocks, {args.fraction:.2%} changed a round")
    for r in range(args.rounds):
        for t in live.values():
            flat = t.view(-1)
            k = max(1, int(flat.numel() // 2048 * args.fraction))
            idx = torch.randperm(flat.numel() // 2048, device=t.device)[:k] * 2048
            flat[idx] = flat[idx] + 0.01
        if args.device != "cpu":
            torch.cuda.synchronize()
        wait_flushes(Layout(args.dir))
        time.sleep(0.2)
        t0 = time.perf_counter()
        apollo_sync.sync(args.dir, live, dry_run=True)
        t1 = time.perf_counter()
        prof = cProfile.Profile() if r == args.rounds - 1 else None
        if prof:
            prof.enable()
        res = apollo_sync.sync(args.dir, live)
        t2 = time.perf_counter()
        if prof:
            prof.disable()
        print(
            f"round {r}: dry run {t1 - t0:.3f} s, sync {t2 - t1:.3f} s "
            f"({res.total_changed / 1e6:.1f} MB changed, log {res.log_bytes / 1e3:.0f} KB), "
            f"sync/dry {(t2 - t1) / (t1 - t0):.2f}"
        )
    assert prof is not None
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


if __name__ == "__main__":
    main()
