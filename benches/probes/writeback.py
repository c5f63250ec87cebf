"""What starting the writeback behind the in-place writes does to a logged
sync on a step that changes every block: its time, the time until the shards
are durable, and the kernel's dirty pages at their peak.

``benches/train.py`` builds its Qwen3-style model (``--size-gb``, on
``--device``), saves it, takes one step of ``--optimizer`` at ``--lr``, and
keeps the model's new tensors. Then ``--rounds`` times, alternating, on a fresh
copy of the saved directory (page-cached and written back, as after a load), a
logged sync with the writeback started during the sync, every
``_core.WRITEBACK_BYTES`` of a shard (**during**), and left to the flush after
the commit (**at flush**), each plain and ``durable=True``. ``sync()`` starts
it during a durable sync only; this probe forces each setting on both.

* **sync**: until ``sync()`` returns (and the process CPU seconds meanwhile);
* **to durable**: until the background flush of the generation is done too;
* **Dirty peak**: the most ``Dirty:`` of ``/proc/meminfo``, read every 10 ms
  by another process (so that the sampling takes no time from the sync's).

    python benches/probes/writeback.py --size-gb 0.6 --rounds 4
    python benches/probes/writeback.py --size-gb 5.5 --device cuda --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import apollo_sync
import train
from apollo_sync import _core
from apollo_sync.journal import Layout, wait_flushes

SYNC_MODULE = sys.modules["apollo_sync.sync"]  # `apollo_sync.sync` is the function

SAMPLER = """
import sys, time
peak = 0
while sys.stdin.readline().strip() == "go":
    peak = 0
    while True:
        for line in open("/proc/meminfo"):
            if line.startswith("Dirty:"):
                peak = max(peak, int(line.split()[1]))
        import select
        if select.select([sys.stdin], [], [], 0.01)[0]:
            sys.stdin.readline()
            break
    print(peak, flush=True)
"""


class DirtyPeak:
    """A process that samples ``Dirty:`` between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SAMPLER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        time.sleep(0.05)

    def stop(self) -> int:
        """The peak in MiB."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()) >> 10

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=0.6)
    ap.add_argument("--optimizer", default="adamw", choices=sorted(train.OPTIMIZERS))
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/apollo-writeback"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    base, work = args.dir / "base", args.dir / "work"
    live, _ = train.one_step_saved(base, args.size_gb, args.optimizer, args.lr, args.device)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))

    rows: dict[tuple[str, bool], list[tuple[float, float, int, float]]] = {}
    sampler = DirtyPeak()
    real = _core.Syncer
    try:
        for _ in range(args.rounds):
            for setting, every in (("during", _core.WRITEBACK_BYTES), ("at flush", 0)):
                for durable in (False, True):
                    SYNC_MODULE.Syncer = lambda *a, _every=every, **k: real(
                        *a, **{**k, "writeback_bytes": _every}
                    )
                    train.fresh_copy(base, work)
                    sampler.start()
                    t, c = time.perf_counter(), time.process_time()
                    result = apollo_sync.sync(work, live, durable=durable)
                    wall, cpu = time.perf_counter() - t, time.process_time() - c
                    wait_flushes(Layout(work))
                    to_durable = time.perf_counter() - t
                    rows.setdefault((setting, durable), []).append(
                        (wall, to_durable, sampler.stop(), cpu)
                    )
    finally:
        SYNC_MODULE.Syncer = real
        sampler.close()
    print(
        f"{size / 1e9:.2f} GB, {args.optimizer} lr {args.lr:g}, one step: "
        f"{result.total_changed / 1e6:.0f} MB of blocks changed; median of {args.rounds}"
    )
    print(
        f"{'writeback':16} {'durable':8} {'sync s':>7} {'cpu s':>6} {'to durable s':>13} "
        f"{'Dirty peak':>11}   syncs (s)"
    )
    for (setting, durable), vals in rows.items():
        w = statistics.median(v[0] for v in vals)
        d = statistics.median(v[1] for v in vals)
        peak = max(v[2] for v in vals)
        cpu = statistics.median(v[3] for v in vals)
        every = " ".join(f"{v[0]:.3f}" for v in vals)
        print(f"{setting:16} {durable!s:8} {w:7.3f} {cpu:6.3f} {d:13.3f} {peak:8} MiB   {every}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
