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

With a ``group`` (one host of several writing one directory, see
:mod:`apollo_sync.group`), the hosts agree on every sync instead of each
following its own producer: at each look (every :data:`GROUP_POLL_S` seconds)
they exchange their producers' step counters over the group's own process
group (:func:`agree`), and all of them sync together, reading the same step;
stopping is agreed the same way, so no host is left waiting for the others.

What happens is logged to ``apollo_sync.watch`` (each sync's result by
``apollo_sync.sync``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apollo_sync import journal as gens
from apollo_sync.errors import GroupError, ProducerGoneError, TornSyncError
from apollo_sync.handles import Handles
from apollo_sync.ranks import HandlesArg, check_alive, open_handles
from apollo_sync.steps import StepCounter
from apollo_sync.sync import SyncResult, sync
from apollo_sync.tp import on_gpu

if TYPE_CHECKING:
    from apollo_sync.group import Group

#: Seconds between looks at the producer's step counter.
POLL_S = 0.01
#: Seconds between two exchanges of the hosts' step counters (with a group).
GROUP_POLL_S = 0.05
#: Seconds between two log lines saying what a group waits for.
GROUP_WAIT_LOG_S = 60.0
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
    #: The step counter's value the last sync read (with a group: the step every
    #: host agreed on); None without a step counter, or before any sync.
    step: int | None = None


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

    With ``group=`` (:class:`apollo_sync.Group`; every host runs its own watch
    of its own producer), the hosts agree on each sync. Every
    :data:`GROUP_POLL_S` seconds they exchange their producers' step counters
    over the group's process group, and a sync starts on every host at once
    only when every counter shows the same finished step not synced yet (or
    a host opened its handles afresh); while a producer is inside a step, or
    behind the others, every host waits. The sync reads that step and no
    other (:func:`apollo_sync.sync`'s ``step``): a producer that steps during
    it, on any host, makes the whole group commit nothing
    (:class:`TornSyncError` on every host, ``on_torn`` told) and the next
    agreed step is synced. The counters must count the same steps on every
    host (each producer's counter starting at 0 with training). Producers
    without a step counter follow host 0's ``interval``: host 0 says when to
    sync; some hosts with a counter and some without is refused on every
    host. Stopping is agreed: a host that reached ``count``, was asked to
    ``stop`` or whose producer exited says so in the exchange, and every host
    stops after it (after one last sync where a producer exited after a step
    every host finished and none was synced, and no exited producer's memory
    is CUDA); the others' :attr:`WatchSummary.reason` names that host
    (``"host 1: producer exited"``). A host that does not answer within the
    group's timeout (dead, killed, stuck) makes the others raise
    :class:`GroupError` naming it.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, not {interval}")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    # refused here, not at the first sync (where a group's other hosts would wait)
    gens.check_retention(options.get("keep", gens.DEFAULT_KEEP), options.get("undo_budget"))
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
                state.made,
                reason,
                state.generation,
                state.torn,
                state.reopened,
                state.warnings,
                state.synced_step,
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
        self.group: Group | None = options.get("group")

    def run(self) -> str:
        try:
            return self._loop()
        finally:
            if self.counter is not None:
                self.counter.close()

    def _loop(self) -> str:
        if self.group is not None:
            return self._group_loop(self.group)
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

    def _group_loop(self, group: Group) -> str:
        """The loop of one host of a group: every look is an exchange with the
        other hosts, and what to do is decided from what all of them said."""
        s, counter = self.s, self.counter
        next_at = time.monotonic()  # timer mode, host 0's schedule: the first sync at once
        next_check = 0.0
        alive = True
        waiting_since: float | None = None
        while True:
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_S
                alive = self._alive()
                if alive and _identity(self.opened.path) != self.identity:
                    log.info("the handles were exported again: opening them again")
                    return "reopen"  # the others wait in the next exchange meanwhile
            if alive and s.reload.is_set():
                s.reload.clear()
                log.info("asked to reload: opening the handles again")
                return "reopen"
            stop = None
            if s.count is not None and s.made >= s.count:
                stop = "count"
            elif s.stop.is_set():
                stop = "stopped"
            due = group.rank == 0 and counter is None and now >= next_at
            mine = {
                "step": None if counter is None else counter.value(),
                "fresh": self.fresh,
                "stop": stop,
                "gone": not alive,
                "cuda": self.cuda,
                "due": due,
            }
            try:
                said = group.exchange(mine)
            except GroupError as e:
                if not group.broken:
                    raise  # never met (a timeout, another group size): as it says
                raise self._lost(group, e) from e
            plan = agree(said, s.synced_step, s.count is None or s.made < s.count)
            if due and plan.sync:
                next_at = now + self.interval
            if plan.sync:
                waiting_since = None
                # a torn sync is reported; every host waits for the next agreed step
                with contextlib.suppress(TornSyncError):
                    self._sync(plan.step)
            elif plan.stop is None and plan.waiting:
                if waiting_since is None:
                    waiting_since = now
                elif now - waiting_since >= GROUP_WAIT_LOG_S:
                    waiting_since = now
                    log.info(
                        "waiting for the hosts' producers to finish one step together: %s",
                        plan.waiting,
                        extra={"event": "group_waiting"},
                    )
            if plan.stop is not None:
                return self._stopping(group.rank, plan)
            s.stop.wait(GROUP_POLL_S)

    def _stopping(self, me: int, plan: Plan) -> str:
        """This host's reason to stop, once the group agreed to."""
        assert plan.stop is not None
        if me in plan.stop:
            counter = self.counter
            due = counter is None or counter.value() != self.s.synced_step
            if plan.stop[me] == "producer exited" and due and self.cuda:
                self.s.warnings.append(
                    "the producer exited before its last changes were synced; its CUDA "
                    "memory cannot be read once its owner is gone"
                )
            return plan.stop[me]
        return "; ".join(f"host {h}: {why}" for h, why in sorted(plan.stop.items()))

    def _lost(self, group: Group, e: GroupError) -> GroupError:
        root = self.model_dir or self.opened.metadata.get("model_path") or "the model directory"
        lost = group.lost
        first = (
            f"restart the watch of host {', '.join(map(str, lost))} and then of every other host"
            if lost
            else "restart the watch of every host"
        )
        return GroupError(
            f"{root}: host {group.rank} lost the other hosts between two syncs ({e}). This "
            f"host was not writing, but a host that died inside a sync may have left its "
            f"part unfinished: {first} (the group cannot be joined again), and run "
            f"`apollo-sync recover --model-dir {root}` before reading the files"
        )

    def _alive(self) -> bool:
        try:
            check_alive(self.opened)
            alive = True
        except ProducerGoneError:
            alive = False
        if self.s.on_check is not None:
            self.s.on_check(alive)
        return alive

    def _sync(self, step: int | None) -> None:
        s = self.s
        self.fresh = False
        extra: dict[str, Any] = {} if self.group is None or step is None else {"step": step}
        try:
            result = sync(
                self.model_dir,
                handles=self.opened,
                step_counter=self.counter,
                **self.options,
                **extra,
            )
        except TornSyncError as e:
            s.torn += 1
            log.warning("%s; syncing again after the next step", e, extra={"event": "torn_sync"})
            if self.on_torn is not None:
                self.on_torn(e)
            raise
        s.made += 1
        s.synced_step = step if result.step is None else result.step
        if result.generation is not None:
            s.generation = result.generation
        if self.on_sync is not None:
            self.on_sync(result)

    def _gone(self) -> str | None:
        """Why to stop if the producer has exited (after a last sync where one is
        due and safe), else None."""
        if self._alive():
            return None
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


@dataclass(frozen=True)
class Plan:
    """What every host of a group does after one exchange (:func:`agree`)."""

    #: Sync now (every host), reading ``step``.
    sync: bool
    #: The step every producer is at (None in timer mode, or when they differ).
    step: int | None = None
    #: Stop after this round (and its sync, if any): the hosts that asked to
    #: and why (``"count"``, ``"stopped"``, ``"producer exited"``,
    #: ``"producer exited mid-step"``).
    stop: dict[int, str] | None = None
    #: What the group waits for (for the log), when it neither syncs nor stops.
    waiting: str = ""


def agree(said: list[dict[str, Any]], synced: int | None, may_sync: bool = True) -> Plan:
    """What every host does after an exchange, from what each host ``said``
    (by rank: its producer's step counter or None, whether its handles are
    freshly opened, its reason to stop, whether its producer is gone and
    holds CUDA memory, and, from host 0 in timer mode, whether a sync is due)
    and the step the group last synced. Every host computes it from the same
    exchange, so every host does the same. ``may_sync``: ``count`` allows
    another sync."""
    has = [m["step"] is not None for m in said]
    if any(has) and not all(has):
        raise GroupError(
            f"host(s) {', '.join(str(h) for h, c in enumerate(has) if c)} follow a "
            "producer's step counter and host(s) "
            f"{', '.join(str(h) for h, c in enumerate(has) if not c)} do not: the hosts "
            "cannot agree on a step. Export a step counter from every host's producer "
            "(export_handles(step_counter=...)) or from none (then host 0's --interval "
            "sets when every host syncs)"
        )
    steps: list[int] = [m["step"] for m in said] if all(has) else []
    fresh = any(m["fresh"] for m in said)
    if steps:
        ready = len(set(steps)) == 1 and steps[0] % 2 == 0
        step = steps[0] if ready else None
        new = ready and (steps[0] != synced or fresh)
    else:  # timer mode: host 0 keeps the time
        ready, step = True, None
        new = bool(said[0]["due"]) or fresh
    asked = {h: str(m["stop"]) for h, m in enumerate(said) if m["stop"]}
    if asked:
        return Plan(sync=False, step=step, stop=asked)
    gone = [h for h, m in enumerate(said) if m["gone"]]
    if gone:
        mid = [h for h in gone if steps and steps[h] % 2]
        why = {h: "producer exited mid-step" if h in mid else "producer exited" for h in gone}
        # one last sync, of a step every host finished and none synced (on a timer:
        # of what they left, as a single host's watch does); an exited producer's
        # memory is read only where it is shared memory
        last = (ready and new if steps else True) and may_sync
        last = last and not any(said[h]["cuda"] for h in gone)
        return Plan(sync=last, step=step, stop=why)
    waiting = ""
    if steps and not ready:
        waiting = ", ".join(
            f"host {h} {f'inside a step (at {v})' if v % 2 else f'at {v}'}"
            for h, v in enumerate(steps)
        )
    return Plan(sync=ready and new and may_sync, step=step, waiting=waiting)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)
