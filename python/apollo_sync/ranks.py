"""A set of ranks as one producer.

A vLLM model served with tensor parallelism ``tp`` and pipeline parallelism
``pp`` runs ``tp * pp`` workers; the worker extension writes one handles file per
worker: rank 0 at the path asked for, rank ``N`` at ``<path>.rank<N>`` (``N =
pp_rank * tp + tp_rank``). :func:`open_handles` takes rank 0's path (or any
rank's, or the list of every file), finds the others, checks that they form one
complete, consistent set, and opens it as one :class:`Handles` whose tensors are
the full tensors, assembled from the ranks' pieces when read
(:mod:`apollo_sync.tp`). A single file of a producer with ``tp = pp = 1`` is
opened as it is.

One set means: every rank ``0 .. tp*pp-1`` present exactly once, each file
saying it is that rank (``rank``, ``tensor_parallel_rank``,
``pipeline_parallel_rank``), every producer alive (checked as each file is
loaded), and the same model path, export (the engine's instance), parallel sizes,
architecture, dtype and vLLM version in every file. Anything else is refused
before a byte is read, naming the rank and what differs.

One host of a group (:mod:`apollo_sync.group`, pipeline stages on several
hosts) opens only its own ranks: ``stages=True`` accepts the complete set of
ranks of the pipeline stages it holds (every tensor-parallel rank of each), and
refuses a stage whose tensor-parallel ranks are split between hosts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apollo_sync.errors import HandlesError, RefusedError
from apollo_sync.handles import Handles, check_producer_alive, default_handles_path, load_handles
from apollo_sync.tp import PARTITIONS_KEY, assemble, parse_partitions

#: Metadata every rank of one set must agree on.
SAME_KEYS: tuple[str, ...] = (
    "model_path",
    "export",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "architecture",
    "dtype",
    "vllm_version",
    "quantization",
    "lora_enabled",
    "expert_parallel",
    "eplb",
)
_SUFFIX = re.compile(r"^(?P<base>.+)\.rank(?P<n>[0-9]+)$")

HandlesArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


def rank_path(base: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its handles when rank 0 writes to ``base``."""
    return base if rank == 0 else base.with_name(f"{base.name}.rank{rank}")


def _base_of(path: Path) -> tuple[Path, int]:
    m = _SUFFIX.match(path.name)
    if m is None:
        return path, 0
    return path.with_name(m["base"]), int(m["n"])


def world_size(meta: dict[str, Any]) -> tuple[int, int]:
    """The producer's (tensor-parallel, pipeline-parallel) sizes, 1 where unrecorded."""
    tp, pp = meta.get("tensor_parallel_size", 1), meta.get("pipeline_parallel_size", 1)
    return (tp if isinstance(tp, int) and tp > 0 else 1), (
        pp if isinstance(pp, int) and pp > 0 else 1
    )


def open_handles(handles: HandlesArg = None, *, stages: bool = False) -> Handles:
    """The live tensors of one producer (see the module docs): a handles path
    (rank 0's finds the others), or every rank's path in a list. With
    ``stages``, the ranks of some pipeline stages only (one host of a group):
    the files listed, or those of the set present here."""
    if isinstance(handles, Sequence) and not isinstance(handles, str | bytes):
        paths = [Path(p) for p in handles]
        if not paths:
            raise HandlesError("an empty list of handles files")
        if len(paths) == 1:
            return open_handles(paths[0], stages=stages)
        return _open_set(None, paths, stages=stages)
    path = Path(handles) if handles is not None else default_handles_path()
    first = load_handles(path)
    try:
        tp, pp = world_size(first.metadata)
        if tp * pp == 1:
            return first
        base, n = _base_of(path)
        rank = first.metadata.get("rank", n)
        if rank != n:
            raise HandlesError(f"{path}: says it is rank {rank} but is named as rank {n}")
    except BaseException:
        first.close()
        raise
    if stages:  # this host's ranks: the files of the set that exist here
        first.close()
        here = [rank_path(base, r) for r in range(tp * pp)]
        return _open_set(None, [p for p in here if p.exists()], stages=True)
    if n != 0:  # another rank's file: the set is found from rank 0's path
        first.close()
        return _open_set(base, None)
    return _open_set(base, None, first)


