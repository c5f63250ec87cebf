"""Generations of a model directory: the lock, the XOR-delta logs, the
checkpoint, recovery, history, rollback and pruning.

Every logged sync that changes something makes a new *generation* N. Its log
(``log/<N>.xlog``, written by the Rust core) holds, for every run of blocks it
changed, the XOR of the old and new bytes (encoded element by element) and the
hash of every 4 KiB unit after; no byte is written in place before the record
covering it is durable. The generation is committed by a commit record at the
end of its log (the record count and a hash over the records). The in-place
writes go through the page cache; the shards are made durable in the background
after the commit, and only then does the *checkpoint* K (the last generation the
files hold on disk by themselves) advance: ``log/<N>.flushed`` marks it.

What a reader can rely on:

- when a sync returns, the files are current through the page cache of this host;
- after a power cut they are whole only once recovery has run (cheap when K is
  the last commit): recovery walks every unit touched after K, finds which state
  of its chain it holds (sector by sector if torn), and brings it to the last
  committed generation, rolling uncommitted work back. Every writer recovers
  first; a loader runs ``apollo-sync recover`` or reads inside
  :func:`reading`, which also holds syncs off while it reads;
- ``durable=True`` syncs return only once K has reached their generation.

A committed generation keeps its log as a rollback point until pruning drops it
(``keep`` generations and a byte budget; never past K). Rolling back to M walks
the deltas of M+1..N back, itself as a new logged generation.

The core owns these files (``rust/core/src/log/``: ``state.rs``, ``commit.rs``,
``recovery.rs``, ``rollback.rs``, ``prune.rs``); this module holds the lock, this process's
background flushes (which recovery asks about through a callback), and the
Python API over them.

Layout, under ``<model-dir>/.apollo_sync/``::

    lock            flock()ed: exclusively by writers, shared by readers
    state.json      the history, the generation and the checkpoint (a cache of what
                    the logs say, replaced atomically after each commit)
    log/<N>.xlog    generation N's deltas and commit record (docs/FORMAT.md)
    log/<N>.flushed the shards were durable with generation N (the checkpoint)
    last_sync.json  a report of the last sync that ran to its end (not state)
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import operator
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from apollo_sync import _core
from apollo_sync._core import (
    FAULTS,
    GenerationFlush,
    LogWriter,
    read_log,
)
from apollo_sync.errors import (
    ApolloSyncError,
    LockedError,
    PlanError,
    RollbackError,
    ShardChangedError,
)
from apollo_sync.model_dir import ModelDir
from apollo_sync.shards import check_shards

STATE_DIRNAME = ".apollo_sync"
#: The group file, in ``.apollo_sync/``, of a directory several hosts write together.
GROUP_FILENAME = "group.json"
#: Generations whose logs are kept, by default.
DEFAULT_KEEP = 20
#: Log bytes kept, by default, as a fraction of the model's size. An APOLLO step
#: logs 0.6-3.4% of the model, so this keeps the DEFAULT_KEEP newest; an AdamW step
#: at lr 1e-5 logs 5.4-7.9%, so 6-9 of them (BENCHMARKS.md).
DEFAULT_BUDGET_FRACTION = 0.5
#: Seconds a writer waits for another one to finish, by default.
DEFAULT_LOCK_TIMEOUT = 60.0
#: Generations listed in ``state.json`` at most, besides those whose log is kept
#: (never dropped; the core's ``log/state.rs``).
HISTORY_LIMIT: int = _core.HISTORY_LIMIT
#: Seconds :func:`reading` waits for a writer's background flush to reach the
#: checkpoint before it recovers instead.
FLUSH_WAIT = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One committed state of the directory, and how it was reached."""

    number: int
    #: Commit time (seconds since the epoch).
    time: float
    #: "sync" or "rollback".
    kind: str
    #: Bytes of the blocks this generation overwrote.
    bytes_changed: int
    #: Bytes of its log (0 once pruned, or when synced without one).
    log_bytes: int
    #: Whether its log is kept, so a rollback can go back past it.
    log: bool
    #: Elements whose bytes changed.
    elements_changed: int = 0
    files: list[str] = field(default_factory=list)
    #: Elements changed per tensor touched, while its log is kept; dropped with
    #: it, leaving only their number.
    tensors: dict[str, int] = field(default_factory=dict)
    rollback_to: int | None = None
    #: How many tensors it touched, once ``tensors`` was dropped (None before).
    tensor_count: int | None = None

    @property
    def touched(self) -> int:
        """The number of tensors it touched."""
        return len(self.tensors) if self.tensor_count is None else self.tensor_count

    def to_dict(self) -> dict[str, Any]:
        # fields are plain values, lists and dicts of them: no need for asdict's deep copy
        return {
            k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
            for k, v in vars(self).items()
        }


