"""A training-step counter in shared memory, so a sync never commits a mix of
two training steps.

The producer (the process whose tensors are synced) bumps the counter to an odd
value before it changes the weights and to the next even value after, seqlock
style. A sync waits for an even value, reads the tensors, and reads the counter
again: if it moved, the bytes it read may mix two steps, so the sync puts the
files back and tries again instead of committing them.

>>> counter = StepCounter.create()                      # doctest: +SKIP
>>> export_handles(weights, step_counter=counter)        # doctest: +SKIP
>>> with counter.step():                                # doctest: +SKIP
...     optimizer.step()
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from apollo_sync.errors import HandlesError, UnsafeHandlesError

_SIZE = 8
_FMT = "<Q"


def _shm_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path.home() / ".cache" / "apollo_sync"


class StepCounter:
    """An 8-byte counter in a shared file, mapped in this process."""

    def __init__(self, path: Path, writable: bool) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != _SIZE:
                raise HandlesError(f"{path}: not a step counter ({st.st_size} bytes)")
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise UnsafeHandlesError(
                    f"{path}: step counter owned or writable by another user; refusing it"
                )
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, _SIZE, access=access)
        finally:
            os.close(fd)
        self.path = path
        self.writable = writable

    @classmethod
    def create(cls, path: str | os.PathLike[str] | None = None) -> StepCounter:
        """A new counter at ``path`` (default: a private file in ``/dev/shm``), at 0."""
        if path is None:
            target = _shm_dir() / f"apollo_sync-{os.getpid()}-{secrets.token_hex(4)}.step"
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target = Path(path)
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, struct.pack(_FMT, 0))
        finally:
            os.close(fd)
        return cls(target, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> StepCounter:
        """Opens a producer's counter read-only."""
        try:
            return cls(Path(path), writable=False)
        except FileNotFoundError:
            raise HandlesError(
                f"{path}: the producer's step counter is gone (has the producer exited?)"
            ) from None

    def value(self) -> int:
        # An aligned 8-byte load from a page-aligned mapping: a single read.
        return int(struct.unpack_from(_FMT, self._map, 0)[0])

    def _set(self, v: int) -> None:
        struct.pack_into(_FMT, self._map, 0, v)

    @contextlib.contextmanager
    def step(self, *, cuda_sync: bool = True) -> Iterator[None]:
        """Marks the weights as changing for the duration of the block. On exit,
        waits for queued CUDA work first (``cuda_sync``): a step's kernels write
        the weights after the Python call that launched them has returned."""
        if not self.writable:
            raise HandlesError(f"{self.path}: opened read-only; only the producer steps")
        v = self.value()
        self._set(v + 1 if v % 2 == 0 else v)
        try:
            yield
        finally:
            if cuda_sync:
                import torch

                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
            self._set((self.value() | 1) + 1)

    def wait_even(self, timeout: float) -> int:
        """The counter's value once no step is in progress (waits up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.value()
            if v % 2 == 0:
                return v
            if time.monotonic() >= deadline:
                raise HandlesError(
                    f"{self.path}: the producer has been inside a training step for "
                    f"{timeout:g} s; not syncing a half-applied step"
                )
            time.sleep(0.002)

    def close(self) -> None:
        self._map.close()

    def unlink(self) -> None:
        """Removes the counter's file (the producer, when it is done)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
