"""A sync of a large model: does the kernel's dirty-page accounting slow it down?

A page-cache write of one 4 KiB block into a cached 2 MiB folio makes the kernel
count the whole folio dirty, though writeback sends only the dirty blocks to the
disk. A 0.5% change scattered over a model touches most of its folios, so at 54 GB
the "dirty" count can pass ``vm.dirty_ratio`` of the host's memory, where the
kernel throttles writers (``balance_dirty_pages``) until writeback catches up.

This builds ``--layers`` layers of ``benches/gpu.py``'s Qwen3.5-27B-shaped model
(8 layers are 6.09 GB; no pristine copy is kept, so the disk needs room for one
model), caches the shards as a server loading them would, and then times, in this
process, with the live tensors on the GPU:

* a dry run (compare only);
* a first sync of ``--fraction`` changed blocks;
* the next sync of another ``--fraction``, into the files and cache the first left.

While each runs, a thread samples ``Dirty`` and ``Writeback`` from ``/proc/meminfo``
every 1 ms, and the pages the kernel counted as dirtied (``nr_dirtied`` in
``/proc/vmstat``: whole folios) are added up. The dirty thresholds are printed
beside them, and the seconds per GB compare with ``gpu.py``'s 6 GB rows.

Usage: ``python3 benches/scale.py [--layers 40] [--fraction 0.005] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e
import gpu


def meminfo_kb(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, rest = line.split(":", 1)
        if name in keys:
            out[name] = int(rest.split()[0])
    return out


def vmstat(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name in keys:
            out[name] = int(value)
    return out


def timed(model_dir: Path, live: dict[str, Any], **kw: Any) -> dict[str, Any]:
    before = vmstat("nr_dirtied", "nr_written")
    with (
        gpu.PeakSampler(lambda: meminfo_kb("Dirty")["Dirty"], 0.001) as dirty,
        gpu.PeakSampler(lambda: meminfo_kb("Writeback")["Writeback"], 0.001) as wback,
    ):
        r = gpu.in_process(model_dir, live, **kw)
    after = vmstat("nr_dirtied", "nr_written")
    return r | {
        "peak_dirty_kb": dirty.peak,
        "peak_writeback_kb": wback.peak,
        **{f"{k}_bytes": (after[k] - before[k]) * 4096 for k in before},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--out", type=Path, help="write the numbers (JSON) here")
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="apollo_scale_"))
    try:
        model_dir = work / "model"
        model_dir.mkdir()
        t0 = time.perf_counter()
        info = gpu.build(model_dir, args.layers, torch.float16, device)
        os.sync()
        paths = [model_dir / f for f in info["shards"]]
        e2e.drop_cache(paths)
        e2e.read_all(paths)  # sequential, as a server loads it: readahead's large folios
        total = info["total"]
        print(
            f"built and cached {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True
        )
        host = {
            "mem_total_kb": meminfo_kb("MemTotal")["MemTotal"],
            "dirty_ratio": int(Path("/proc/sys/vm/dirty_ratio").read_text()),
            "dirty_background_ratio": int(Path("/proc/sys/vm/dirty_background_ratio").read_text()),
            **vmstat("nr_dirty_threshold", "nr_dirty_background_threshold"),
        }
        print(f"host: {json.dumps(host)}", flush=True)
        rows: dict[str, dict[str, Any]] = {}
        rows["dry run"] = timed(model_dir, info["live"], dry_run=True)
        for name, seed in (("first sync", 42), ("next sync", 43)):
            blocks = gpu.perturb(model_dir, info, args.fraction, seed=seed)
            rows[name] = timed(model_dir, info["live"]) | {"changed_blocks": len(blocks)}
        print(f"\n{total / 1e9:.2f} GB fp16, {args.layers} layers, {device}")
        print(
            f"{'row':<12} {'seconds':>8} {'s/GB':>7} {'changed':>10} {'disk':>10} "
            f"{'dirtied':>10} {'peak Dirty':>10} {'peak Wback':>10}"
        )
        for name, r in rows.items():
            print(
                f"{name:<12} {r['call_s']:>8.3f} {r['call_s'] / total * 1e9:>7.4f} "
                f"{e2e.fmt_bytes(r['total_changed']):>10} "
                f"{e2e.fmt_bytes(r['disk_bytes_written']):>10} "
                f"{e2e.fmt_bytes(r['nr_dirtied_bytes']):>10} "
                f"{e2e.fmt_bytes(r['peak_dirty_kb'] * 1024):>10} "
                f"{e2e.fmt_bytes(r['peak_writeback_kb'] * 1024):>10}"
            )
        threshold_gb = host["nr_dirty_threshold"] * 4096 / 1e9
        print(
            f"dirty threshold {threshold_gb:.1f} GB (background "
            f"{host['nr_dirty_background_threshold'] * 4096 / 1e9:.1f} GB)"
        )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "scale.json").write_text(
                json.dumps(
                    {"total_bytes": total, "layers": args.layers, "host": host, "rows": rows},
                    indent=1,
                    default=str,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