@dataclass
class State:
    """The committed generation, the checkpoint and what led to them."""

    generation: int = 0
    #: Every generation up to this one was durable in the shards themselves.
    checkpoint: int = 0
    history: list[Generation] = field(default_factory=list)

    def find(self, number: int) -> Generation | None:
        for g in self.history:
            if g.number == number:
                return g
        return None


class History:
    """The generations of a model directory, oldest first: iterate, ``len``,
    look one up by its number (``history[7]``, ``7 in history``)."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._by_number = {g.number: g for g in state.history}

    @property
    def generation(self) -> int:
        """The current (last committed) generation; 0 before the first sync."""
        return self._state.generation

    @property
    def checkpoint(self) -> int:
        """The last generation the files hold on disk by themselves."""
        return self._state.checkpoint

    @property
    def history(self) -> list[Generation]:
        return list(self._state.history)

    def rollback_points(self) -> list[int]:
        """Generations :func:`rollback` can restore, newest first: each one whose
        later generations all kept their logs."""
        points: list[int] = []
        for g in reversed(self._state.history):
            if not g.log:
                break
            points.append(g.number - 1)
        return [p for p in points if p >= 0]

    def __iter__(self) -> Iterator[Generation]:
        return iter(self._state.history)

    def __len__(self) -> int:
        return len(self._state.history)

    def __getitem__(self, number: int) -> Generation:
        try:
            return self._by_number[number]
        except KeyError:
            raise KeyError(f"no generation {number} in the history") from None

    def __contains__(self, number: object) -> bool:
        return number in self._by_number

    def __repr__(self) -> str:
        return (
            f"History(generation={self.generation}, checkpoint={self.checkpoint}, "
            f"generations={len(self)})"
        )


class Layout:
    """Where the generation files of one model directory live: under
    ``.apollo_sync/``, or, for host ``host`` of a group of consumers that commit
    together (:mod:`apollo_sync.group`), under ``.apollo_sync/hosts/<host>/``
    (the same files, covering only the shards that host owns)."""

    def __init__(self, model_dir: str | os.PathLike[str], host: int | None = None) -> None:
        self.root = Path(model_dir)
        self.host = host
        self.top = self.root / STATE_DIRNAME
        self.meta = self.top if host is None else self.top / "hosts" / str(host)
        self.log_dir = self.meta / "log"
        self.state_path = self.meta / "state.json"
        self.lock_path = self.meta / "lock"

    @property
    def last_sync_path(self) -> Path:
        return self.meta / "last_sync.json"

    @property
    def group_path(self) -> Path:
        """The group file of a directory written by several hosts together."""
        return self.top / GROUP_FILENAME

    def log_path(self, number: int) -> Path:
        return self.log_dir / f"{number}.xlog"

    def marker_path(self, number: int) -> Path:
        return self.log_dir / f"{number}.flushed"

    def ensure(self) -> None:
        """Creates the directories (private to the user), durably (the core's
        ``GenDir::ensure``: every entry fsynced every time, since a process
        killed between a mkdir and its fsync leaves a directory that exists but
        might not survive a power loss)."""
        _core.ensure_dirs(self.root, self.meta)

    def logs(self) -> dict[int, Path]:
        """Logs present, by generation number."""
        return self._numbered("*.xlog")

    def flushed(self) -> int:
        """The highest generation marked durable in the shards (0 if none)."""
        return max(self._numbered("*.flushed"), default=0)

    def _numbered(self, pattern: str) -> dict[int, Path]:
        found: dict[int, Path] = {}
        if self.log_dir.is_dir():
            for p in self.log_dir.glob(pattern):
                with contextlib.suppress(ValueError):
                    found[int(p.stem)] = p
        return found


# ---------------------------------------------------------------------------
# Fault injection (the Python side of the crash tests; see the core's faults.rs)
# ---------------------------------------------------------------------------

_fault_counts: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Kills the process, or raises the injected OSError, at the n-th time
    ``point`` is reached, as ``APOLLO_SYNC_CRASH_AT`` / ``APOLLO_SYNC_FAIL_AT``
    ask. A no-op unless one of them is set, and in a build without the core's
    ``faults`` feature (a release wheel)."""
    if not FAULTS:  # a build without the `faults` feature injects nothing
        return
    crash = os.environ.get("APOLLO_SYNC_CRASH_AT")
    fail = os.environ.get("APOLLO_SYNC_FAIL_AT")
    if not crash and not fail:
        return
    n = _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if crash and crash.split(":")[:2] == [point, str(n)]:
        os.kill(os.getpid(), signal.SIGKILL)
    if fail:
        parts = fail.split(":")
        if parts[:2] == [point, str(n)] and len(parts) == 3:
            code = int(parts[2])
            raise OSError(code, os.strerror(code))


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------


