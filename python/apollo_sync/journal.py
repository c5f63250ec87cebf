"""Generations of a model directory: the lock, the undo journals, recovery,
history, rollback and pruning.

Every journaled sync that changes something makes a new *generation*. Its undo
journal holds the old bytes of every block it overwrote, made durable before
the first in-place write (by the Rust core); the generation is committed by
one atomic rename of ``state.json``. So at any instant the directory is either
the last committed generation, or that generation plus some in-place writes
that the uncommitted journal undoes. Recovery (at the start of every sync,
``apollo-sync recover``, :func:`recover`) applies such a journal and deletes it.

A committed generation keeps its journal as a rollback point until pruning
drops it (``keep`` generations and an undo byte budget). Rolling back to
generation M undoes the journals of M+1..N, itself as a new journaled
generation, so a rollback can be interrupted and rolled back too.

Layout, under ``<model-dir>/.apollo_sync/``::

    lock            flock()ed by whoever writes: sync, recover, rollback, prune
    state.json      the committed generation and the history (replaced atomically)
    undo/<N>.undo   the old bytes generation N overwrote (undoes N back to N-1)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from apollo_sync._core import JournalInfo, read_journal, rollback_journals, undo_journal
from apollo_sync.errors import ApolloSyncError, JournalError, LockedError, RollbackError
from apollo_sync.model_dir import ModelDir
from apollo_sync.shards import check_shards

STATE_DIRNAME = ".apollo_sync"
FORMAT = 1
#: Generations whose undo data is kept, by default.
DEFAULT_KEEP = 20
#: Undo data kept, by default, as a fraction of the model's size.
DEFAULT_BUDGET_FRACTION = 0.10
#: Seconds a writer waits for another one to finish, by default.
DEFAULT_LOCK_TIMEOUT = 60.0
#: Generations listed in ``state.json`` at most, besides those whose undo data is
#: kept (never dropped). The file is rewritten at every commit, so it must not
#: grow with the number of syncs a training run makes.
HISTORY_LIMIT = 256


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
    #: Old bytes kept to undo it (0 once pruned).
    undo_bytes: int
    #: Whether its undo journal is kept, so a rollback can go back past it.
    undo: bool
    files: list[str] = field(default_factory=list)
    #: Names of the tensors it touched, while its undo data is kept (a rollback
    #: reports them); dropped with that data, leaving only their number.
    tensors: list[str] = field(default_factory=list)
    rollback_to: int | None = None
    #: How many tensors it touched, once ``tensors`` was dropped (None before).
    tensor_count: int | None = None

    @property
    def touched(self) -> int:
        """The number of tensors it touched."""
        return len(self.tensors) if self.tensor_count is None else self.tensor_count

    def to_dict(self) -> dict[str, Any]:
        # fields are plain values and lists of them: no need for asdict's deep copy
        return {k: list(v) if isinstance(v, list) else v for k, v in vars(self).items()}


@dataclass
class State:
    """The committed generation and what led to it."""

    generation: int = 0
    history: list[Generation] = field(default_factory=list)

    def find(self, number: int) -> Generation | None:
        for g in self.history:
            if g.number == number:
                return g
        return None


class Layout:
    """Where the generation files of one model directory live."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.root = Path(model_dir)
        self.meta = self.root / STATE_DIRNAME
        self.undo_dir = self.meta / "undo"
        self.state_path = self.meta / "state.json"
        self.lock_path = self.meta / "lock"

    def undo_path(self, number: int) -> Path:
        return self.undo_dir / f"{number}.undo"

    def ensure(self) -> None:
        """Creates the directories (private to the user), durably: their entries
        are fsynced every time, since a process killed between a mkdir and its
        fsync leaves a directory that exists but might not survive a power loss."""
        for d in (self.meta, self.undo_dir):
            d.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(d.parent)

    def journals(self) -> dict[int, Path]:
        """Undo journals present, by generation number."""
        found: dict[int, Path] = {}
        if self.undo_dir.is_dir():
            for p in self.undo_dir.glob("*.undo"):
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
    ask. A no-op unless one of them is set."""
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
    """An exclusive ``flock`` on ``<model-dir>/.apollo_sync/lock``.

    The kernel drops the lock when its holder exits, however it exits, so a
    lock left by a dead process is simply taken: there is no stale state to
    clean. The holder's pid is written in the file for the message others see.
    """

    def __init__(self, model_dir: str | os.PathLike[str], timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.layout = Layout(model_dir)
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> ModelLock:
        self.layout.ensure()
        fd = os.open(self.layout.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + max(self.timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise LockedError(
                        f"{self.layout.root} is being written by another apollo-sync"
                        f"{holder}; gave up after {self.timeout:g} s "
                        "(raise --lock-timeout to wait longer)"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
        self._fd = fd
        return self

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
    """The committed state (generation 0 with no history when there is none)."""
    try:
        raw = json.loads(layout.state_path.read_text())
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as e:
        raise JournalError(f"{layout.state_path}: unreadable state file: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise JournalError(f"{layout.state_path}: not a format-{FORMAT} apollo_sync state file")
    try:
        history = [Generation(**g) for g in raw["history"]]
        return State(generation=int(raw["generation"]), history=history)
    except (KeyError, TypeError, ValueError) as e:
        raise JournalError(f"{layout.state_path}: malformed state file: {e}") from e


def save_state(layout: Layout, state: State) -> None:
    """Replaces ``state.json`` atomically and durably (the commit point)."""
    layout.ensure()
    body = {
        "format": FORMAT,
        "generation": state.generation,
        "history": [g.to_dict() for g in state.history],
    }
    data = json.dumps(body, indent=1).encode()
    tmp = layout.state_path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:  # write() loops over short writes; a full disk raises
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        if os.fstat(f.fileno()).st_size != len(data):
            raise OSError(f"{tmp}: short write of the state file")
    fault_point("commit")
    os.replace(tmp, layout.state_path)
    _fsync_dir(layout.meta)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    """An uncommitted generation that recovery undid."""

    generation: int
    records: int
    bytes: int
    files: list[str]


def recover_locked(layout: Layout) -> list[Recovered]:
    """Undoes every uncommitted journal, newest first, and cleans up leftovers
    (a journal half-created, the undo files of pruned generations). The caller
    holds the lock."""
    state = load_state(layout)
    done: list[Recovered] = []
    if not layout.undo_dir.is_dir():
        return done
    for tmp in layout.undo_dir.glob("*.tmp"):
        tmp.unlink()  # a journal whose header never became durable: nothing was written
    journals = layout.journals()
    for number in sorted((n for n in journals if n > state.generation), reverse=True):
        report = undo_journal(journals[number], layout.root)
        journals[number].unlink()
        _fsync_dir(layout.undo_dir)
        done.append(Recovered(number, report.records, report.bytes, list(report.files)))
    for number, path in journals.items():
        g = state.find(number)
        if number <= state.generation and (g is None or not g.undo):
            path.unlink()  # an interrupted prune
    return done


def recover(
    model_dir: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> list[Recovered]:
    """Brings ``model_dir`` back to its last committed generation if a sync,
    rollback or prune was interrupted. Loaders can call this before reading."""
    layout = Layout(model_dir)
    if not layout.meta.is_dir():
        return []
    with ModelLock(model_dir, lock_timeout):
        return recover_locked(layout)


# ---------------------------------------------------------------------------
# Committing, history, pruning, rollback
# ---------------------------------------------------------------------------


def touched_tensors(info: JournalInfo, tensors: Sequence[tuple[str, str, int, int]]) -> list[str]:
    """Names of the tensors whose bytes the journal's runs overlap.

    ``tensors`` is ``(shard file name, tensor name, start, end)`` with absolute
    file offsets; tensors of one shard do not overlap (the headers were checked)."""
    by_shard: dict[str, list[tuple[int, int, str]]] = {}
    for shard, name, start, end in tensors:
        if end > start:  # an empty tensor has no byte to touch
            by_shard.setdefault(shard, []).append((start, end, name))
    if not info.runs:
        return []
    runs = np.asarray(info.runs, dtype=np.int64)  # (shard index, offset, length)
    found: set[str] = set()
    for index, shard in enumerate(info.shards):
        ranges = sorted(by_shard.get(shard, []))
        mine = runs[runs[:, 0] == index]
        if not ranges or not len(mine):
            continue
        starts = np.array([r[0] for r in ranges], dtype=np.int64)
        ends = np.array([r[1] for r in ranges], dtype=np.int64)
        # tensors [first, last) overlap a run: the first ending after its start,
        # up to the first starting at or after its end
        first = np.searchsorted(ends, mine[:, 1], side="right")
        last = np.searchsorted(starts, mine[:, 1] + mine[:, 2], side="left")
        cover = np.zeros(len(ranges) + 1, dtype=np.int64)
        np.add.at(cover, first, 1)
        np.add.at(cover, last, -1)
        hit = np.cumsum(cover[:-1]) > 0
        found.update(ranges[k][2] for k in np.flatnonzero(hit))
    return sorted(found)


def commit(layout: Layout, state: State, generation: Generation) -> State:
    """Makes ``generation`` the committed one. The oldest generations without
    undo data are dropped from the history beyond :data:`HISTORY_LIMIT`."""
    history = [*state.history, generation]
    excess = len(history) - HISTORY_LIMIT
    if excess > 0:
        old = {g.number for g in history[:-1] if not g.undo}
        drop = set(sorted(old)[:excess])
        history = [g for g in history if g.number not in drop]
    new = State(generation=generation.number, history=history)
    save_state(layout, new)
    return new


def prune_locked(layout: Layout, keep: int, max_bytes: int | None) -> list[int]:
    """Drops the undo data of old generations beyond ``keep`` of them or beyond
    ``max_bytes`` in total (the newest is always kept). The state is committed
    first, then the files removed, so a crash leaves only files that recovery
    deletes. Returns the generations pruned."""
    state = load_state(layout)
    kept = [g for g in reversed(state.history) if g.undo]
    total = 0
    drop: list[int] = []
    for i, g in enumerate(kept):
        total += g.undo_bytes
        if i > 0 and (i >= keep or (max_bytes is not None and total > max_bytes)):
            drop.append(g.number)
    if not drop:
        return []
    history = [
        replace(g, undo=False, undo_bytes=0, tensors=[], tensor_count=g.touched)
        if g.number in drop
        else g
        for g in state.history
    ]
    save_state(layout, State(generation=state.generation, history=history))
    for number in drop:
        fault_point("prune")
        with contextlib.suppress(FileNotFoundError):
            layout.undo_path(number).unlink()
    _fsync_dir(layout.undo_dir)
    return sorted(drop)


def default_budget(model_dir: str | os.PathLike[str]) -> int:
    """The default undo byte budget: a tenth of the model's shards."""
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
    with ModelLock(model_dir, lock_timeout):
        layout = Layout(model_dir)
        recover_locked(layout)
        budget = default_budget(model_dir) if max_bytes is None else max_bytes
        return prune_locked(layout, keep, budget)


