"""Where a scattered in-process sync's time goes right after a model load.

A model of ``--gb`` GB (bf16, 64 tensors, ``--shards`` shards) on ``--device``.
Each round changes one element in ``--fraction`` of its 4 KiB blocks and times a
dry run and a logged sync of that change, printing the stages each reports
(``SyncResult.stages``), with the shards' page cache in two states:

* ``cold``: as a model load leaves it (flushed, dropped, then read once,
  sequentially: readahead's large folios), before each of the two;
* ``warm``: the same, then read once more before each.

and the page-cache read rate of a second and a third pass over a loaded cache.

    python benches/probes/after_restore.py --device cuda --gb 6 --dir /tmp/ar
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import apollo_sync
import e2e  # benches/ is not a package
import gpu
from apollo_sync.journal import Layout, wait_flushes


def loaded(paths: list[Path]) -> None:
    """The cache a model load leaves: written back, dropped, read in order."""
    wait_flushes(Layout(paths[0].parent))
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    e2e.drop_cache(paths)
    gpu.read_parallel(paths, os.cpu_count() or 1)


def stages(r: apollo_sync.SyncResult) -> str:
    return json.dumps({k: round(v, 4) for k, v in r.stages.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="NAME=VALUE set for every other round's syncs (A/B in one process)",
    )
    ap.add_argument("--dir", type=Path, default=Path("/tmp/apollo-after-restore"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    n_t = 64
    per = int(args.gb * 1e9 / 2 / n_t) // 2048 * 2048
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(n_t)]
    per_shard = -(-n_t // args.shards)
    live = {}
    for s in range(args.shards):
        part = {
            k: (torch.randn(per // 2048, 2048, generator=g) * 0.02).to(torch.bfloat16)
            for k in names[s * per_shard : (s + 1) * per_shard]
        }
        save_file(part, str(args.dir / f"model-{s:05d}.safetensors"))
        live.update({k: v.to(args.device) for k, v in part.items()})
    paths = sorted(args.dir.glob("*.safetensors"))
    apollo_sync.sync(args.dir, live)  # the log directory made
    blocks = sum(t.numel() for t in live.values()) // 2048
    size = sum(t.numel() * 2 for t in live.values()) / 1e9
    print(
        f"{size:.2f} GB on {args.device}, {len(paths)} shards, {blocks} blocks, "
        f"{args.fraction:.2%} changed a round; A/B env: {args.env or 'none'}",
        flush=True,
    )
    extra = dict(e.split("=", 1) for e in args.env)
    threads = os.cpu_count() or 1

    def perturb() -> None:
        for t in live.values():
            flat = t.view(-1)
            k = max(1, int(flat.numel() // 2048 * args.fraction))
            idx = torch.randperm(flat.numel() // 2048, device=t.device)[:k] * 2048
            flat[idx] = flat[idx] + 0.01
        if args.device != "cpu":
            torch.cuda.synchronize()

    for r in range(args.rounds * (2 if extra else 1)):
        variant = "B" if extra and r % 2 else "A"
        for k, v in extra.items():
            if variant == "B":
                os.environ[k] = v
            else:
                os.environ.pop(k, None)
        for state in ("cold", "warm"):
            perturb()
            loaded(paths)
            if state == "warm":
                gpu.read_parallel(paths, threads)
            t0 = time.perf_counter()
            dry = apollo_sync.sync(args.dir, live, dry_run=True)
            dry_s = time.perf_counter() - t0
            loaded(paths)
            if state == "warm":
                gpu.read_parallel(paths, threads)
            t0 = time.perf_counter()
            res = apollo_sync.sync(args.dir, live)
            sync_s = time.perf_counter() - t0
            print(
                f"round {r}{f' ({variant})' if extra else ''}, {state}: dry run {dry_s:.3f} s, "
                f"sync {sync_s:.3f} s ({res.total_changed / 1e6:.1f} MB changed, "
                f"log {res.log_bytes / 1e3:.0f} KB), sync/dry {sync_s / dry_s:.2f}\n"
                f"  dry  {stages(dry)}\n  sync {stages(res)}",
                flush=True,
            )
        loaded(paths)
        second = gpu.read_parallel(paths, threads)
        third = gpu.read_parallel(paths, threads)
        print(f"  page-cache read, {threads} threads: 2nd pass {second:.1f} GB/s, 3rd {third:.1f}")


if __name__ == "__main__":
    main()