class ModelLock:
    """A ``flock`` on ``<model-dir>/.apollo_sync/lock``: exclusive for writers,
    shared for readers (:func:`reading`).

    The kernel drops the lock when its holder exits, however it exits, so a
    lock left by a dead process is simply taken: there is no stale state to
    clean. An exclusive holder writes its pid in the file for the message
    others see.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        timeout: float = DEFAULT_LOCK_TIMEOUT,
        *,
        shared: bool = False,
        host: int | None = None,
    ):
        self.layout = Layout(model_dir, host)
        self.timeout = timeout
        self.shared = shared
        self._fd: int | None = None

    def __enter__(self) -> ModelLock:
        self.layout.ensure()
        fd = os.open(self.layout.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = fd
        try:
            self._take(fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            self._fd = None
            raise
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
        return self

    def _take(self, mode: int) -> None:
        assert self._fd is not None
        deadline = time.monotonic() + max(self.timeout, 0.0)
        told = False
        while True:
            try:
                fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not told and self.timeout > 0:
                    told = True
                    log.info(
                        "%s: waiting up to %g s for another apollo-sync%s",
                        self.layout.root,
                        self.timeout,
                        _read_holder(self._fd),
                        extra={"event": "lock_wait", "model_dir": str(self.layout.root)},
                    )
                if time.monotonic() >= deadline:
                    holder = _read_holder(self._fd)
                    what = "read" if mode == fcntl.LOCK_EX and self.shared else "written"
                    raise LockedError(
                        f"{self.layout.root} is being {what} by another apollo-sync"
                        f"{holder}; gave up after {self.timeout:g} s "
                        "(raise --lock-timeout to wait longer)"
                    ) from None
                time.sleep(0.05)

    def downgrade(self) -> None:
        """Exclusive to shared (not atomic: a writer may slip in between)."""
        self._take(fcntl.LOCK_SH)
        self.shared = True

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        pid, since = os.pread(fd, 64, 0).decode().split()
        return f" (pid {pid}, since {time.strftime('%H:%M:%S', time.localtime(int(since)))})"
    except (OSError, ValueError):
        return ""


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


def load_state(layout: Layout) -> State:
    """The committed state (generation 0 with no history when there is none),
    as the core reads ``state.json`` (``log/state.rs``: a state file of
    apollo_sync 0.1 reads as a history without rollback points)."""
    generation, checkpoint, history = _core.load_state(layout.root, layout.meta)
    return State(generation, checkpoint, [Generation(**g) for g in history])


def record_last_sync(layout: Layout, result: Any, wall_seconds: float) -> None:
    """Writes ``last_sync.json``: when the last sync that ran to its end (changed
    something or not) ran, what it found and how long it took (what
    ``apollo-sync status`` shows; the history only lists syncs that changed
    something). Replaced whole (temp file and rename); not made durable, and a
    failure to write it is logged, not raised: it is a report, not state."""
    body = {
        "time": time.time(),
        "generation": result.generation,
        "seconds": result.seconds,
        "wall_seconds": wall_seconds,
        "bytes_compared": result.total_compared,
        "bytes_changed": result.total_changed,
        "bytes_written": result.bytes_written,
        "log_bytes": result.log_bytes,
        "elements_changed": result.elements_changed,
        "files_changed": len(result.files_changed),
        "retries": result.retries,
        "step": getattr(result, "step", None),
        "warnings": len(result.warnings),
        "stages": dict(getattr(result, "stages", {})),
    }
    tmp = layout.meta / f"last_sync.json.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, layout.last_sync_path)
    except OSError as e:
        log.debug("could not write %s: %s", layout.last_sync_path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_last_sync(layout: Layout) -> dict[str, Any] | None:
    """What :func:`record_last_sync` wrote (None if nothing, or unreadable)."""
    try:
        body = json.loads(layout.last_sync_path.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def fsync_dir(path: Path) -> None:
    """Makes ``path``'s entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Makes ``path``'s bytes durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# The background flush (this process's own)