def history(model_dir: str | os.PathLike[str]) -> State:
    """The committed generation and the history of ``model_dir`` (read without
    the lock: ``state.json`` is only ever replaced whole)."""
    return load_state(Layout(model_dir))


def rollback(
    model_dir: str | os.PathLike[str],
    to: int,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Generation:
    """Restores ``model_dir`` to generation ``to`` exactly, as a new journaled
    generation (itself undoable). Needs the undo data of every generation after
    ``to``."""
    layout = Layout(model_dir)
    with ModelLock(model_dir, lock_timeout):
        recover_locked(layout)
        check_shards(ModelDir.open(model_dir), private_copy=False)
        state = load_state(layout)
        current = state.generation
        if not 0 <= to < current:
            raise RollbackError(
                f"{model_dir}: cannot roll back to generation {to}: "
                f"the current generation is {current}"
                + ("" if to != current else " (already there)")
            )
        steps = [state.find(n) for n in range(current, to, -1)]
        lost = [
            n for n, g in zip(range(current, to, -1), steps, strict=True) if g is None or not g.undo
        ]
        if lost:
            raise RollbackError(
                f"{model_dir}: cannot roll back to generation {to}: the undo data of "
                f"generation(s) {', '.join(map(str, sorted(lost)))} is gone "
                "(pruned, or synced without a journal)"
            )
        paths = [layout.undo_path(n) for n in range(current, to, -1)]
        number = current + 1
        try:
            report = rollback_journals(paths, layout.root, layout.undo_path(number), number)
        except BaseException as e:
            note = undo_uncommitted(layout, number)
            if note:
                e.add_note(note)
            raise
        undo_path = layout.undo_path(number)
        try:
            undo_bytes = read_journal(undo_path).bytes if undo_path.exists() else 0
            tensors = sorted({t for g in steps if g is not None for t in g.tensors})
            generation = Generation(
                number=number,
                time=time.time(),
                kind="rollback",
                bytes_changed=report.bytes,
                undo_bytes=undo_bytes,
                undo=undo_path.exists(),
                files=list(report.files),
                tensors=tensors,
                rollback_to=to,
            )
            commit(layout, state, generation)
        except BaseException as e:
            undo_unless_committed(layout, number, e)
            raise
        return generation


def undo_unless_committed(layout: Layout, number: int, error: BaseException) -> None:
    """After a failure while committing generation ``number``: if the state on
    disk does not say it is committed, puts back what it wrote (noting on
    ``error`` if that cannot be done now)."""
    try:
        committed = load_state(layout).generation == number
    except JournalError:
        committed = False
    if not committed:
        note = undo_uncommitted(layout, number)
        if note:
            error.add_note(note)


def undo_uncommitted(layout: Layout, number: int) -> str | None:
    """After a failed sync or rollback: puts back what it wrote. Returns None when
    done (or when it wrote nothing); otherwise why it could not (the disk is gone,
    say): the journal then stays for the next recovery."""
    path = layout.undo_path(number)
    if not path.exists():
        return None
    try:
        undo_journal(path, layout.root)
        path.unlink()
        _fsync_dir(layout.undo_dir)
    except (ApolloSyncError, OSError) as e:
        return (
            f"could not yet put back what generation {number} wrote ({e}); its journal "
            f"{path} stays, and `apollo-sync recover` (or the next sync) will undo it"
        )
    return None
