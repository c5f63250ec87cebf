"""A long-lived consumer: keeps a producer's handles open and syncs after its steps.

``apollo-sync sync`` in a fresh process pays, every time, for what does not
change between syncs: importing torch, opening the handles (CUDA IPC, or
another process's shared memory read with a ``pread`` copy because faulting
its pages in costs more than the compare). :func:`watch` opens the handles
once and keeps them: shared-memory tensors are compared in place, their pages
mapped on the first sync and resident afterwards, and CUDA tensors stay open.

The first sync runs at once. After it, when the producer exported a step
counter (``export_handles(step_counter=...)``), a sync starts as soon as the
counter shows a finished step it has not synced; otherwise one runs every
``interval`` seconds. When the producer re-exports its handles (the file is
replaced), they are opened again. The watch ends when the producer exits
(after one last sync of its shared memory, where it finished a step the watch
had not synced; CUDA memory is not read once its owner is gone), after
``count`` syncs, or when ``stop`` is set (between syncs: a sync in progress
finishes first). Setting ``reload`` opens the handles again (what SIGHUP does
to ``apollo-sync watch``). Handles without a producer pid (the seeds' format)
give no way to see the producer exit: pass ``count`` or ``stop`` for those.

What happens is logged to ``apollo_sync.watch`` (each sync's result by
``apollo_sync.sync``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from apollo_sync.errors import ProducerGoneError, TornSyncError
from apollo_sync.handles import Handles
from apollo_sync.ranks import HandlesArg, check_alive, open_handles
from apollo_sync.steps import StepCounter
from apollo_sync.sync import SyncResult, sync
from apollo_sync.tp import on_gpu

#: Seconds between looks at the producer's step counter.
POLL_S = 0.01
#: Seconds between looks at whether the producer is alive and its handles file unchanged.
CHECK_S = 0.25

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchSummary:
    """How a :func:`watch` ended."""

    #: Syncs made (the first one included, whether or not it changed anything).
    syncs: int
    #: Why it stopped: ``"count"``, ``"stopped"``, ``"producer exited"`` or
    #: ``"producer exited mid-step"`` (its last, unfinished step was not synced).
    reason: str
    #: The last generation this watch committed (None if it committed none).
    generation: int | None
    #: Syncs abandoned because the producer stepped during them (nothing committed
    #: by a journaled one; see :func:`watch`).
    torn: int = 0
    #: Times the handles were opened again after the producer re-exported them.
    reopened: int = 0
    warnings: list[str] = field(default_factory=list)


def watch(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    handles: HandlesArg = None,
    interval: float = 1.0,
    count: int | None = None,
    stop: threading.Event | None = None,
    reload: threading.Event | None = None,
    on_sync: Callable[[SyncResult], None] | None = None,
    on_torn: Callable[[TornSyncError], None] | None = None,
    on_check: Callable[[bool], None] | None = None,
    **options: Any,
) -> WatchSummary:
    """Syncs ``model_dir`` from the producer behind ``handles`` after each of its steps.

    ``options`` are passed to :func:`apollo_sync.sync` (``journal``, ``keep``,
    ``block_size``, ...). ``on_sync`` is called with each sync's result; an
    exception it raises ends the watch. A sync during which the producer kept
    stepping (:class:`TornSyncError`) does not end it: ``on_torn`` is told, and
    the next step (or interval) brings another sync. With a journal such a sync
    committed nothing; without one (``journal=False``) the files may mix two
    steps until that next sync. Any other failure raises, as
    :func:`apollo_sync.sync` does (a journaled sync is undone first).
    ``on_check`` is told, at each look (every :data:`CHECK_S` seconds), whether
    the producer is alive.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, not {interval}")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    state = _State(
        count=count,
        stop=stop or threading.Event(),
        reload=reload or threading.Event(),
        on_check=on_check,
    )
    while True:
        opened = open_handles(handles, stages=options.get("group") is not None)
        log.info(
            "opened %d live tensor(s) from %s",
            len(opened.tensors),
            opened.path,
            extra={"event": "handles_opened", "handles": str(opened.path)},
        )
        try:
            reason = _Session(model_dir, opened, interval, on_sync, on_torn, options, state).run()
        finally:
            opened.close()
        if reason != "reopen":
            for w in state.warnings:
                log.warning("%s", w, extra={"event": "watch_warning"})
            log.info(
                "stopped (%s) after %d sync(s)",
                reason,
                state.made,
                extra={"event": "watch_stopped", "reason": reason, "syncs": state.made},
            )
            return WatchSummary(
                state.made, reason, state.generation, state.torn, state.reopened, state.warnings
            )
        state.reopened += 1