# ---------------------------------------------------------------------------


# This process's flushes (``_core.GenerationFlush``: the core's
# ``flush/generation.rs`` flushes each after its predecessor and marks the
# checkpoint).
_flush_lock = threading.Lock()
_flushes: dict[str, list[GenerationFlush]] = {}


def _forget_flushes_in_child() -> None:
    """A forked child has none of the parent's threads: the flushes it inherited
    run on in the parent only, so the child forgets them (its recovery then goes
    by the markers and the logs, as after any other process's sync)."""
    global _flush_lock, _flushes
    _flush_lock = threading.Lock()
    _flushes = {}


os.register_at_fork(after_in_child=_forget_flushes_in_child)


def _key(layout: Layout) -> str:
    return os.path.realpath(layout.meta)


def start_flush(layout: Layout, number: int, paths: list[Path]) -> None:
    """Flushes ``paths`` for generation ``number`` in the background."""
    with _flush_lock:
        mine = _flushes.setdefault(_key(layout), [])
        after = mine[-1] if mine else None
        mine.append(GenerationFlush(number, paths, layout.marker_path(number), after))


def wait_flushes(layout: Layout, upto: int | None = None) -> list[str]:
    """Waits for this process's flushes of generations up to ``upto`` (all by
    default); returns what failed (the checkpoint did not advance past it)."""
    with _flush_lock:
        mine = _flushes.get(_key(layout), [])
        done = [f for f in mine if upto is None or f.number <= upto]
        _flushes[_key(layout)] = [f for f in mine if f not in done]
    errors = []
    for f in done:
        e = f.wait()
        if e is not None:
            errors.append(
                f"making generation {f.number} durable failed ({e}); its bytes are "
                "rewritten from the log"
            )
    return errors


def _flush_running(layout: Layout) -> bool:
    with _flush_lock:
        return any(f.running for f in _flushes.get(_key(layout), []))


def _pending_flush(layout: Layout) -> int:
    """The newest generation this process is still flushing, and that has not
    failed (0 if none)."""
    with _flush_lock:
        mine = _flushes.get(_key(layout), [])
        return max((f.number for f in mine if f.error is None), default=0)


@atexit.register
def _flush_at_exit() -> None:
    with _flush_lock:
        pending = [f for fs in _flushes.values() for f in fs]
    for f in pending:
        f.wait()


def checkpoint(layout: Layout, state: State) -> int:
    """The checkpoint: the last generation the shards hold on disk by themselves."""
    return max(state.checkpoint, layout.flushed())


# ---------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    """What recovery did."""

    #: The generation the directory is at afterwards.
    generation: int
    #: Uncommitted generations rolled back.
    rolled_back: list[int]
    #: Committed generations whose in-place writes were checked (and redone).
    rolled_forward: list[int]
    units: int
    units_written: int
    torn: int
    bytes_written: int
    files: list[str]


