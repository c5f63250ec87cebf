"""Live tensors as byte ranges, whatever memory they live in.

A :class:`LiveTensor` is a dtype, a shape and a range of bytes in a *source*: host
memory that any process can read in place (a CPU tensor, a shared-memory mapping),
or a CUDA tensor whose bytes must be staged to the host. Slicing rows of a merged
parameter is a byte range of the same source, so no tensor is ever copied to
build the layout; bytes are only touched when they are streamed to the core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from math import prod
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch

from apollo_sync.dtypes import itemsize, st_dtype

#: Host bytes that can be read in place (a 1-D ``uint8`` array, possibly read-only).
HostBytes: TypeAlias = "np.ndarray[tuple[int], np.dtype[np.uint8]]"


class Assembled(Protocol):
    """Host bytes built when asked for: a tensor that several ranks hold in pieces
    (:class:`apollo_sync.tp.ShardedSource`). ``source[a:b]`` is a new array."""

    def __getitem__(self, key: slice) -> HostBytes: ...


class OpenFile:
    """A file descriptor that live tensors share, and that knows it was closed:
    a closed one refuses to hand out its number (which the OS may have reused)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the live tensor's file was closed (its Handles were closed)")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class LiveTensor:
    """``nbytes`` bytes at ``offset`` in ``source``, holding a ``dtype`` tensor of ``shape``.

    ``source`` is a 1-D ``uint8`` numpy array (host memory, read in place), a
    1-D ``uint8`` CUDA tensor (staged through pinned buffers when streamed), or
    an :class:`Assembled` source (host bytes built from several ranks when read).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: HostBytes | torch.Tensor | Assembled
    offset: int = 0
    #: ``(file, at)``: the same host bytes are also an open file in which source
    #: byte 0 sits at offset ``at`` (another process's shared memory). The core
    #: then reads them with ``pread`` instead of faulting the mapping in page by page.
    file: tuple[OpenFile, int] | None = None

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * itemsize(self.dtype)

    @property
    def is_cuda(self) -> bool:
        return isinstance(self.source, torch.Tensor) and self.source.is_cuda

    def rows(self, start: int, stop: int, name: str) -> LiveTensor:
        """Rows ``start:stop`` of the first dimension, as a tensor of its own."""
        if not self.shape or not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self.name}: rows {start}:{stop} out of range for {self.shape}")
        row_bytes = prod(self.shape[1:]) * itemsize(self.dtype)
        return replace(
            self,
            name=name,
            shape=(stop - start, *self.shape[1:]),
            offset=self.offset + start * row_bytes,
        )

    def stream_source(self, start: int, stop: int) -> Any:
        """What the core reads for bytes ``start:stop`` of a host tensor: the
        in-place buffer, or ``(fd, offset, length)`` of its file."""
        if self.file is not None:
            f, at = self.file
            return (f.fileno(), at + self.offset + start, stop - start)
        return self.host_bytes(start, stop)

    def host_bytes(self, start: int = 0, stop: int | None = None) -> HostBytes:
        """Bytes ``start:stop`` of the tensor as host memory (host sources only; no copy)."""
        if isinstance(self.source, torch.Tensor):
            raise TypeError(f"{self.name}: a CUDA tensor's bytes must be staged, not read in place")
        stop = self.nbytes if stop is None else stop
        return self.source[self.offset + start : self.offset + stop]

    def device_bytes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Bytes ``start:stop`` as a 1-D ``uint8`` tensor view (CUDA sources only)."""
        if not isinstance(self.source, torch.Tensor):
            raise TypeError(f"{self.name}: host bytes are read in place")
        stop = self.nbytes if stop is None else stop
        return self.source[self.offset + start : self.offset + stop]


def from_torch(name: str, tensor: torch.Tensor) -> LiveTensor:
    """A live tensor over a torch tensor's own memory.

    CPU tensors are read in place; CUDA tensors are staged when streamed. A
    non-contiguous tensor is made contiguous first (a copy of that one tensor).
    """
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    dtype = st_dtype(t.dtype)
    if t.numel() == 0:
        return LiveTensor(name, dtype, tuple(t.shape), np.zeros(0, dtype=np.uint8))
    flat = t.reshape(-1).view(torch.uint8)
    if t.device.type == "cuda":
        return LiveTensor(name, dtype, tuple(t.shape), flat)
    if t.device.type != "cpu":
        raise TypeError(f"{name}: tensors on {t.device} are not supported (cpu or cuda)")
    return LiveTensor(name, dtype, tuple(t.shape), flat.numpy())
