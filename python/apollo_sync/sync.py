"""The sync: live tensors in, the changed blocks of the model directory written.

Everything is checked before the first write: the shards and their headers, the
index, every live tensor's name, dtype and shape against the file. Only then are
the bytes streamed to the Rust core, which diffs and writes in parallel with the
GIL released, and fsyncs what it wrote before returning.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from apollo_sync._core import Syncer
from apollo_sync.errors import HandlesError, LayoutError, RefusedError
from apollo_sync.handles import Handles, load_handles
from apollo_sync.layouts import LayoutMap, map_tensors, tied_embeddings
from apollo_sync.live import LiveTensor, from_torch
from apollo_sync.model_dir import ModelDir
from apollo_sync.refusals import check_producer
from apollo_sync.stream import Placement, stream_into
from apollo_sync.upcast import resolve

DEFAULT_BLOCK_SIZE = 4096

LiveInput = Mapping[str, "torch.Tensor | LiveTensor"]


@dataclass(frozen=True)
class FileResult:
    """What the sync did to one shard."""

    file: str
    bytes_compared: int
    bytes_changed: int
    blocks_changed: int
    bytes_written: int
    bytes_written_buffered: int
    writes: int
    direct_io_fallback: str | None


@dataclass(frozen=True)
class SyncResult:
    """The outcome of a sync. The first five fields are the seeds' stats dict."""

    total_compared: int
    total_changed: int
    files_changed: list[str]
    tensors_synced: int
    tensors_missing: int
    #: Bytes the sync asked the kernel to write (whole changed blocks).
    bytes_written: int
    #: Bytes the kernel accounted as written to the device by this process during
    #: the sync (``getrusage`` ``ru_oublock`` × 512): what the disk really absorbed.
    bytes_written_device: int
    #: Bytes the block device under the model directory wrote during the sync, by
    #: every writer on it (``/sys/dev/block/.../stat``); None where there is no such
    #: device (tmpfs, overlay). Unlike ``bytes_written_device``, which the kernel
    #: charges per page-cache folio dirtied, this is what reached the disk.
    disk_bytes_written: int | None
    seconds: float
    dry_run: bool
    block_size: int
    model_dir: str
    tensors_on_disk_only: int
    files: list[FileResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def seeds_dict(self) -> dict[str, Any]:
        """The dict the seed script's ``checkpoint_sync`` returned."""
        return {
            "total_compared": self.total_compared,
            "total_changed": self.total_changed,
            "files_changed": list(self.files_changed),
            "tensors_synced": self.tensors_synced,
            "tensors_missing": self.tensors_missing,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def gb_per_s(self) -> float:
        return self.total_compared / self.seconds / 1e9 if self.seconds > 0 else 0.0


def plan(
    model_dir: ModelDir, live: Mapping[str, LiveTensor], *, allow_unmatched: bool = False
) -> tuple[LayoutMap, list[Placement]]:
    """Maps live tensors onto the files and orders them as they lie on disk.

    Raises :class:`LayoutError` listing every problem (:class:`RefusedError` when
    one is a refusal), unless ``allow_unmatched`` and the only problems are names
    that match nothing on disk. Upcast matches (float32 on disk) are placed as the
    float32 bytes to write (:func:`apollo_sync.upcast.resolve`).
    """
    mapping = map_tensors(live, model_dir.tensors, tied=tied_embeddings(model_dir.path))
    fatal = [p for p in mapping.problems if not (allow_unmatched and p.kind == "unmatched")]
    if fatal:
        lines = [f"  {p.live_name}: {p.detail}" for p in fatal[:20]]
        more = f"\n  ... and {len(fatal) - 20} more" if len(fatal) > 20 else ""
        refused = any(p.kind == "refused" for p in fatal)
        raise (RefusedError if refused else LayoutError)(
            f"{len(fatal)} live tensor(s) cannot be synced to {model_dir.path} "
            f"(nothing was written):\n"
            + "\n".join(lines)
            + more
            + "\n(run `apollo-sync diagnose` for the full picture)"
        )
    placements = sorted(
        (
            Placement(m.disk.shard, m.disk.start, resolve(m, model_dir).live)
            for m in mapping.matches
        ),
        key=lambda p: (p.shard, p.offset),
    )
    return mapping, placements


def sync(
    model_dir: str | os.PathLike[str] | None = None,
    tensors: LiveInput | None = None,
    *,
    handles: str | os.PathLike[str] | Handles | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dry_run: bool = False,
    direct_io: bool = True,
    threads: int = 0,
    allow_unmatched: bool = False,
    progress: bool = False,
) -> SyncResult:
    """Makes the safetensors files in ``model_dir`` equal to the live tensors.

    Live tensors come from ``tensors`` (a state dict, e.g. ``model.state_dict()``:
    CPU or CUDA tensors, in vLLM or HF naming) or from a handles file (``handles``:
    a path, an opened :class:`Handles`, or the default path when neither is given).
    ``model_dir`` defaults to the handles metadata's ``model_path``.
    """
    if tensors is not None and handles is not None:
        raise TypeError("pass either tensors or handles, not both")
    opened: Handles | None = None
    try:
        if tensors is None:
            opened = handles if isinstance(handles, Handles) else load_handles(handles)
            live: dict[str, LiveTensor] = dict(opened.tensors)
            check_producer(opened.metadata, str(opened.path))
            if model_dir is None:
                model_dir = opened.metadata.get("model_path")
                if not isinstance(model_dir, str):
                    raise HandlesError(
                        f"{opened.path}: no model_path in the metadata; pass --model-dir"
                    )
        else:
            live = {
                name: t if isinstance(t, LiveTensor) else from_torch(name, t)
                for name, t in tensors.items()
            }
        if model_dir is None:
            raise TypeError("model_dir is required when live tensors are passed directly")
        return _run(
            ModelDir.open(model_dir),
            live,
            block_size=block_size,
            dry_run=dry_run,
            direct_io=direct_io,
            threads=threads,
            allow_unmatched=allow_unmatched,
            progress=progress,
        )
    finally:
        if opened is not None and not isinstance(handles, Handles):
            opened.close()


def _run(
    md: ModelDir,
    live: Mapping[str, LiveTensor],
    *,
    block_size: int,
    dry_run: bool,
    direct_io: bool,
    threads: int,
    allow_unmatched: bool,
    progress: bool,
) -> SyncResult:
    mapping, placements = plan(md, live, allow_unmatched=allow_unmatched)
    used = sorted({p.shard for p in placements})
    local = {shard: i for i, shard in enumerate(used)}
    syncer = Syncer(
        [(md.headers[s].path, md.headers[s].data_start, md.headers[s].file_len) for s in used],
        block_size=block_size,
        dry_run=dry_run,
        direct_io=direct_io,
        threads=threads,
    )
    placements = [Placement(local[p.shard], p.offset, p.live) for p in placements]
    total = sum(p.live.nbytes for p in placements)
    disk_before = _disk_sectors_written(md.path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    t0 = time.perf_counter()
    bar = _progress_bar(total, progress)
    try:
        stream_into(syncer, placements, progress=bar.update if bar else None)
        reports = syncer.finish()
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - t0
    device = (resource.getrusage(resource.RUSAGE_SELF).ru_oublock - before) * 512
    disk_after = _disk_sectors_written(md.path)
    disk = None if disk_before is None or disk_after is None else (disk_after - disk_before) * 512
    files = [
        FileResult(
            file=Path(r.path).name,
            bytes_compared=r.bytes_compared,
            bytes_changed=r.bytes_changed,
            blocks_changed=r.blocks_changed,
            bytes_written=r.bytes_written_direct + r.bytes_written_buffered,
            bytes_written_buffered=r.bytes_written_buffered,
            writes=r.writes,
            direct_io_fallback=r.direct_io_fallback,
        )
        for r in reports
    ]
    for f in files:
        if f.direct_io_fallback:
            print(
                f"apollo-sync: warning: {f.file}: direct I/O unavailable, wrote through the "
                f"page cache ({f.direct_io_fallback}); device writes may exceed the changed bytes",
                file=sys.stderr,
            )
    missing = sorted(p.live_name for p in mapping.problems)
    return SyncResult(
        total_compared=sum(f.bytes_compared for f in files),
        total_changed=sum(f.bytes_changed for f in files),
        files_changed=[f.file for f in files if f.bytes_changed],
        tensors_synced=len(mapping.matches),
        tensors_missing=len(missing),
        bytes_written=sum(f.bytes_written for f in files),
        bytes_written_device=device,
        disk_bytes_written=disk,
        seconds=seconds,
        dry_run=dry_run,
        block_size=block_size,
        model_dir=str(md.path),
        tensors_on_disk_only=len(mapping.disk_only),
        files=files,
        missing=missing,
    )


def _disk_sectors_written(path: Path) -> int | None:
    """Sectors written so far by the block device holding ``path`` (None if none)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    try:
        return int(stat.read_text().split()[6])
    except (OSError, IndexError, ValueError):
        return None


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="sync",
        file=sys.stderr,
        leave=False,
    )


def checkpoint_sync(
    model_dir: str | os.PathLike[str],
    handles_path: str | os.PathLike[str] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, Any]:
    """Drop-in for the seed script's ``checkpoint_sync``: the same arguments and
    the same stats dict (errors raise instead of being logged and skipped)."""
    return sync(model_dir, handles=handles_path, block_size=block_size).seeds_dict()