def _open_set(
    base: Path | None,
    listed: list[Path] | None,
    first: Handles | None = None,
    *,
    stages: bool = False,
) -> Handles:
    opened: list[Handles] = [] if first is None else [first]
    try:
        if listed is not None:
            for p in listed:
                opened.append(load_handles(p))
        else:
            assert base is not None
            if not opened:
                opened.append(_load_rank(base, 0, None))
            tp, pp = world_size(opened[0].metadata)
            for n in range(1, tp * pp):
                opened.append(_load_rank(base, n, (tp, pp)))
        by_rank = _check_set(opened, stages=stages)
        specs = [
            parse_partitions(h.metadata, f"{h.path} (rank {r})") for r, h in enumerate(by_rank)
        ]
        tensors = assemble([(h.tensors, s) for h, s in zip(by_rank, specs, strict=True)])
    except BaseException:
        for h in opened:
            h.close()
        raise
    head = by_rank[0]
    meta = {k: v for k, v in head.metadata.items() if k != PARTITIONS_KEY}
    repacked = sorted({str(x) for h in by_rank for x in h.metadata.get("moe_repacked") or []})
    meta |= {
        "rank_set": len(by_rank),
        "rank_paths": [str(h.path) for h in by_rank],
        "moe_repacked": repacked,
    }
    return Handles(tensors=tensors, metadata=meta, path=head.path, _keepalive=list(by_rank))


def _load_rank(base: Path, n: int, sizes: tuple[int, int] | None) -> Handles:
    path = rank_path(base, n)
    if not path.exists() and not path.is_symlink():
        what = (
            ""
            if sizes is None
            else (
                f" of {sizes[0] * sizes[1]} (tensor-parallel {sizes[0]} x "
                f"pipeline-parallel {sizes[1]})"
            )
        )
        raise HandlesError(
            f"{path}: no handles file for rank {n}{what}. Every rank exports its own: call "
            "apollo_export_handles through collective_rpc so that all ranks do"
        )
    try:
        return load_handles(path)
    except HandlesError as e:
        raise type(e)(f"rank {n}: {e}") from None


def _check_set(opened: list[Handles], *, stages: bool = False) -> list[Handles]:
    """The handles ordered by rank, once proven to be one complete, consistent set
    (with ``stages``: every rank of the pipeline stages present)."""
    head = opened[0]
    tp, pp = world_size(head.metadata)
    by_rank: dict[int, Handles] = {}
    for h in opened:
        m = h.metadata
        rank, tp_rank, pp_rank = (
            m.get("rank"),
            m.get("tensor_parallel_rank"),
            m.get("pipeline_parallel_rank", 0),
        )
        if not all(isinstance(x, int) for x in (rank, tp_rank, pp_rank)):
            raise HandlesError(
                f"{h.path}: records no rank (rank, tensor_parallel_rank, pipeline_parallel_rank): "
                "exported by an older apollo_sync worker extension; re-export with this one"
            )
        assert isinstance(rank, int) and isinstance(tp_rank, int) and isinstance(pp_rank, int)
        if rank != pp_rank * tp + tp_rank or not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
            raise HandlesError(
                f"{h.path}: rank {rank} is not tensor-parallel rank {tp_rank} of {tp} and "
                f"pipeline-parallel rank {pp_rank} of {pp}"
            )
        if rank in by_rank:
            raise HandlesError(f"{h.path} and {by_rank[rank].path} are both rank {rank}")
        for key in SAME_KEYS:
            if m.get(key) != head.metadata.get(key):
                why = (
                    " (handles exported at different times, or by different engines: re-export "
                    "on every rank)"
                    if key == "export"
                    else ""
                )
                raise HandlesError(
                    f"{h.path} (rank {rank}) and {head.path} (rank {head.metadata.get('rank')}) "
                    f"are not one producer: {key} {m.get(key)!r} != {head.metadata.get(key)!r}{why}"
                )
        by_rank[rank] = h
    if stages:
        held = sorted({r // tp for r in by_rank})
        for stage in held:
            mine = [r % tp for r in range(stage * tp, (stage + 1) * tp) if r in by_rank]
            if len(mine) < tp:
                raise RefusedError(
                    f"pipeline stage {stage} is split between hosts: this host has its "
                    f"tensor-parallel rank(s) {', '.join(map(str, mine))} of {tp}. Tensor "
                    "parallelism across hosts is refused: a row-parallel tensor's 4 KiB "
                    "blocks hold pieces of every rank, so no host could write them alone. "
                    "Place all tensor-parallel ranks of a stage on one host (pipeline "
                    "parallelism across hosts)"
                )
        return [by_rank[r] for r in sorted(by_rank)]
    missing = [r for r in range(tp * pp) if r not in by_rank]
    if missing:
        raise HandlesError(
            f"the set of handles lacks rank(s) {', '.join(map(str, missing))} of {tp * pp} "
            f"(tensor-parallel {tp} x pipeline-parallel {pp}): every rank must be given"
        )
    return [by_rank[r] for r in range(tp * pp)]


def check_alive(handles: Handles) -> None:
    """:func:`apollo_sync.handles.check_producer_alive` for one producer, or for
    every rank of a set (one gone: its memory must not be read any more)."""
    ranks = [h for h in handles._keepalive if isinstance(h, Handles)]
    for h in ranks or [handles]:
        check_producer_alive(h)
