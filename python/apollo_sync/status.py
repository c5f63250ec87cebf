"""``apollo-sync status``: where a model directory stands, on one screen.

Read without taking the lock or changing anything (a sync may run meanwhile):
``state.json`` (replaced whole at each commit), the logs present, the markers,
``last_sync.json`` (written by each sync that ran to its end) and, where a
handles file is given or found at the default path, whether its producer runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apollo_sync import journal as gens
from apollo_sync.errors import GroupError
from apollo_sync.handles import ProducerState, producer_state


@dataclass(frozen=True)
class Status:
    """The state of one model directory."""

    model_dir: str
    #: The last committed generation (0 before the first sync that changed something).
    generation: int
    #: The last generation the shards hold on disk by themselves.
    checkpoint: int
    #: Logs of interrupted syncs or rollbacks (past the committed generation, or
    #: committed after ``state.json`` was last written): the next writer, or
    #: ``apollo-sync recover``, deals with them.
    awaiting_recovery: list[int]
    #: Committed generations whose shards are not yet known to be on disk (a
    #: background flush in progress, or a crash before it finished).
    not_durable: list[int]
    #: Bytes of the logs kept (the rollback history), and how many files.
    log_bytes: int
    log_files: int
    #: The byte budget for them (``--undo-budget``; default half the model).
    log_budget: int
    #: Generations whose logs are kept at most (``--keep``).
    keep: int
    #: Generations a rollback can restore, newest first.
    rollback_points: list[int]
    #: The last generation committed (None before the first).
    last_generation: gens.Generation | None
    #: What the last sync that ran to its end recorded (``last_sync.json``):
    #: ``time``, ``generation`` (None: nothing changed), ``seconds``,
    #: ``wall_seconds``, byte counts.
    last_sync: dict[str, Any] | None
    #: A writer holding the lock now ("pid N, since HH:MM:SS"), or None.
    writer: str | None
    #: The producer behind the handles file (None where none was looked at).
    producer: ProducerState | None = None
    model_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["last_generation"] = (
            None if self.last_generation is None else self.last_generation.to_dict()
        )
        d["producer"] = (
            None
            if self.producer is None
            else {
                "path": str(self.producer.path),
                "alive": self.producer.alive,
                "detail": self.producer.detail,
            }
        )
        return d


def status(
    model_dir: str | os.PathLike[str],
    *,
    handles: str | os.PathLike[str] | None = None,
    look_for_producer: bool = True,
    keep: int = gens.DEFAULT_KEEP,
    undo_budget: int | None = None,
) -> Status:
    """Where ``model_dir`` stands (see :class:`Status`). The producer is looked up
    through ``handles`` (default: the default handles path) when
    ``look_for_producer``. A directory several hosts write together has one
    status per host: :func:`group_status`."""
    from apollo_sync.group import read_group

    g = read_group(model_dir)
    if g is not None:
        raise GroupError(
            f"{model_dir} is written by a group of {g.hosts} hosts: its status is one per "
            "host (apollo_sync.status.group_status; `apollo-sync status` shows them all)"
        )
    model_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    producer = producer_state(handles) if look_for_producer else None
    return _of(
        gens.Layout(model_dir), model_bytes, producer, None, keep=keep, undo_budget=undo_budget
    )


@dataclass(frozen=True)
class GroupStatus:
    """The state of a directory several hosts write together
    (:mod:`apollo_sync.group`): the group's commit point and each host's part."""

    model_dir: str
    #: The last generation every host committed together (``group.json``).
    committed: int
    #: Each host's status, by host number (its shard files, logs and lock).
    hosts: list[Status]
    #: The shard files each host owns.
    owners: dict[str, int]
    #: The producer behind the handles file given (this host's ranks).
    producer: ProducerState | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "committed": self.committed,
            "owners": self.owners,
            "hosts": [h.to_dict() for h in self.hosts],
            "producer": None
            if self.producer is None
            else {
                "path": str(self.producer.path),
                "alive": self.producer.alive,
                "detail": self.producer.detail,
            },
        }


def group_status(
    model_dir: str | os.PathLike[str],
    *,
    handles: str | os.PathLike[str] | None = None,
    look_for_producer: bool = True,
    keep: int = gens.DEFAULT_KEEP,
    undo_budget: int | None = None,
) -> GroupStatus:
    """Where a group's directory stands: each host's namespace read as
    :func:`status` reads one, with its generation taken as far as the group
    committed (a generation a host prepared past it awaits recovery)."""
    from apollo_sync.group import read_group

    g = read_group(model_dir)
    if g is None:
        raise GroupError(f"{model_dir} is not written by a group of hosts (no group.json)")
    root = Path(model_dir)
    hosts = []
    for h in range(g.hosts):
        owned = [root / f for f, o in g.owners.items() if o == h]
        model_bytes = sum(p.stat().st_size for p in owned if p.exists())
        layout = gens.Layout(root, h)
        hosts.append(
            _of(layout, model_bytes, None, g.committed, keep=keep, undo_budget=undo_budget)
        )
    producer = producer_state(handles) if look_for_producer else None
    return GroupStatus(
        model_dir=str(model_dir),
        committed=g.committed,
        hosts=hosts,
        owners=dict(sorted(g.owners.items())),
        producer=producer,
    )


def _of(
    layout: gens.Layout,
    model_bytes: int,
    producer: ProducerState | None,
    committed: int | None,
    *,
    keep: int,
    undo_budget: int | None,
) -> Status:
    """One namespace's status; ``committed``: the group's commit point, for a
    host of a group (what it committed past that awaits recovery)."""
    state = gens.load_state(layout)
    if committed is not None and state.generation > committed:
        ahead = [g.number for g in state.history if g.number > committed]
        state = gens.State(
            generation=committed,
            checkpoint=min(state.checkpoint, committed),
            history=[g for g in state.history if g.number <= committed],
        )
    else:
        ahead = []
    k = gens.checkpoint(layout, state)
    if committed is not None:
        k = min(k, committed)
    logs = layout.logs()
    awaiting = sorted({*ahead, *(n for n in logs if n > state.generation)})
    not_durable = [n for n in range(k + 1, state.generation + 1)]
    sizes = []
    for p in logs.values():
        with contextlib.suppress(FileNotFoundError):  # pruned meanwhile
            sizes.append(p.stat().st_size)
    history = gens.History(state)
    notes = []
    model_dir = layout.root
    if producer is not None and producer.alive is not None:
        target = producer.metadata.get("model_path")
        if isinstance(target, str) and os.path.realpath(target) != os.path.realpath(model_dir):
            notes.append(f"the handles' producer serves {target}, not this directory")
    return Status(
        model_dir=str(model_dir),
        generation=state.generation,
        checkpoint=k,
        awaiting_recovery=awaiting,
        not_durable=not_durable,
        log_bytes=sum(sizes),
        log_files=len(sizes),
        log_budget=int(gens.DEFAULT_BUDGET_FRACTION * model_bytes)
        if undo_budget is None
        else undo_budget,
        keep=keep,
        rollback_points=history.rollback_points(),
        last_generation=state.history[-1] if state.history else None,
        last_sync=gens.read_last_sync(layout),
        writer=_writer(layout),
        producer=producer,
        model_bytes=model_bytes,
        notes=notes,
    )


def _writer(layout: gens.Layout) -> str | None:
    """Who holds the exclusive lock now (a shared lock taken and dropped at once
    tells; a writer waiting for it meanwhile retries within 50 ms)."""
    try:
        fd = os.open(layout.lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no writer ever ran
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return gens._read_holder(fd).strip(" ()") or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _ago(t: float, now: float) -> str:
    s = max(0.0, now - t)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def _when(t: float, now: float) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({_ago(t, now)})"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def _stages(st: dict[str, float]) -> str:
    """The stages of a sync's time that matter when it is slow, in one line."""
    parts = [f"feed {st['feed']:.2f} s"]
    if st.get("barriers"):
        n = int(st["barriers"])
        parts.append(f"{n} log barrier{'s' * (n != 1)} {st.get('barrier', 0):.2f} s")
    if st.get("write"):
        parts.append(
            f"writes {st['write']:.2f} s (busiest thread {st.get('write_busiest', 0):.2f})"
        )
    parts.append(f"finish {st.get('finish', 0):.2f} s")
    if "commit" in st:
        parts.append(f"commit {st['commit']:.2f} s")
    return ", ".join(parts)


