"""Checkpoint tensors stored wider than the live ones (float32 on disk, bf16/fp16 live).

Qwen3.5 stores ``linear_attn.A_log`` and ``linear_attn.norm.weight`` in float32;
vLLM holds ``norm.weight`` in the model dtype (current vLLM creates ``A_log`` in
float32, a plain copy; older builds and other models may not). Writing the live
values widened would replace
every float32 value by its rounded one even where training changed nothing. So
the comparison happens in the live dtype: an element whose file value, rounded to
the live dtype, equals the live value keeps the file's float32 bits; only an
element that differs gets the live value widened (exact: bf16 and fp16 values are
float32 values). The result is float32 bytes fed to the core like any live
tensor, so only the blocks holding changed elements are written.

The file's float32 values are read with ``pread``, in chunks of
:data:`CHUNK_ELEMENTS`; the float32 bytes to feed are built in host memory (the
tensors this applies to are small: per-head or per-channel vectors).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from apollo_sync.dtypes import torch_dtype
from apollo_sync.errors import LayoutError
from apollo_sync.layouts import Match
from apollo_sync.live import LiveTensor
from apollo_sync.model_dir import ModelDir

CHUNK_ELEMENTS = 1 << 20


def upcast_live(m: Match, md: ModelDir, *, chunk_elements: int = CHUNK_ELEMENTS) -> LiveTensor:
    """The float32 bytes that make ``m.disk`` hold ``m.live`` (see the module docs)."""
    if m.kind != "upcast" or m.disk.dtype != "F32":
        raise LayoutError(f"{m.disk.name}: not an upcast match ({m.kind}, {m.disk.dtype})")
    live_dtype = torch_dtype(m.live.dtype)
    n = m.disk.end - m.disk.start
    count = n // 4
    out = np.empty(count, dtype=np.float32)
    path = md.headers[m.disk.shard].path
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo in range(0, count, chunk_elements):
            hi = min(count, lo + chunk_elements)
            raw = os.pread(fd, (hi - lo) * 4, m.disk.start + lo * 4)
            if len(raw) != (hi - lo) * 4:
                raise LayoutError(f"{path}: {m.disk.name} is cut short on disk")
            file32 = torch.frombuffer(bytearray(raw), dtype=torch.float32)
            live = _live_chunk(m.live, lo, hi, live_dtype)
            differ = file32.to(live_dtype).view(torch.int16) != live.view(torch.int16)
            file32[differ] = live[differ].to(torch.float32)
            out[lo:hi] = file32.numpy()
    finally:
        os.close(fd)
    return LiveTensor(m.disk.name, "F32", m.disk.shape, out.view(np.uint8))


def _live_chunk(t: LiveTensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements ``lo:hi`` of a live tensor, on the host, in ``dtype``."""
    width = dtype.itemsize
    if t.is_cuda:
        raw = t.device_bytes(lo * width, hi * width).cpu()
    else:
        raw = torch.from_numpy(t.host_bytes(lo * width, hi * width).copy())
    return raw.view(dtype)


def resolve(m: Match, md: ModelDir) -> Match:
    """``m`` with the live bytes the file should hold (upcast matches rebuilt)."""
    if m.kind == "upcast":
        return replace(m, live=upcast_live(m, md))
    return m