@dataclass
class _State:
    """What carries over when the handles are opened again."""

    count: int | None
    stop: threading.Event
    reload: threading.Event
    on_check: Callable[[bool], None] | None = None
    made: int = 0
    generation: int | None = None
    torn: int = 0
    reopened: int = 0
    synced_step: int | None = None
    warnings: list[str] = field(default_factory=list)


class _Session:
    """One opening of the handles."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None,
        opened: Handles,
        interval: float,
        on_sync: Callable[[SyncResult], None] | None,
        on_torn: Callable[[TornSyncError], None] | None,
        options: dict[str, Any],
        state: _State,
    ) -> None:
        self.model_dir, self.opened, self.interval = model_dir, opened, interval
        self.on_sync, self.on_torn, self.options, self.s = on_sync, on_torn, options, state
        self.identity = _identity(opened.path)
        self.cuda = any(on_gpu(t) for t in opened.tensors.values())
        # compared in place from now on: mapped once, resident for every later sync
        for name, t in opened.tensors.items():
            if t.file is not None:
                opened.tensors[name] = replace(t, file=None)
        path = opened.metadata.get("step_counter")
        self.counter = StepCounter.open(path) if isinstance(path, str) else None
        # a fresh opening syncs once at once: re-exported handles may show new memory
        self.fresh = True

    def run(self) -> str:
        try:
            return self._loop()
        finally:
            if self.counter is not None:
                self.counter.close()

    def _loop(self) -> str:
        s, counter = self.s, self.counter
        next_at = time.monotonic()  # timer mode: the first sync at once
        next_check = 0.0
        while True:
            if s.count is not None and s.made >= s.count:
                return "count"
            if s.stop.is_set():
                return "stopped"
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_S
                gone = self._gone()
                if gone:
                    return gone
                if _identity(self.opened.path) != self.identity:
                    log.info("the handles were exported again: opening them again")
                    return "reopen"  # re-exported: these mappings may be stale
            if s.reload.is_set():
                s.reload.clear()
                log.info("asked to reload: opening the handles again")
                return "reopen"
            if counter is not None:
                step = counter.value()
                if step % 2 or (step == s.synced_step and not self.fresh):
                    s.stop.wait(POLL_S)  # mid-step, or nothing new since the last sync
                    continue
            else:
                if now < next_at:
                    s.stop.wait(min(next_at - now, CHECK_S))
                    continue
                next_at = now + self.interval
                step = None
            try:
                self._sync(step)
            except TornSyncError:
                continue  # reported; the next step (or interval) syncs again
            except Exception:
                gone = self._gone()
                if gone:  # it died mid-sync: that is how the watch ends, not an error
                    return gone
                raise

    def _sync(self, step: int | None) -> None:
        s = self.s
        self.fresh = False
        try:
            result = sync(
                self.model_dir, handles=self.opened, step_counter=self.counter, **self.options
            )
        except TornSyncError as e:
            s.torn += 1
            log.warning("%s; syncing again after the next step", e, extra={"event": "torn_sync"})
            if self.on_torn is not None:
                self.on_torn(e)
            raise
        s.made += 1
        s.synced_step = step
        if result.generation is not None:
            s.generation = result.generation
        if self.on_sync is not None:
            self.on_sync(result)

    def _gone(self) -> str | None:
        """Why to stop if the producer has exited (after a last sync where one is
        due and safe), else None."""
        try:
            check_alive(self.opened)
            if self.s.on_check is not None:
                self.s.on_check(True)
            return None
        except ProducerGoneError:
            if self.s.on_check is not None:
                self.s.on_check(False)
        counter, s = self.counter, self.s
        if counter is not None and counter.value() % 2:
            return "producer exited mid-step"
        due = counter is None or counter.value() != s.synced_step
        if due and self.cuda:
            s.warnings.append(
                "the producer exited before its last changes were synced; its CUDA "
                "memory cannot be read once its owner is gone"
            )
        elif due and (s.count is None or s.made < s.count):
            # its shared memory outlives it while mapped: sync what it left
            self._sync(None if counter is None else counter.value())
        return "producer exited"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)
