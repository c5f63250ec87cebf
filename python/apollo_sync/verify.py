"""Checking that the files equal the live tensors, through ``safetensors`` itself."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from safetensors import safe_open

from apollo_sync.live import LiveTensor
from apollo_sync.model_dir import ModelDir
from apollo_sync.sync import plan
from apollo_sync.upcast import resolve

#: An unsigned integer type per element width, to compare elements bit for bit
#: (a float compare would call NaN unequal to itself and -0.0 equal to 0.0).
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _pairs(
    model_dir: ModelDir, live: Mapping[str, LiveTensor]
) -> Iterator[tuple[str, np.ndarray, np.ndarray, int]]:
    """Per disk tensor that a live tensor maps onto: its name, its bytes as
    ``safetensors`` loads them, the live bytes a sync would write there, and the
    element width on disk."""
    mapping, _ = plan(model_dir, live)
    by_file: dict[int, list[tuple[str, LiveTensor]]] = {}
    for m in mapping.matches:
        # an upcast match is compared as the float32 bytes a sync would write
        by_file.setdefault(m.disk.shard, []).append((m.disk.name, resolve(m, model_dir).live))
    for shard, items in sorted(by_file.items()):
        with safe_open(model_dir.headers[shard].path, framework="pt") as f:
            for name, lt in items:
                t = f.get_tensor(name)
                on_disk = t.reshape(-1).view(torch.uint8).numpy()
                live_bytes = lt.device_bytes().cpu().numpy() if lt.is_cuda else lt.host_bytes()
                yield name, on_disk, live_bytes, t.element_size()


def mismatches(model_dir: ModelDir, live: Mapping[str, LiveTensor]) -> list[str]:
    """Disk tensors whose bytes, as loaded by ``safetensors``, differ from the live
    bytes that map onto them (empty when the directory is in sync)."""
    return [
        name
        for name, on_disk, live_bytes, _ in _pairs(model_dir, live)
        if not np.array_equal(on_disk, live_bytes)
    ]


def changed_elements(model_dir: ModelDir, live: Mapping[str, LiveTensor]) -> tuple[int, int]:
    """How many elements of the files differ (bit for bit, at the dtype's width on
    disk) from the live tensors that map onto them, and how many were compared:
    what a sync would change, counted in elements rather than blocks."""
    changed = total = 0
    for _, on_disk, live_bytes, width in _pairs(model_dir, live):
        bits = _BITS[width]
        changed += int(np.count_nonzero(on_disk.view(bits) != live_bytes.view(bits)))
        total += on_disk.size // width
    return changed, total
