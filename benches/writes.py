"""How fast can this disk make a scattered change durable? (a measurement, not a test)

A sync that changes 0.5% of the 4 KiB blocks of a model writes thousands of
scattered blocks. This script times the ways of making such a change durable on
the machine it runs on, so the write path is chosen with numbers:

* ``direct``: ``O_DIRECT`` ``pwrite`` of each block from T threads, then
  ``fdatasync`` of each file (what a sync does today);
* ``buffered``: ``pwrite`` into the page cache, then ``fdatasync`` of each file
  (the kernel's writeback sorts and merges the blocks);
* ``buffered, no sync``: the ``pwrite`` calls alone (what applying a change costs
  when its durability comes from elsewhere, e.g. a sequential log);
* ``sequential log``: the same bytes appended to one new file, then
  ``fdatasync`` (what a redo log on the critical path would cost);
* the page-cache read of the files afterwards (``O_DIRECT`` evicts what it
  writes over).

Device bytes come from ``/proc/diskstats`` (sectors written by the device that
holds the files), so they count what reached the disk, not what was charged.

    python3 benches/writes.py --dir /var/tmp/probe --size-gb 6 --blocks 7432
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BLOCK = 4096


def _device_sectors(path: Path) -> int | None:
    """Sectors written so far by the block device holding ``path`` (None if unknown)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if int(f[0]) == major and int(f[1]) == minor:
                return int(f[9])
    except OSError:
        return None
    return None


def _make_files(root: Path, size: int, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    chunk = os.urandom(64 << 20)
    for i in range(n):
        p = root / f"shard-{i}.bin"
        paths.append(p)
        if p.exists() and p.stat().st_size == size:
            continue
        with open(p, "wb") as f:
            left = size
            while left:
                k = min(left, len(chunk))
                f.write(chunk[:k])
                left -= k
            f.flush()
            os.fsync(f.fileno())
    return paths


def _warm(paths: list[Path]) -> float:
    """Reads every file through the page cache; returns seconds."""
    t = time.perf_counter()

    def one(p: Path) -> None:
        with open(p, "rb", buffering=0) as f:
            buf = bytearray(8 << 20)
            while f.readinto(buf):
                pass

    with ThreadPoolExecutor(len(paths)) as ex:
        list(ex.map(one, paths))
    return time.perf_counter() - t


def _targets(paths: list[Path], size: int, blocks: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    per = size // BLOCK
    picked: set[tuple[int, int]] = set()
    while len(picked) < blocks:
        picked.add((rng.randrange(len(paths)), rng.randrange(per) * BLOCK))
    return sorted(picked)


def _aligned(n: int) -> mmap.mmap:
    buf = mmap.mmap(-1, n)
    buf.write(os.urandom(n))
    return buf


def _each(targets: list[tuple[int, int]], threads: int, fn: Callable[[int, int], object]) -> None:
    """Calls ``fn(file_index, offset)`` for every target from ``threads`` threads."""
    it = iter(targets)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            fn(*nxt)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def _pwrite_all(
    fds: list[int], targets: list[tuple[int, int]], data: memoryview, threads: int
) -> None:
    _each(targets, threads, lambda i, off: os.pwrite(fds[i], data, off))


def _fdatasync_all(fds: list[int]) -> None:
    with ThreadPoolExecutor(len(fds)) as ex:
        list(ex.map(os.fdatasync, fds))


def run(args: argparse.Namespace) -> dict[str, Any]:
    root: Path = args.dir
    size = int(args.size_gb * 1e9 / args.files) // BLOCK * BLOCK
    paths = _make_files(root, size, args.files)
    block = _aligned(BLOCK)
    data = memoryview(block)
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, body: Callable[[], dict[str, Any] | None]) -> None:
        _warm(paths)
        os.sync()
        time.sleep(0.2)
        before = _device_sectors(root)
        t = time.perf_counter()
        parts = body()
        total = time.perf_counter() - t
        os.sync()
        after = _device_sectors(root)
        row = {"seconds": total, **(parts or {})}
        if before is not None and after is not None:
            row["device_bytes"] = (after - before) * 512
        row["reread_s"] = _warm(paths)
        rows[name] = row
        print(
            f"{name:28s} "
            + "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )

    targets = _targets(paths, size, args.blocks, 1)
    for threads in args.threads:

        def direct(threads: int = threads) -> dict[str, Any]:
            fds = [os.open(p, os.O_WRONLY | os.O_DIRECT) for p in paths]
            try:
                t = time.perf_counter()
                _pwrite_all(fds, targets, data, threads)
                w = time.perf_counter() - t
                _fdatasync_all(fds)
                return {"write_s": w, "iops": len(targets) / w}
            finally:
                for fd in fds:
                    os.close(fd)

        measure(f"direct, {threads} threads", direct)

    for threads in (1, 4):

        def buffered(threads: int = threads, sync: bool = True) -> dict[str, Any]:
            fds = [os.open(p, os.O_WRONLY) for p in paths]
            try:
                t = time.perf_counter()
                _pwrite_all(fds, targets, data, threads)
                w = time.perf_counter() - t
                if sync:
                    _fdatasync_all(fds)
                return {"write_s": w}
            finally:
                for fd in fds:
                    os.close(fd)

        measure(f"buffered, {threads} threads", buffered)
    measure("buffered, no sync", lambda: buffered(1, False))

    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    write_wait = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER

    for threads in args.threads:

        def ranged(threads: int = threads) -> dict[str, Any]:
            # buffered writes, then each block's writeback started and waited for
            # from T threads (the queue depth a direct writer would have), then
            # fdatasync (the device cache flush and the metadata)
            fds = [os.open(p, os.O_WRONLY) for p in paths]
            try:
                t = time.perf_counter()
                _pwrite_all(fds, targets, data, 1)
                w = time.perf_counter() - t
                _each(
                    targets,
                    threads,
                    lambda i, off: libc.sync_file_range(fds[i], off, BLOCK, write_wait),
                )
                r = time.perf_counter() - t - w
                _fdatasync_all(fds)
                return {"write_s": w, "range_s": r}
            finally:
                for fd in fds:
                    os.close(fd)

        measure(f"buffered, ranged x{threads}", ranged)

    log = root / "log.bin"

    def sequential() -> dict[str, Any]:
        payload = bytes(data) * 256  # 1 MiB appends
        n = len(targets) * BLOCK
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = n
            while left:
                k = min(left, len(payload))
                os.write(fd, payload[:k])
                left -= k
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return {"log_bytes": n}

    measure("sequential log", sequential)
    log.unlink(missing_ok=True)
    return {"size_bytes": size * args.files, "blocks": len(targets), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", type=Path, required=True, help="where the probe files go (not tmpfs)")
    ap.add_argument("--size-gb", type=float, default=6.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=7432)
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    try:
        out = run(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
