"""Shared fixtures: small real checkpoints written with ``safetensors`` itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def write_model(
    root: Path, tensors: dict[str, torch.Tensor], shards: int = 1, index: bool | None = None
) -> Path:
    """Writes ``tensors`` as a checkpoint: one ``model.safetensors`` or ``shards``
    files with an index."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1 and not index:
        save_file(tensors, str(root / "model.safetensors"))
        return root
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(root / fname))
        weight_map |= dict.fromkeys(part, fname)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def dir_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to prove nothing changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.fixture
def model_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(tensors: dict[str, torch.Tensor], shards: int = 1, index: bool | None = None) -> Path:
        return write_model(tmp_path / f"model{next(counter)}", tensors, shards, index)

    return make