def recover_locked(layout: Layout, limit: int | None = None) -> tuple[Recovered | None, list[str]]:
    """Brings the directory to its last committed generation with the shards
    durable, whatever was interrupted, and cleans up leftovers (the core's
    ``log/recovery.rs``). Returns what it did (None when there was nothing to
    do) and warnings (failed background flushes of this process, now redone).
    The caller holds the exclusive lock.

    The flush this process may still be running for the last generation is left
    to go on (it will mark the checkpoint); any older one is waited for.

    ``limit`` (one host of a group, :mod:`apollo_sync.group`): the generation the
    group committed. A generation this host committed past it was prepared but
    never committed by the group: it is rolled back through its records like an
    uncommitted one, and the checkpoint is taken as no later than ``limit``."""
    warnings: list[str] = []

    def settle(generation: int, ahead: bool) -> bool:
        """This process's flushes, once recovery knows the last committed
        generation: returns whether the flush of that generation goes on."""
        if ahead:  # none of this host's flushes may go on
            warnings.extend(wait_flushes(layout))
            return False
        warnings.extend(wait_flushes(layout, generation - 1))
        if not _flush_running(layout):
            warnings.extend(wait_flushes(layout))  # finished: collect its error, if any
        if _pending_flush(layout) == generation and not warnings:
            return True  # this process is flushing it: not a crash
        warnings.extend(wait_flushes(layout))
        return False

    try:
        done = _core.recover_generations(layout.root, layout.meta, settle, limit)
    except ShardChangedError as e:
        e.add_note(
            f"if the files were replaced on purpose, remove {layout.meta} to start a new "
            "history (its rollback points are lost with it)"
        )
        raise
    if done is None:
        return None, warnings
    recovered = Recovered(
        generation=done.generation,
        rolled_back=list(done.rolled_back),
        rolled_forward=list(done.rolled_forward),
        units=done.units,
        units_written=done.units_written,
        torn=done.torn,
        bytes_written=done.bytes_written,
        files=list(done.files),
    )
    log.warning(
        "%s: recovered to generation %d: rolled back %s, checked %s; %d of %d unit(s) "
        "rewritten, %d torn",
        layout.root,
        recovered.generation,
        recovered.rolled_back or "nothing",
        recovered.rolled_forward or "nothing",
        recovered.units_written,
        recovered.units,
        recovered.torn,
        extra={"event": "recovered", "model_dir": str(layout.root), **vars(recovered)},
    )
    return recovered, warnings


def _log_warnings(layout: Layout, warnings: list[str]) -> None:
    """Logs what recovery reported to a caller that returns no list of warnings."""
    for w in warnings:
        log.warning("%s: %s", layout.root, w, extra={"event": "warning"})


