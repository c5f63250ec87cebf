"""A block device that records every write and cache flush it receives, so that a
test can rebuild what a power cut at any instant could leave on the disk: what
dm-log-writes does in the kernel, here in user space, for machines without
device-mapper.

The device is one file, ``disk.img``, served from memory by a FUSE filesystem in
this process (``mfusepy`` over libfuse 3, single-threaded, ``direct_io``: every
write reaches :meth:`RecordingDisk.write` in the order the loop driver completed
it), attached to a loop device that carries ext4. The loop driver turns a cache
flush (ext4's journal commits, every ``fsync``) into an ``fsync`` of the file,
recorded as :data:`FLUSH`; it advertises no FUA (``queue/fua`` is 0), so the
block layer sends a FUA write as the write and then a flush.

A crash state is the disk as it was before recording plus some of the recorded
writes (:func:`crash_image`): every write before the last flush (the device
promised those), and any subset of the later ones, each possibly torn at 512 B
sectors (a volatile cache loses what it likes of what was not flushed). Needs
root, ``/dev/fuse``, libfuse 3, ``losetup``, ``mount`` and ``mkfs.ext4``:
:func:`missing` says what is absent.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTOR = 512
FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x02, 0x10  # <linux/falloc.h>
NAME = "disk.img"


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes


#: A cache flush in the recorded stream.
FLUSH = None

Entry = Write | None


class Unavailable(RuntimeError):
    """The machine refused to set the disk up (mounting FUSE or a loop device)."""


def missing() -> str | None:
    """Why this machine cannot run a recording disk, or None."""
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and loop devices"
    for tool in ("losetup", "mount", "umount", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if _Operations is object:
        return "needs mfusepy and libfuse 3 (pip install mfusepy; Debian: libfuse3-3)"
    return None


try:
    import mfusepy

    _Operations: type = mfusepy.Operations
except (ImportError, OSError):  # no mfusepy, or no libfuse 3: `missing` says which
    _Operations = object


class RecordingDisk(_Operations):  # type: ignore[misc,valid-type]
    """One file of ``size`` bytes in memory; records writes, zeroed ranges and
    flushes between :meth:`start` and :meth:`stop`."""

    use_ns = True

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.entries: list[Entry] = []
        self.recording = False
        self._mu = threading.Lock()

    # --- what the loop driver calls -------------------------------------------------
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/" + NAME:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": len(self.data)}
        raise OSError(errno.ENOENT, path)

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", NAME]

    def open(self, path: str, flags: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        if offset + len(data) > len(self.data):
            raise OSError(errno.ENOSPC, "past the end of the disk")
        with self._mu:
            self.data[offset : offset + len(data)] = data
            if self.recording:
                self.entries.append(Write(offset, bytes(data)))
        return len(data)

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: Any) -> int:
        # discard and write-zeroes reach the file as a punched hole or a zeroed range
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self.write(path, bytes(length), offset, fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        with self._mu:
            if self.recording:
                self.entries.append(FLUSH)
        return 0

    def flush(self, path: str, fh: Any) -> int:
        return 0

    def release(self, path: str, fh: Any) -> int:
        return 0

    # --- what the test calls -------------------------------------------------------
    def start(self) -> bytes:
        """Starts recording; returns the disk's bytes at that instant."""
        with self._mu:
            self.entries.clear()
            self.recording = True
            return bytes(self.data)

    def mark(self) -> int:
        """Entries recorded so far."""
        with self._mu:
            return len(self.entries)

    def stop(self) -> list[Entry]:
        with self._mu:
            self.recording = False
            return list(self.entries)


def _run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")
    return p.stdout.strip()


def _umount(path: Path) -> None:
    if not os.path.ismount(path):
        return  # never mounted (setup failed before)
    for _ in range(50):  # busy for a moment after a process that used it exits
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    _run("umount", "--lazy", str(path))


@contextmanager
def recording_ext4(work: Path, size: int = 64 << 20) -> Iterator[tuple[RecordingDisk, Path]]:
    """ext4 (4 KiB blocks) on a fresh :class:`RecordingDisk`, mounted; yields the
    disk and the mount point. Recording starts when the test calls ``start``."""
    fuse_dir, mnt = work / "fuse", work / "fs"
    fuse_dir.mkdir(parents=True)
    mnt.mkdir()
    disk = RecordingDisk(size)
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            mfusepy.FUSE(disk, str(fuse_dir), foreground=True, nothreads=True, direct_io=True)
        except BaseException as e:  # reported to the waiting test
            failed.append(e)

    thread = threading.Thread(target=serve, name="recording-disk", daemon=True)
    thread.start()
    image = fuse_dir / NAME
    deadline = time.monotonic() + 10
    while not image.exists():
        if failed or not thread.is_alive() or time.monotonic() > deadline:
            raise Unavailable(f"the FUSE disk did not come up: {failed or 'timeout'}")
        time.sleep(0.02)
    try:
        try:
            loop = _run("losetup", "--find", "--show", str(image))
        except RuntimeError as e:
            raise Unavailable(str(e)) from e
        try:
            _run(
                "mkfs.ext4", "-q", "-F", "-b", "4096",
                "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", loop,
            )  # fmt: skip
            try:
                _run("mount", "-o", "noatime", loop, str(mnt))
            except RuntimeError as e:
                raise Unavailable(str(e)) from e
            try:
                yield disk, mnt
            finally:
                disk.stop()
                _umount(mnt)
        finally:
            _run("losetup", "--detach", loop)
    finally:
        _umount(fuse_dir)
        thread.join(10)


def crash_image(
    base: bytes, entries: list[Entry], upto: int, rng: random.Random | None = None
) -> bytearray:
    """The disk after a power cut once ``entries[:upto]`` had completed: ``base``
    with every write before the last flush in that range applied, and the writes
    after it applied too (``rng`` None) or each kept, lost or torn at 512 B
    sectors at random."""
    img = bytearray(base)
    last_flush = max((i for i in range(upto) if entries[i] is FLUSH), default=-1)
    for i in range(upto):
        w = entries[i]
        if w is FLUSH:
            continue
        if rng is None or i < last_flush:
            img[w.offset : w.offset + len(w.data)] = w.data
            continue
        fate = rng.random()
        if fate < 1 / 3:
            continue  # lost
        if fate < 2 / 3:
            img[w.offset : w.offset + len(w.data)] = w.data
            continue
        for s in range(0, len(w.data), SECTOR):  # torn: each sector old or new
            if rng.random() < 0.5:
                img[w.offset + s : w.offset + s + SECTOR] = w.data[s : s + SECTOR]
    return img


@contextmanager
def mounted(image: Path, mnt: Path) -> Iterator[Path]:
    """``image`` mounted at ``mnt`` through a loop device (ext4 replays its journal,
    as at boot after a power cut)."""
    mnt.mkdir(exist_ok=True)
    _run("mount", "-o", "loop,noatime", str(image), str(mnt))
    try:
        yield mnt
    finally:
        _umount(mnt)
