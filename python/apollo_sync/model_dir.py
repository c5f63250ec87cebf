"""A model directory as a set of safetensors shards with validated headers.

Which shards exist comes from ``model.safetensors.index.json`` when there is one,
else from ``model.safetensors``, else from every ``*.safetensors`` file. Each
shard's header is read and validated by the Rust core; the index must agree with
the headers. Nothing here reads tensor data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from apollo_sync._core import Header, TensorEntry, read_header
from apollo_sync.errors import ModelDirError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class DiskTensor:
    """A tensor on disk: its shard and its byte range there."""

    name: str
    shard: int
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ModelDir:
    """The shards of a checkpoint and every tensor in them."""

    path: Path
    headers: tuple[Header, ...]
    tensors: dict[str, DiskTensor]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelDir:
        """Finds the shards of ``path`` and validates their headers and index."""
        root = Path(path)
        if not root.is_dir():
            raise ModelDirError(f"{root}: not a directory")
        index_path = root / INDEX_NAME
        weight_map: dict[str, str] | None = None
        if index_path.exists():
            weight_map = _read_index(index_path)
            files = sorted(set(weight_map.values()))
        elif (root / SINGLE_NAME).exists():
            files = [SINGLE_NAME]
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise ModelDirError(f"{root}: no safetensors files (and no {INDEX_NAME})")
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ModelDirError(
                f"{root}: the index names {len(missing)} shard(s) that do not exist: "
                + ", ".join(missing[:5])
            )
        headers = tuple(read_header(root / f) for f in files)
        tensors: dict[str, DiskTensor] = {}
        for i, header in enumerate(headers):
            for t in header.tensors:
                if t.name in tensors:
                    other = files[tensors[t.name].shard]
                    raise ModelDirError(
                        f"{root}: tensor {t.name!r} is in both {other} and {files[i]}"
                    )
                tensors[t.name] = _disk_tensor(t, i)
        if weight_map is not None:
            _check_index(root, weight_map, tensors, files)
        return cls(path=root, headers=headers, tensors=tensors)


def _disk_tensor(t: TensorEntry, shard: int) -> DiskTensor:
    return DiskTensor(
        name=t.name, shard=shard, dtype=t.dtype, shape=tuple(t.shape), start=t.start, end=t.end
    )


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read the index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelDirError(f"{path}: no 'weight_map' of tensor name -> file name")
    for f in set(weight_map.values()):
        if Path(f).name != f:
            raise ModelDirError(f"{path}: shard name {f!r} is not a plain file name")
    return weight_map


def _check_index(
    root: Path, weight_map: dict[str, str], tensors: dict[str, DiskTensor], files: list[str]
) -> None:
    wrong = [
        name
        for name, f in weight_map.items()
        if name not in tensors or files[tensors[name].shard] != f
    ]
    if wrong:
        raise ModelDirError(
            f"{root}: the index places {len(wrong)} tensor(s) where the shard headers do not, "
            f"e.g. {wrong[0]!r} -> {weight_map[wrong[0]]}"
        )
    unindexed = [name for name in tensors if name not in weight_map]
    if unindexed:
        raise ModelDirError(
            f"{root}: {len(unindexed)} tensor(s) in the shards are not in the index, "
            f"e.g. {unindexed[0]!r}"
        )
