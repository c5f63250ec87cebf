"""What one 4 KiB write into the page cache costs, by the folios that cache the file.

A file read sequentially (as a loader reads a model, or ``benches/gpu.py``'s
restore) is cached in the large folios readahead makes (up to 2 MiB on ext4 since
Linux 6.16); a file whose blocks were read one by one is cached in 4 KiB folios.
This probe writes the same scattered 4 KiB blocks (``--fraction`` of a ``--mb``
file) in each state and prints, per state: microseconds per ``pwrite``, how much
the kernel's ``Dirty:`` counter grew, and (after ``fsync``) how many bytes the
block device received (``/proc/diskstats``).

    python benches/probes/folio_writes.py --dir /tmp --mb 1024 --fraction 0.005
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

BLOCK = 4096


def meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def sectors_written(dev: int) -> int:
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if os.makedev(int(p[0]), int(p[1])) == dev:
                return int(p[9])
    return 0  # not a block device (tmpfs, overlay on another): no count


def drop(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--fraction", type=float, default=0.005)
    args = ap.parse_args()
    path = args.dir / "apollo-folio-probe.bin"
    size = args.mb << 20
    with open(path, "wb") as f:
        for _ in range(args.mb):
            f.write(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        blocks = random.Random(0).sample(range(size // BLOCK), int(size / BLOCK * args.fraction))
        data = os.urandom(BLOCK)
        dev = os.stat(path).st_dev

        def sequential() -> None:  # readahead's large folios
            drop(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
            with open(path, "rb", buffering=0) as f:
                while f.read(4 << 20):
                    pass

        def block_by_block() -> None:  # 4 KiB folios for the blocks written
            drop(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for b in blocks:
                os.pread(fd, BLOCK, b * BLOCK)

        print(f"{len(blocks)} writes of 4 KiB into a {args.mb} MiB file on {args.dir}")
        for label, cache in [
            ("read sequentially (large folios)", sequential),
            ("same folios, written once before", None),
            ("read block by block (4 KiB folios)", block_by_block),
        ]:
            if cache is not None:
                cache()
            os.fsync(fd)
            os.sync()
            dirty0, sectors0 = meminfo_kb("Dirty"), sectors_written(dev)
            t0 = time.perf_counter()
            for b in blocks:
                os.pwrite(fd, data, b * BLOCK)
            secs = time.perf_counter() - t0
            dirty = meminfo_kb("Dirty") - dirty0
            os.fsync(fd)
            disk = (sectors_written(dev) - sectors0) * 512
            print(
                f"  {label:<36} {secs / len(blocks) * 1e6:6.1f} us/write  "
                f"Dirty +{dirty / 1024:7.1f} MiB  disk {disk / 2**20:6.1f} MiB"
            )
    finally:
        os.close(fd)
        path.unlink()


if __name__ == "__main__":
    main()