def recover(
    model_dir: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> Recovered | None:
    """Brings ``model_dir`` to its last committed generation, durable on disk, if a
    sync, rollback or prune was interrupted or the host lost power since the last
    sync. Loaders call this (``apollo-sync recover``) before reading, or read
    inside :func:`reading`."""
    layout = Layout(model_dir)
    if not layout.meta.is_dir():
        return None
    from apollo_sync import group

    g = group.read_group(model_dir)
    if g is not None:  # every host's part, up to what the group committed
        return group.recover(Path(model_dir), g, lock_timeout)
    with ModelLock(model_dir, lock_timeout):
        # this process's own first: then the markers say what is on disk
        failed = wait_flushes(layout)
        done, warnings = recover_locked(layout)
        _log_warnings(layout, failed + warnings)
        return done


@contextlib.contextmanager
def reading(
    model_dir: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> Iterator[History]:
    """A stable view of ``model_dir`` for a loader (or ``rsync``): recovers if
    needed, then holds syncs off (a shared lock every writer honours) until the
    block ends. Yields the history, whose ``generation`` is what the files hold.

    >>> with apollo_sync.reading("/models/Qwen3-8B") as h:  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained("/models/Qwen3-8B")
    """
    layout = Layout(model_dir)
    from apollo_sync import group

    g = group.read_group(model_dir)
    if g is not None:
        with group.reading(Path(model_dir), g, lock_timeout) as h:
            yield h
        return
    with ModelLock(model_dir, lock_timeout, shared=True):
        if not _needs_recovery(layout, min(lock_timeout, FLUSH_WAIT)):
            yield history(model_dir)
            return
    with ModelLock(model_dir, lock_timeout) as lock:
        _log_warnings(layout, recover_locked(layout)[1])
        lock.downgrade()
        yield history(model_dir)


def _needs_recovery(layout: Layout, wait: float) -> bool:
    """Whether the files may not be one whole generation on disk: an uncommitted
    log, or a checkpoint behind the last commit that does not catch up within
    ``wait`` seconds (the writer's background flush, normally seconds)."""
    if not layout.meta.is_dir():
        return False
    state = load_state(layout)
    if any(n > state.generation for n in layout.logs()):
        return True
    deadline = time.monotonic() + wait
    while checkpoint(layout, state) < state.generation:
        if _pending_flush(layout):  # this process's own flush
            _log_warnings(layout, wait_flushes(layout))  # a failure: redone by recovery
            continue
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# Committing, history, pruning, rollback
# ---------------------------------------------------------------------------


def tensor_elements(
    runs: Sequence[tuple[int, int, int, int]],
    shards: Sequence[str],
    tensors: Sequence[tuple[str, str, int, int]],
) -> dict[str, int]:
    """Elements changed per tensor, from a log's runs ``(shard index, offset,
    length, elements)``.

    ``tensors`` is ``(shard file name, tensor name, start, end)`` with absolute
    file offsets. A sync's runs each lie in one tensor (the core splits a block
    that tensors share into one run per tensor, counted at its width); a run
    across tensors (a rollback's copy of such a block) is shared between them in
    proportion to the bytes it covers of each."""
    by_shard: dict[str, list[tuple[int, int, str]]] = {}
    for shard, name, start, end in tensors:
        if end > start:  # an empty tensor has no byte to touch
            by_shard.setdefault(shard, []).append((start, end, name))
    if not runs:
        return {}
    arr = np.asarray(runs, dtype=np.int64)  # (shard index, offset, length, elements)
    found: dict[str, int] = {}
    for index, shard in enumerate(shards):
        ranges = sorted(by_shard.get(shard, []))
        mine = arr[arr[:, 0] == index]
        if not ranges or not len(mine):
            continue
        starts = np.array([r[0] for r in ranges], dtype=np.int64)
        ends = np.array([r[1] for r in ranges], dtype=np.int64)
        # tensors [first, last) overlap a run: the first ending after its start,
        # up to the first starting at or after its end
        first = np.searchsorted(ends, mine[:, 1], side="right")
        last = np.searchsorted(starts, mine[:, 1] + mine[:, 2], side="left")
        # A run inside one tensor (nearly all): summed per tensor at once.
        one = last - first == 1
        sums = np.bincount(first[one], weights=mine[one, 3], minlength=len(ranges))
        for t in np.flatnonzero(sums).tolist():
            name = ranges[t][2]
            found[name] = found.get(name, 0) + int(sums[t])
        for (_, off, length, elements), a, b in zip(
            mine[~one].tolist(), first[~one].tolist(), last[~one].tolist(), strict=True
        ):
            for k in range(a, b):
                lo, hi, name = ranges[k]
                share = (min(hi, off + length) - max(lo, off)) / length
                found[name] = found.get(name, 0) + round(elements * share)
    return found


def commit_logged(
    layout: Layout,
    writer: LogWriter,
    *,
    bytes_changed: int,
    files: list[str],
    tensors: dict[str, int],
    rollback_to: int | None = None,
) -> Generation:
    """Commits the generation ``writer`` logged: its commit record (the commit
    point), then its entry in ``state.json`` (the core's ``log/commit.rs``)."""
    entry = _core.commit_logged(
        layout.root,
        layout.meta,
        writer,
        bytes_changed=bytes_changed,
        files=files,
        tensors=tensors,
        rollback_to=rollback_to,
    )
    return Generation(**entry)


def commit_unlogged(
    layout: Layout, number: int, *, bytes_changed: int, files: list[str]
) -> Generation:
    """Commits generation ``number``, synced without a log (its shards already
    durable): its entry, and the checkpoint moved to it."""
    entry = _core.commit_unlogged(
        layout.root, layout.meta, number, bytes_changed=bytes_changed, files=files
    )
    return Generation(**entry)


def prune_locked(layout: Layout, keep: int, max_bytes: int | None) -> list[int]:
    """Drops the logs of old generations beyond ``keep`` of them or beyond
    ``max_bytes`` in total (the newest is always kept, and none after the
    checkpoint; the core's ``log/prune.rs``). Returns the generations pruned."""
    drop: list[int] = _core.prune(layout.root, layout.meta, keep, max_bytes)
    if drop:
        log.info(
            "%s: dropped the logs of generation(s) %s",
            layout.root,
            drop,
            extra={"event": "pruned", "model_dir": str(layout.root), "generations": drop},
        )
    return drop


#: The largest count or byte budget the core takes (a u64).
_U64 = 1 << 64


def whole(value: object, what: str, error: type[ApolloSyncError]) -> int:
    """``value`` as a whole number in 0..2**64 (an ``int``, or anything with
    ``__index__`` such as a numpy integer), or ``error``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        n = -1
    if not 0 <= n < _U64:
        raise error(f"{what} {value!r}: a whole number ≥ 0 is needed")
    return n


def check_retention(keep: int, max_bytes: int | None) -> None:
    """Refuses a retention that is not a count and a byte budget (whole
    numbers ≥ 0), before anything is written: a sync would otherwise fail at its
    pruning, after its commit."""
    whole(keep, "keep", PlanError)
    if max_bytes is not None:
        whole(max_bytes, "undo budget", PlanError)


def default_budget(model_dir: str | os.PathLike[str]) -> int:
    """The default log byte budget: half the size of the model's shards."""
    size = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return int(DEFAULT_BUDGET_FRACTION * size)


def prune(
    model_dir: str | os.PathLike[str],
    *,
    keep: int = DEFAULT_KEEP,
    max_bytes: int | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> list[int]:
    """Drops old rollback points (see :func:`prune_locked`); ``max_bytes``
    defaults to :func:`default_budget`."""
    from apollo_sync.group import refuse_single

    refuse_single(model_dir, "prune (each host prunes its own logs after its syncs)")
    check_retention(keep, max_bytes)
    with ModelLock(model_dir, lock_timeout):
        layout = Layout(model_dir)
        _log_warnings(layout, recover_locked(layout)[1])
        budget = default_budget(model_dir) if max_bytes is None else max_bytes
        return prune_locked(layout, keep, budget)


def history(model_dir: str | os.PathLike[str]) -> History:
    """The generations of ``model_dir`` (read without the lock: ``state.json`` is
    only ever replaced whole). A generation committed by a sync that was killed
    before it wrote ``state.json`` appears once the next writer has recovered."""
    from apollo_sync import group

    g = group.read_group(model_dir)
    if g is not None:  # the hosts' entries merged (apollo_sync.group.history)
        return group.history(Path(model_dir), g)
    layout = Layout(model_dir)
    state = load_state(layout)
    return History(replace(state, checkpoint=checkpoint(layout, state)))


def rollback(
    model_dir: str | os.PathLike[str],
    to: int,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Generation:
    """Restores ``model_dir`` to generation ``to`` exactly, as a new logged
    generation (itself undoable). Needs the log of every generation after ``to``;
    checks every record and every byte it will touch before its first write."""
    from apollo_sync.group import refuse_single

    refuse_single(model_dir, "rollback (a group cannot roll back yet)")
    layout = Layout(model_dir)
    with ModelLock(model_dir, lock_timeout):
        _log_warnings(layout, recover_locked(layout)[1])
        # the flush recovery left running (this process's last sync): a failure
        # leaves no marker, so the next recovery redoes it from the logs
        _log_warnings(layout, wait_flushes(layout))
        check_shards(ModelDir.open(model_dir), private_copy=False)
        number = load_state(layout).generation + 1
        try:  # the core checks the rest, as a u64
            target = whole(to, "generation", RollbackError)
        except RollbackError:
            raise RollbackError(
                f"{model_dir}: cannot roll back to generation {to!r}: the current "
                f"generation is {number - 1}"
            ) from None
        try:  # the core's log/rollback.rs: checks, walks the deltas back, commits
            generation = Generation(**_core.rollback_generations(layout.root, layout.meta, target))
        except BaseException as e:
            undo_unless_committed(layout, number, e)
            raise
        log.info(
            "%s: rolled back to generation %d as generation %d (%d bytes restored)",
            model_dir,
            to,
            number,
            generation.bytes_changed,
            extra={
                "event": "rollback",
                "model_dir": str(model_dir),
                "generation": number,
                "rollback_to": to,
                "bytes_changed": generation.bytes_changed,
            },
        )
        return generation


def undo_unless_committed(layout: Layout, number: int, error: BaseException) -> None:
    """After a failure while committing generation ``number``: if its log does
    not hold a valid commit, puts back what it wrote (noting on ``error`` if
    that cannot be done now)."""
    try:
        committed = read_log(layout.log_path(number)).committed
    except (ApolloSyncError, OSError):
        committed = False
    if committed:
        error.add_note(
            f"generation {number} is committed all the same (its log holds the commit "
            "record): the next recovery completes what failed after it"
        )
        return
    note = undo_uncommitted(layout, number)
    if note:
        error.add_note(note)


def undo_uncommitted(layout: Layout, number: int) -> str | None:
    """After a failed sync or rollback of this process: rolls back what its
    uncommitted log covers. Returns None when done (or when it wrote nothing);
    otherwise why it could not (the disk is gone, say): the log then stays for
    the next recovery."""
    path = layout.log_path(number)
    try:
        _core.undo_uncommitted(layout.root, layout.meta, number)
    except (ApolloSyncError, OSError) as e:
        return (
            f"could not yet put back what generation {number} wrote ({e}); its log "
            f"{path} stays, and `apollo-sync recover` (or the next sync) will undo it"
        )
    return None
