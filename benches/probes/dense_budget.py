"""Where a logged sync's time goes on a step that changes every block: the
floor, a page-cache write of every byte, a dry run, a sync without a log and a
logged sync, each from the same files, in one process.

``benches/train.py`` builds its Qwen3-style model (``--size-gb``), saves it,
takes one step of ``--optimizer`` at ``--lr``, and keeps the model's new
tensors. Then ``--rounds`` times, each contender on a fresh copy of the saved
directory (page-cached, written back, an unchanged sync already made so the
log exists):

* **floor**: ``train.Floor``'s pass (the file's bytes read, XORed with the live
  bytes; the issue's floor);
* **write pass**: every byte of the shards ``pwrite``-n over a page-cached,
  written-back copy of them (what rewriting every changed block costs the
  kernel at least, whatever the engine does);
* **dry run**: ``sync(dry_run=True)`` (compare only);
* **no log**: ``sync(journal=False)`` (compare, then write the changed blocks);
* **logged**: ``sync()`` (compare, encode the deltas, append and make the log
  durable, write the blocks): what ``train.py`` times.

Wall and process CPU seconds of each, and each wall as a multiple of the
floor: "logged" minus "no log" is what encoding and logging the deltas cost,
"no log" minus "write pass" what the compare adds to the writes.

    python benches/probes/dense_budget.py --size-gb 0.6 --optimizer adamw --lr 1e-5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import apollo_sync
import e2e  # benches/ is not a package
import train
from apollo_sync.journal import Layout, wait_flushes

PIECE = 8 << 20


def write_pass(src: list[Path], scratch: Path, threads: int) -> tuple[float, float]:
    """Writes the bytes of ``src`` over a page-cached, written-back copy of
    them (``scratch``): an overwrite of cached pages, as a sync makes."""
    data = [p.read_bytes() for p in src]
    with open(scratch, "wb") as f:
        for d in data:
            f.write(d)
        f.flush()
        os.fsync(f.fileno())
    scratch.read_bytes()
    fd = os.open(scratch, os.O_RDWR)
    try:
        pieces, at = [], 0
        for d in data:
            view = memoryview(d)
            pieces += [(view[o : o + PIECE], at + o) for o in range(0, len(d), PIECE)]
            at += len(d)
        t = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: os.pwrite(fd, p[0], p[1]), pieces))
        return time.perf_counter() - t[0], time.process_time() - t[1]
    finally:
        os.close(fd)
        os.unlink(scratch)  # before writeback: the disk need not see it


class AnonPeak(threading.Thread):
    """Samples this process's ``RssAnon`` every 2 ms while in its ``with``:
    ``added_kb`` is the peak above the level at its start."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = self.peak = e2e.rss_anon_kb(os.getpid())
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, e2e.rss_anon_kb(os.getpid()))

    def __enter__(self) -> AnonPeak:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()
        self.peak = max(self.peak, e2e.rss_anon_kb(os.getpid()))

    @property
    def added_kb(self) -> int:
        return self.peak - self.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=0.6)
    ap.add_argument("--optimizer", default="adamw", choices=sorted(train.OPTIMIZERS))
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/apollo-dense-budget"))
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    shutil.rmtree(args.dir, ignore_errors=True)
    base, work = args.dir / "base", args.dir / "work"
    live, _ = train.one_step_saved(base, args.size_gb, args.optimizer, args.lr)
    shards = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)

    def fresh() -> None:
        train.fresh_copy(base, work)

    def timed(fn: Callable[..., Any], *a: Any, **k: Any) -> tuple[float, float, Any]:
        t = time.perf_counter(), time.process_time()
        out = fn(*a, **k)
        return time.perf_counter() - t[0], time.process_time() - t[1], out

    rows: dict[str, list[tuple[float, float]]] = {}
    anon_added: list[int] = []

    def record(name: str, wall: float, cpu: float) -> None:
        rows.setdefault(name, []).append((wall, cpu))

    for _ in range(args.rounds):
        fresh()
        floor = train.Floor(work, torch.device("cpu"), threads)
        floor._pass(live, count=False)  # threads and buffers warm
        record("floor", *timed(floor._pass, live, count=False)[:2])
        counted = floor._pass(live, count=True)
        floor.close()
        record("write pass", *write_pass(shards, work / "scratch.bin", threads))
        record(
            "dry run", *timed(apollo_sync.sync, work, live, dry_run=True, threads=args.threads)[:2]
        )
        record(
            "no log", *timed(apollo_sync.sync, work, live, journal=False, threads=args.threads)[:2]
        )
        wait_flushes(Layout(work))
        fresh()
        with AnonPeak() as anon:
            wall, cpu, result = timed(apollo_sync.sync, work, live, threads=args.threads)
        record("logged", wall, cpu)
        anon_added.append(anon.added_kb)
        wait_flushes(Layout(work))
    print(
        f"{size / 1e9:.2f} GB, {args.optimizer} lr {args.lr:g}, one step: "
        f"{counted.elements_changed / counted.elements:.2%} of elements, "
        f"{counted.blocks_changed / counted.blocks:.2%} of 4 KiB blocks, "
        f"{result.total_changed / 1e6:.0f} MB of blocks changed, "
        f"log {result.log_bytes / 1e6:.1f} MB ({result.log_bytes / size:.1%}); "
        f"{threads} threads; median of {args.rounds}"
    )
    floor_s = statistics.median(w for w, _ in rows["floor"])
    print(f"{'':12} {'wall s':>8} {'cpu s':>8} {'x floor':>8}   walls (s)")
    for name, vals in rows.items():
        w = statistics.median(v[0] for v in vals)
        c = statistics.median(v[1] for v in vals)
        every = " ".join(f"{v[0]:.3f}" for v in vals)
        print(f"{name:12} {w:8.3f} {c:8.3f} {w / floor_s:8.2f}   {every}")
    print(
        "anonymous memory the logged syncs added at their peak (RssAnon, sampled every "
        f"2 ms): {', '.join(f'{kb / 1024:.0f}' for kb in anon_added)} MiB"
    )
    stages = getattr(result, "stages", {})  # an older wheel's result has none
    if stages:
        every = ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
        print(f"last logged sync, stages (s): {every}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