def render(st: Status, now: float | None = None) -> str:
    """One screen for a person."""
    now = time.time() if now is None else now
    lines = [f"model dir        {st.model_dir} ({_size(st.model_bytes)})"]
    gen = f"generation       {st.generation}"
    if st.last_generation is not None:
        g = st.last_generation
        kind = "sync" if g.rollback_to is None else f"rollback to {g.rollback_to}"
        gen += f" ({kind}, committed {_when(g.time, now)})"
    lines.append(gen)
    if st.not_durable:
        lines.append(
            f"on disk          generation {st.checkpoint}; {st.not_durable} current in the page "
            "cache, being flushed (or awaiting `apollo-sync recover` after a crash)"
        )
    else:
        lines.append(f"on disk          generation {st.checkpoint}: durable")
    if st.awaiting_recovery:
        lines.append(
            f"INTERRUPTED      generation(s) {st.awaiting_recovery} await recovery: run "
            "`apollo-sync recover` (every sync does it first)"
        )
    else:
        lines.append("interrupted      none")
    lines.append(f"writer           {st.writer or 'none now'}")
    pct = 100 * st.log_bytes / st.log_budget if st.log_budget else 0.0
    lines.append(
        f"log              {_size(st.log_bytes)} in {st.log_files} file(s), budget "
        f"{_size(st.log_budget)} ({pct:.0f}% used), keep {st.keep}"
    )
    points = st.rollback_points
    if points:
        span = f"{points[-1]}..{points[0]}" if len(points) > 1 else str(points[0])
        lines.append(f"rollback points  {len(points)}: generations {span}")
    else:
        lines.append("rollback points  none")
    last = st.last_sync
    if last is not None:
        changed = (
            "no change"
            if last.get("generation") is None
            else f"generation {last['generation']}, {_size(int(last.get('bytes_changed', 0)))} "
            f"changed, log {_size(int(last.get('log_bytes', 0)))}"
        )
        lines.append(
            f"last sync        {_when(float(last.get('time', 0)), now)}: {changed}; "
            f"{float(last.get('seconds', 0)):.2f} s diff and write, "
            f"{float(last.get('wall_seconds', 0)):.2f} s in all"
        )
        stages = last.get("stages") or {}
        if "feed" in stages:
            lines.append(f"  its stages     {_stages(stages)}")
    else:
        lines.append("last sync        none recorded")
    if st.last_generation is not None and (
        last is None or last.get("generation") != st.last_generation.number
    ):
        g = st.last_generation
        lines.append(
            f"last change      generation {g.number}, {_when(g.time, now)}: "
            f"{_size(g.bytes_changed)}, {g.elements_changed:,} elements"
        )
    if st.producer is not None:
        p = st.producer
        word = {True: "alive", False: "not running", None: "unknown"}[p.alive]
        lines.append(f"producer         {word}: {p.detail}")
    lines += [f"note             {n}" for n in st.notes]
    return "\n".join(lines)


def render_group(st: GroupStatus, now: float | None = None) -> str:
    """One screen for a person: the group's commit point, then each host's."""
    now = time.time() if now is None else now
    lines = [
        f"model dir        {st.model_dir}, written by a group of {len(st.hosts)} hosts",
        f"group committed  generation {st.committed} (.apollo_sync/group.json)",
    ]
    if st.producer is not None:
        word = {True: "alive", False: "not running", None: "unknown"}[st.producer.alive]
        lines.append(f"producer         {word}: {st.producer.detail}")
    for h, host in enumerate(st.hosts):
        files = [f for f, o in st.owners.items() if o == h]
        lines += ["", f"host {h}: {', '.join(files) or 'no files'}"]
        lines += ["  " + line for line in render(host, now).splitlines()[1:]]
    return "\n".join(lines)
