"""A long-lived consumer: keeps a producer's handles open and syncs after its steps.

``apollo-sync sync`` in a fresh process pays, every time, for what does not
change between syncs: importing torch, opening the handles (CUDA IPC, or
another process's shared memory read with a ``pread`` copy because faulting
its pages in costs more than the compare). :func:`watch` opens the handles
once and keeps them: shared-memory tensors are compared in place, their pages
mapped on the first sync and resident afterwards, and CUDA tensors stay open.
From the second sync on it runs at the speed of a sync inside the producer.

When the producer exported a step counter (``export_handles(step_counter=...)``)
a sync starts as soon as the counter shows a finished step it has not synced
yet; otherwise one runs every ``interval`` seconds. It stops when the producer
exits, after ``count`` syncs, or when ``stop`` is set.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from apollo_sync.errors import ProducerGoneError
from apollo_sync.handles import Handles, check_producer_alive, load_handles
from apollo_sync.steps import StepCounter
from apollo_sync.sync import SyncResult, sync

#: Seconds between looks at the producer's step counter.
POLL_S = 0.01


@dataclass(frozen=True)
class WatchSummary:
    """How a :func:`watch` ended."""

    syncs: int
    #: Why it stopped: ``"count"``, ``"stopped"`` or ``"producer exited"``.
    reason: str
    #: The generation the directory was at after the last sync (None if none committed).
    generation: int | None


def watch(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    handles: str | os.PathLike[str] | None = None,
    interval: float = 1.0,
    count: int | None = None,
    stop: threading.Event | None = None,
    on_sync: Callable[[SyncResult], None] | None = None,
    **options: Any,
) -> WatchSummary:
    """Syncs ``model_dir`` from the producer behind ``handles`` after each of its steps.

    ``options`` are passed to :func:`apollo_sync.sync` (``journal``, ``keep``,
    ``block_size``, ...). ``on_sync`` is called with each sync's result. A sync
    that fails raises, as :func:`apollo_sync.sync` does (nothing half-written is
    left behind); the producer exiting ends the watch normally.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, not {interval}")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    stop = stop or threading.Event()
    opened = load_handles(handles)
    counter: StepCounter | None = None
    try:
        # compared in place from now on: mapped once, resident for every later sync
        for name, t in opened.tensors.items():
            if t.file is not None:
                opened.tensors[name] = replace(t, file=None)
        path = opened.metadata.get("step_counter")
        if isinstance(path, str):
            counter = StepCounter.open(path)
        return _loop(model_dir, opened, counter, interval, count, stop, on_sync, options)
    finally:
        if counter is not None:
            counter.close()
        opened.close()


def _loop(
    model_dir: str | os.PathLike[str] | None,
    opened: Handles,
    counter: StepCounter | None,
    interval: float,
    count: int | None,
    stop: threading.Event,
    on_sync: Callable[[SyncResult], None] | None,
    options: dict[str, Any],
) -> WatchSummary:
    made, synced_step, generation = 0, None, None
    next_at = time.monotonic()
    while True:
        if count is not None and made >= count:
            return WatchSummary(made, "count", generation)
        if stop.is_set():
            return WatchSummary(made, "stopped", generation)
        try:
            check_producer_alive(opened)
        except ProducerGoneError:
            return WatchSummary(made, "producer exited", generation)
        if counter is not None:
            step = counter.value()
            if step % 2 or step == synced_step:  # mid-step, or nothing new since the last sync
                stop.wait(POLL_S)
                continue
        else:
            wait = next_at - time.monotonic()
            if wait > 0:
                stop.wait(min(wait, 0.25))  # short waits: notice the producer exiting
                continue
            next_at = time.monotonic() + interval
            step = None
        result = sync(model_dir, handles=opened, step_counter=counter, **options)
        made += 1
        synced_step = step
        if result.generation is not None:
            generation = result.generation
        if on_sync is not None:
            on_sync(result)
