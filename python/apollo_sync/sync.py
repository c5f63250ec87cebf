"""The sync: live tensors in, the changed blocks of the model directory written.

Everything is checked before the first write: the shards and their headers, the
index, every live tensor's name, dtype and shape against the file. Only then are
the bytes streamed to the Rust core, which diffs and writes in parallel with the
GIL released, and fsyncs what it wrote before returning.

A sync that writes holds the model directory's lock, first recovers any
interrupted sync, and (unless ``journal=False``) logs the XOR delta of what it
overwrites before overwriting it, so it commits a new generation atomically or
leaves the last committed one (see :mod:`apollo_sync.journal`). When it returns,
the files are current through the page cache; the shards are made durable in the
background (``durable=True`` waits for it).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apollo_sync import journal as gens
from apollo_sync._core import (
    LOG_MIN_BLOCK,
    MAX_BLOCK,
    MIN_BLOCK,
    WRITEBACK_BYTES,
    LogWriter,
    Syncer,
)
from apollo_sync.errors import (
    ApolloSyncError,
    HandlesError,
    JournalError,
    LayoutError,
    PlanError,
    RefusedError,
    SyncIOError,
    TornSyncError,
)
from apollo_sync.handles import Handles
from apollo_sync.layouts import LayoutMap, map_tensors, tied_embeddings
from apollo_sync.live import LiveTensor, from_torch
from apollo_sync.model_dir import ModelDir
from apollo_sync.ranks import HandlesArg, open_handles
from apollo_sync.refusals import check_producer
from apollo_sync.shards import check_shards
from apollo_sync.steps import StepCounter
from apollo_sync.stream import Placement, stream_into
from apollo_sync.tp import is_sharded, stream_ranks
from apollo_sync.upcast import resolve

if TYPE_CHECKING:
    from apollo_sync.group import Group

DEFAULT_BLOCK_SIZE = 4096
#: A sync whose disk wrote more than AMPLIFIED × what it asked (plus the slack,
#: for the filesystem's own metadata and other writers) warns: page-cache
#: writes that the filesystem writes back as whole folios.
AMPLIFIED = 4
AMPLIFIED_SLACK = 32 << 20

LiveInput = Mapping[str, "torch.Tensor | LiveTensor"]

log = logging.getLogger(__name__)


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
    #: Elements whose bytes changed (counted by the log: 0 without one).
    elements_changed: int
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
    #: the sync (``getrusage`` ``ru_oublock`` × 512). Exact for ``O_DIRECT``
    #: writes; a buffered write is charged the whole page-cache folio it dirties
    #: (up to 2 MiB), though writeback sends only the dirty blocks to the disk:
    #: see ``disk_bytes_written``.
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
    #: The generation this sync committed; None when it changed nothing (or was
    #: a dry run): the directory is still the previous one.
    generation: int | None = None
    #: Bytes of this generation's log (0 without one): what the history keeps.
    log_bytes: int = 0
    #: Elements whose bytes changed (counted by the log: 0 without one).
    elements_changed: int = 0
    #: Whether the shards were durable on disk when the sync returned (always
    #: without a log; with ``durable=True``; otherwise they are flushed in the
    #: background and a power cut before then needs ``apollo-sync recover``).
    durable: bool = False
    #: Uncommitted generations that recovery undid before this sync.
    recovered: list[int] = field(default_factory=list)
    #: Times the sync was redone because the producer stepped during it.
    retries: int = 0
    #: The producer's step counter when the tensors were read (even: between
    #: two steps), unchanged until they all were; None without a counter.
    step: int | None = None
    #: Things to know: a failed background flush of an earlier sync (redone),
    #: a failed prune after the commit, layout notes.
    warnings: list[str] = field(default_factory=list)
    #: Where the time went, in seconds of wall clock (``barriers``,
    #: ``writeback_spans`` and ``writeback_started`` are counts: a durable
    #: sync's spans of written bytes handed to the writeback, and those it
    #: started before the writes ended):
    #: ``open`` (planning and opening the shards), ``stream`` (reading the live
    #: bytes and feeding the core: ``seconds`` is ``stream`` + ``finish``), and
    #: inside it the core's ``feed`` (read, compare, encode) and
    #: ``release_wait`` (the diff waiting for the commit thread); on other
    #: threads, log ``barrier`` time and in-place ``write`` time (summed and
    #: ``write_busiest``, the busiest writer thread); ``finish`` (the last
    #: batch and the writers' tail); ``commit`` and ``after_commit`` (pruning,
    #: and starting or, when durable, waiting for the flush). Threads overlap:
    #: the stages do not add up.
    stages: dict[str, float] = field(default_factory=dict)

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
    model_dir: ModelDir,
    live: Mapping[str, LiveTensor],
    *,
    allow_unmatched: bool = False,
    mapping: LayoutMap | None = None,
) -> tuple[LayoutMap, list[Placement]]:
    """Maps live tensors onto the files and orders them as they lie on disk.

    Raises :class:`LayoutError` listing every problem (:class:`RefusedError` when
    one is a refusal), unless ``allow_unmatched`` and the only problems are names
    that match nothing on disk. Upcast matches (float32 on disk) are placed as the
    float32 bytes to write (:func:`apollo_sync.upcast.resolve`). A ``mapping``
    already checked against these files is used as it is.
    """
    if mapping is None:
        mapping = check_mapping(model_dir, live, allow_unmatched=allow_unmatched)
    placements = sorted(
        (
            Placement(m.disk.shard, m.disk.start, resolve(m, model_dir).live)
            for m in mapping.matches
        ),
        key=lambda p: (p.shard, p.offset),
    )
    return mapping, placements


def check_mapping(
    model_dir: ModelDir, live: Mapping[str, LiveTensor], *, allow_unmatched: bool = False
) -> LayoutMap:
    """The mapping of live tensors onto the files, or the error :func:`plan` raises."""
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
    return mapping


def sync(
    model_dir: str | os.PathLike[str] | None = None,
    tensors: LiveInput | None = None,
    *,
    handles: HandlesArg | Handles = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dry_run: bool = False,
    direct_io: bool = False,
    threads: int = 0,
    allow_unmatched: bool = False,
    progress: bool = False,
    journal: bool = True,
    keep: int = gens.DEFAULT_KEEP,
    undo_budget: int | None = None,
    lock_timeout: float = gens.DEFAULT_LOCK_TIMEOUT,
    private_copy: bool = False,
    step_counter: StepCounter | None = None,
    step_retries: int = 3,
    durable: bool = False,
    group: Group | None = None,
    step: int | None = None,
) -> SyncResult:
    """Makes the safetensors files in ``model_dir`` equal to the live tensors.

    Live tensors come from ``tensors`` (a state dict, e.g. ``model.state_dict()``:
    CPU or CUDA tensors, in vLLM or HF naming) or from a handles file (``handles``:
    a path, an opened :class:`Handles`, or the default path when neither is given).
    A tensor- or pipeline-parallel producer writes one file per rank: rank 0's
    path (or the list of every rank's) syncs them as one set, each rank's bytes
    put where they belong in the files (:mod:`apollo_sync.ranks`).
    ``model_dir`` defaults to the handles metadata's ``model_path``.

    Writing syncs take the directory's lock (waiting up to ``lock_timeout``
    seconds), recover an interrupted sync, and log the XOR delta of what they
    overwrite (``journal=False`` skips the log: a crash can then leave a mix of
    two generations, and there is no rollback past this sync). The logs of the
    newest ``keep`` generations are kept, within ``undo_budget`` bytes (default:
    half the model's size). A shard that is a symlink or
    has other hard links is refused unless ``private_copy``, which first
    replaces it by a private copy (a reflink where the filesystem can).
    With a ``step_counter`` (the producer's, from the handles metadata by
    default), a sync during which the producer stepped is undone and redone, up
    to ``step_retries`` times (without a journal it cannot be undone: it raises
    :class:`TornSyncError` at once). ``step`` (a value of that counter) asks for
    that step and no other: a sync that finds the counter elsewhere, or sees it
    move, commits nothing and raises :class:`TornSyncError` without trying
    again (what a group's :func:`apollo_sync.watch` passes: the step every host
    agreed on).

    **What a reader can rely on.** When a logged sync returns, its generation is
    committed (its log is durable) and the files are current through the page
    cache of this host; the shards are made durable in the background. After a
    power cut they are whole only once recovery has run: every writer recovers
    first, and a loader runs ``apollo-sync recover`` or reads inside
    :func:`apollo_sync.reading`. ``durable=True`` returns only once the shards
    are durable too (a sync without a log always is).

    Changed blocks are written through the page cache: the disk receives exactly
    the changed blocks (the filesystem writes back only the dirty blocks of a
    folio) and the cache stays warm for the next sync. ``direct_io=True``
    writes them with ``O_DIRECT`` instead: the same disk bytes, but each write
    evicts the whole cached folio around it (up to 2 MiB), so the next sync
    reads most of a scattered change's neighbourhood back from disk
    (BENCHMARKS.md has both measured, sync after sync).

    With a ``group`` (:class:`apollo_sync.group.Group`), this is one host of
    several that write one directory together: it writes only its own tensors
    (handles: the complete ranks of the pipeline stages it holds), and the
    generation is committed by every host or by none
    (:mod:`apollo_sync.group`). Every host must call it, each time.
    """
    started = time.monotonic()
    if tensors is not None and handles is not None:
        raise TypeError("pass either tensors or handles, not both")
    if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise PlanError(
            f"block size {block_size} must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        )
    if step is not None and (step < 0 or step % 2):
        raise PlanError(f"step {step}: a finished step is an even value of the step counter")
    gens.check_retention(keep, undo_budget)
    opened: Handles | None = None
    counter: StepCounter | None = step_counter
    own_counter = False
    try:
        if tensors is None:
            opened = (
                handles
                if isinstance(handles, Handles)
                else open_handles(handles, stages=group is not None)
            )
            live: dict[str, LiveTensor] = dict(opened.tensors)
            check_producer(opened.metadata, str(opened.path))
            if model_dir is None:
                model_dir = opened.metadata.get("model_path")
                if not isinstance(model_dir, str):
                    raise HandlesError(
                        f"{opened.path}: no model_path in the metadata; pass --model-dir"
                    )
            counter_path = opened.metadata.get("step_counter")
            if counter is None and isinstance(counter_path, str):
                counter, own_counter = StepCounter.open(counter_path), True
        else:
            live = {
                name: t if isinstance(t, LiveTensor) else from_torch(name, t)
                for name, t in tensors.items()
            }
        if model_dir is None:
            raise TypeError("model_dir is required when live tensors are passed directly")
        if step is not None and (counter is None or dry_run):
            raise PlanError(
                f"step {step} asked for, but "
                + ("a dry run reads no step" if dry_run else "the producer has no step counter")
            )
        options = _Options(
            block_size, dry_run, direct_io, threads, allow_unmatched, progress, durable
        )
        if dry_run:  # writes nothing, so takes no lock and recovers nothing
            result, _ = _run(ModelDir.open(model_dir), live, options, None)
            note = _pending_recovery(gens.Layout(model_dir))
            if note:
                result = replace(result, warnings=[*result.warnings, note])
            return log_result(result)
        if group is not None:
            if not journal:
                raise PlanError("a group sync needs its log (--no-journal is refused)")
            from apollo_sync.group import sync_group

            result = sync_group(
                Path(model_dir),
                live,
                options,
                group,
                keep=keep,
                undo_budget=undo_budget,
                lock_timeout=lock_timeout,
                private_copy=private_copy,
                counter=counter,
                step_retries=step_retries,
                step=step,
                durable=durable,
                started=started,
            )
            return log_result(result)
        result = _sync_locked(
            Path(model_dir),
            live,
            options,
            journal=journal,
            keep=keep,
            undo_budget=undo_budget,
            lock_timeout=lock_timeout,
            private_copy=private_copy,
            counter=counter,
            step_retries=step_retries,
            step=step,
            durable=durable,
            started=started,
        )
        return log_result(result)
    finally:
        if own_counter and counter is not None:
            counter.close()
        if opened is not None and not isinstance(handles, Handles):
            opened.close()


def log_result(result: SyncResult) -> SyncResult:
    """Logs what a sync did (INFO, with its numbers as structured fields for
    ``--log-format json``) and each of its warnings (WARNING); returns it."""
    for w in result.warnings:
        log.warning("%s", w, extra={"event": "sync_warning", "model_dir": result.model_dir})
    fields = {
        "event": "sync",
        "model_dir": result.model_dir,
        "outcome": outcome(result),
        "generation": result.generation,
        "seconds": round(result.seconds, 6),
        "bytes_compared": result.total_compared,
        "bytes_changed": result.total_changed,
        "bytes_written": result.bytes_written,
        "log_bytes": result.log_bytes,
        "elements_changed": result.elements_changed,
        "files_changed": len(result.files_changed),
        "retries": result.retries,
        "recovered": result.recovered,
        "durable": result.durable,
        "stages": {k: round(v, 6) for k, v in result.stages.items()},
    }
    if result.dry_run:
        log.info(
            "%s: dry run: %d bytes would change (%.2f s)",
            result.model_dir,
            result.total_changed,
            result.seconds,
            extra=fields,
        )
    elif result.generation is None:
        log.info("%s: no change (%.2f s)", result.model_dir, result.seconds, extra=fields)
    else:
        log.info(
            "%s: generation %d committed: %d bytes changed in %d file(s), %d elements, "
            "log %d bytes, %.2f s",
            result.model_dir,
            result.generation,
            result.total_changed,
            len(result.files_changed),
            result.elements_changed,
            result.log_bytes,
            result.seconds,
            extra=fields,
        )
    if result.stages:
        log.debug(
            "%s: stages (s): %s",
            result.model_dir,
            ", ".join(
                f"{k} {int(v)}" if k in _COUNTS else f"{k} {v:.3f}"
                for k, v in result.stages.items()
            ),
            extra={"event": "sync_stages", "model_dir": result.model_dir},
        )
    return result


def outcome(result: SyncResult) -> str:
    """``"changed"`` (a generation committed), ``"unchanged"`` or ``"dry_run"``."""
    if result.dry_run:
        return "dry_run"
    return "unchanged" if result.generation is None else "changed"


def _pending_recovery(layout: gens.Layout) -> str | None:
    """Why the files may not be one whole generation now (for a dry run)."""
    if not layout.meta.is_dir():
        return None
    state = gens.load_state(layout)
    uncommitted = [n for n in layout.logs() if n > state.generation]
    if uncommitted:
        return (
            f"an interrupted sync (generation {max(uncommitted)}) awaits recovery: "
            "the files compared may mix two generations (`apollo-sync recover`)"
        )
    return None


#: The entries of ``SyncResult.stages`` that are counts, not seconds.
_COUNTS = frozenset({"barriers", "writeback_spans", "writeback_started"})


@dataclass(frozen=True)
class _Options:
    block_size: int
    dry_run: bool
    direct_io: bool
    threads: int
    allow_unmatched: bool
    progress: bool
    #: The caller waits for the flush: its writeback then starts while the
    #: sync writes (``_core.WRITEBACK_BYTES``). Otherwise it waits for the
    #: commit: writeback beside the writes queued the log's barriers behind it
    #: on the device (H200 host, 5.5 GB every-block step: 1.37 -> 2.83 s;
    #: ``benches/probes/writeback.py``).
    durable: bool = False


def _sync_locked(
    root: Path,
    live: Mapping[str, LiveTensor],
    options: _Options,
    *,
    journal: bool,
    keep: int,
    undo_budget: int | None,
    lock_timeout: float,
    private_copy: bool,
    counter: StepCounter | None,
    step_retries: int,
    step: int | None,
    durable: bool,
    started: float,
) -> SyncResult:
    if journal and options.block_size < LOG_MIN_BLOCK:
        raise PlanError(
            f"block size {options.block_size}: a logged sync needs blocks of at least "
            f"{LOG_MIN_BLOCK} bytes (the log hashes whole 4 KiB units); use a larger "
            "--block-size or --no-journal"
        )
    from apollo_sync.group import refuse_single

    refuse_single(root, "sync")
    # Bad input is refused before the lock file (or anything else) is created;
    # under the lock the directory is read again, after any recovery.
    first = ModelDir.open(root)
    mapping: LayoutMap | None = check_mapping(first, live, allow_unmatched=options.allow_unmatched)
    if not private_copy:
        check_shards(first, private_copy=False)
    layout = gens.Layout(root)
    with gens.ModelLock(root, lock_timeout):
        recovered, warnings = gens.recover_locked(layout)
        if not journal:
            # Written in place with no log: every earlier generation must be on
            # disk first, or a crash could not be told apart.
            failed = gens.wait_flushes(layout)
            if failed:
                warnings += failed
                recovered, more = gens.recover_locked(layout)
                warnings += more
        md = ModelDir.open(root)
        md = check_shards(md, private_copy)
        if md.tensors != first.tensors:
            mapping = None  # another writer changed the headers meanwhile: map again
        state = gens.load_state(layout)
        number = state.generation + 1
        spec = (layout.log_path(number), number) if journal else None

        def attempt() -> tuple[SyncResult, LogWriter | None]:
            try:
                return _run(md, live, options, spec, mapping)
            except BaseException as e:
                note = gens.undo_uncommitted(layout, number)
                if note:
                    e.add_note(note)
                raise

        result, writer, before, retries = read_one_step(
            root,
            layout,
            number,
            attempt,
            counter=counter,
            step=step,
            wait=lock_timeout,
            step_retries=step_retries,
            logged=journal,
        )
        result = replace(
            result,
            recovered=[] if recovered is None else recovered.rolled_back,
            retries=retries,
            step=before,
            warnings=[*warnings, *result.warnings],
        )
        if result.total_changed == 0:
            gens.record_last_sync(layout, result, time.monotonic() - started)
            return result
        committing = time.perf_counter()
        try:
            if writer is not None:
                tensors = gens.tensor_elements(writer.runs(), writer.shards, _tensor_ranges(md))
                generation = gens.commit_logged(
                    layout,
                    writer,
                    bytes_changed=result.total_changed,
                    files=result.files_changed,
                    tensors=tensors,
                )
            else:
                generation = gens.commit_unlogged(
                    layout, number, bytes_changed=result.total_changed, files=result.files_changed
                )
        except BaseException as e:
            gens.undo_unless_committed(layout, number, e)
            raise
        budget = gens.default_budget(root) if undo_budget is None else undo_budget
        result = replace(
            result, stages={**result.stages, "commit": time.perf_counter() - committing}
        )
        return after_commit(
            layout,
            result,
            generation,
            writer,
            durable=durable,
            keep=keep,
            budget=budget,
            started=started,
        )


def read_one_step(
    root: Path,
    layout: gens.Layout,
    number: int,
    attempt: Callable[[], tuple[SyncResult, LogWriter | None]],
    *,
    counter: StepCounter | None,
    step: int | None,
    wait: float,
    step_retries: int,
    logged: bool = True,
) -> tuple[SyncResult, LogWriter | None, int | None, int]:
    """Runs ``attempt`` (the sync of generation ``number``) until the producer's
    step counter shows the same finished step before and after it; returns the
    result, its log writer, that step (None without a counter) and the retries.
    A torn attempt's generation is undone before the next; with ``step`` asked
    for (a group's agreed step), or without a log (nothing to undo), a torn
    attempt raises :class:`TornSyncError` instead of trying again."""
    committed = number - 1
    retries = 0
    while True:
        before = read_step(root, counter, step, wait, committed)
        result, writer = attempt()
        if counter is None or counter.value() == before:
            return result, writer, before, retries
        if not logged:
            raise TornSyncError(
                f"{root}: the producer stepped during a sync without a log; the "
                "files may mix two training steps until the next sync"
            )
        note = gens.undo_uncommitted(layout, number)
        if note:
            raise JournalError(f"{root}: the producer stepped during the sync; {note}")
        if step is not None:  # the step asked for (a group's): no other will do
            raise stepped_away(root, step, counter.value(), committed)
        retries += 1
        if retries > step_retries:
            raise TornSyncError(
                f"{root}: the producer stepped during each of {retries} tries; "
                f"nothing was committed (still generation {committed})"
            )


def read_step(
    root: Path, counter: StepCounter | None, step: int | None, wait: float, committed: int
) -> int | None:
    """The step counter's value before a sync reads the tensors: a finished step
    (waiting up to ``wait`` seconds for one), or, when ``step`` is asked for,
    that step now (else :class:`TornSyncError`)."""
    if counter is None:
        return None
    if step is None:
        return counter.wait_even(wait)
    now = counter.value()
    if now != step:
        raise stepped_away(root, step, now, committed)
    return now


def stepped_away(root: Path, step: int, now: int, committed: int) -> TornSyncError:
    where = "inside a step" if now % 2 else f"at step {now}"
    return TornSyncError(
        f"{root}: the sync was to read the producer at step {step}, but it is now {where}; "
        f"nothing was committed (still generation {committed})"
    )


def after_commit(
    layout: gens.Layout,
    result: SyncResult,
    generation: gens.Generation,
    writer: LogWriter | None,
    *,
    durable: bool,
    keep: int,
    budget: int,
    started: float,
) -> SyncResult:
    """What follows a generation's commit: old logs are pruned (a failure is a
    warning: the generation is committed all the same), the shards it wrote are
    flushed in the background (waited for when ``durable``), and the sync is
    recorded in ``last_sync.json``.

    Without ``durable``, pruning comes before the flush starts: its ``fsync`` of
    the state would otherwise queue behind that flush on the device (0.10-0.13 s
    after a 586 MB step on the CPU machine, against 1 ms before it), and it
    drops only logs at or before the checkpoint, which the flush only moves once
    it is waited for. With ``durable`` the flush is waited for first, so pruning
    already sees this generation on disk."""
    root, number = layout.root, generation.number
    t0 = time.perf_counter()
    result = replace(
        result,
        generation=number,
        log_bytes=generation.log_bytes,
        elements_changed=generation.elements_changed,
        durable=writer is None,
    )
    flush = writer is not None
    if flush and durable:
        gens.start_flush(layout, number, [root / f for f in result.files_changed])
        failed = gens.wait_flushes(layout, number)
        if failed:
            raise SyncIOError(f"{root}: generation {number} is committed, but {failed[0]}")
        result = replace(result, durable=True)
    try:
        gens.prune_locked(layout, keep, budget)
    except (ApolloSyncError, OSError) as e:
        result = replace(
            result,
            warnings=[*result.warnings, f"pruning old logs failed ({e}); retried next time"],
        )
    if flush and not durable:
        gens.start_flush(layout, number, [root / f for f in result.files_changed])
    result = replace(result, stages={**result.stages, "after_commit": time.perf_counter() - t0})
    gens.record_last_sync(layout, result, time.monotonic() - started)
    return result


def _tensor_ranges(md: ModelDir) -> list[tuple[str, str, int, int]]:
    names = [Path(h.path).name for h in md.headers]
    return [(names[t.shard], t.name, t.start, t.end) for t in md.tensors.values()]


def _run(
    md: ModelDir,
    live: Mapping[str, LiveTensor],
    options: _Options,
    log: tuple[Path, int] | None,
    mapping: LayoutMap | None = None,
) -> tuple[SyncResult, LogWriter | None]:
    """Streams the live bytes into the core; returns the result and the log to
    commit (None without one, or when nothing changed)."""
    block_size, dry_run = options.block_size, options.dry_run
    opened = time.perf_counter()
    mapping, placements = plan(md, live, allow_unmatched=options.allow_unmatched, mapping=mapping)
    used = sorted({p.shard for p in placements})
    local = {shard: i for i, shard in enumerate(used)}
    syncer = Syncer(
        [(md.headers[s].path, md.headers[s].data_start, md.headers[s].file_len) for s in used],
        block_size=block_size,
        dry_run=dry_run,
        direct_io=options.direct_io,
        threads=options.threads,
        log=log,
        writeback_bytes=WRITEBACK_BYTES if options.durable else 0,
    )
    placements = [Placement(local[p.shard], p.offset, p.live) for p in placements]
    total = sum(p.live.nbytes for p in placements)
    disk_before = _disk_sectors_written(md.path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    t0 = time.perf_counter()
    bar = _progress_bar(total, options.progress)
    try:
        # the tensors of a set of ranks are assembled from every rank (tp.py)
        stream = stream_ranks if any(is_sharded(p.live) for p in placements) else stream_into
        stream(
            syncer,
            placements,
            progress=bar.update if bar else None,
            parallel_shards=log is not None,
        )
        streamed = time.perf_counter()
        reports = syncer.finish()
    except BaseException:
        syncer.abort()  # nothing it queued is written once this returns
        raise
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - t0
    stages = {"open": t0 - opened, "stream": streamed - t0, **dict(syncer.timings())}
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
            elements_changed=r.elements_changed,
            direct_io_fallback=r.direct_io_fallback,
        )
        for r in reports
    ]
    warnings = list(mapping.warnings)
    warnings += [
        f"{f.file}: direct I/O unavailable, wrote through the page cache "
        f"({f.direct_io_fallback}); device writes may exceed the changed bytes"
        for f in files
        if f.direct_io_fallback
    ]
    buffered = sum(f.bytes_written_buffered for f in files)
    writer = syncer.log_writer()
    logged = writer is not None and writer.path.exists()
    log_size = writer.path.stat().st_size if writer is not None and logged else 0
    expected = sum(f.bytes_written for f in files) + log_size
    if buffered and disk is not None and disk > AMPLIFIED * expected + AMPLIFIED_SLACK:
        advice = (
            "direct I/O was refused here (see the other warning)"
            if options.direct_io
            else "--direct-io writes exactly the changed blocks"
        )
        warnings.append(
            f"the disk wrote {disk / 1e6:.1f} MB during a sync that wrote "
            f"{expected / 1e6:.1f} MB through the page cache: this filesystem may write "
            f"back whole folios (or another process wrote meanwhile); {advice}"
        )
    missing = sorted(p.live_name for p in mapping.problems)
    result = SyncResult(
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
        warnings=warnings,
        files=files,
        missing=missing,
        elements_changed=sum(f.elements_changed for f in files),
        stages=stages,
    )
    return result, (writer if logged else None)


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
