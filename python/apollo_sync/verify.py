"""Checking that the files equal the live tensors, through ``safetensors`` itself."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from safetensors import safe_open

from apollo_sync.live import LiveTensor
from apollo_sync.model_dir import ModelDir
from apollo_sync.sync import plan
from apollo_sync.upcast import resolve


def mismatches(model_dir: ModelDir, live: Mapping[str, LiveTensor]) -> list[str]:
    """Disk tensors whose bytes, as loaded by ``safetensors``, differ from the live
    bytes that map onto them (empty when the directory is in sync)."""
    mapping, _ = plan(model_dir, live)
    by_file: dict[int, list[tuple[str, LiveTensor]]] = {}
    for m in mapping.matches:
        # an upcast match is compared as the float32 bytes a sync would write
        by_file.setdefault(m.disk.shard, []).append((m.disk.name, resolve(m, model_dir).live))
    bad: list[str] = []
    for shard, items in sorted(by_file.items()):
        with safe_open(model_dir.headers[shard].path, framework="pt") as f:
            for name, lt in items:
                on_disk = f.get_tensor(name).reshape(-1).view(torch.uint8).numpy()
                live_bytes = lt.device_bytes().cpu().numpy() if lt.is_cuda else lt.host_bytes()
                if not np.array_equal(on_disk, live_bytes):
                    bad.append(name)
    return bad
