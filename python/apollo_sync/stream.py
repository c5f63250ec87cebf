"""Streaming live bytes into the Rust core in bounded batches.

Host tensors are handed over in place (buffer protocol, no copy). CUDA tensors are
copied in chunks into a small ring of pinned host buffers on a side stream; while
a feeder thread has the core diff chunk *i* (GIL released), this thread issues the
copies of the next chunks into the free buffers.
Host memory stays bounded by the ring, whatever the model weighs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from apollo_sync._core import Syncer
from apollo_sync.dtypes import itemsize
from apollo_sync.live import LiveTensor

#: Bytes handed to the core per call (progress is reported between calls; a
#: logged sync holds at most about this much of changed bytes before a barrier).
BATCH_BYTES = 128 << 20
#: Bytes of one shard fed before the next shard's turn: the core writes the
#: changed blocks of each shard from its own thread (writes to one file
#: serialize on its inode lock), so shards interleaved in a batch write in
#: parallel.
INTERLEAVE_BYTES = 32 << 20
#: Size and number of pinned staging buffers for CUDA tensors: each buffer is one
#: call into the core (32 parallel jobs on 16 cores); two are enough while the bus
#: (55 GB/s pinned on an H100 host) outruns the diff (see BENCHMARKS.md).
CHUNK_BYTES = 128 << 20
STAGING_DEPTH = 2


@dataclass(frozen=True)
class Placement:
    """Live bytes and where they go: shard index and absolute file offset."""

    shard: int
    offset: int
    live: LiveTensor


@dataclass
class StreamStats:
    """Where a stream's time went, in seconds of wall clock: ``copy_wait_s`` and
    ``feed_s`` in the thread that feeds the core, ``setup_s`` and ``submit_s`` in
    the calling thread (overlapped with the feeds)."""

    #: Batches handed to the core.
    batches: int = 0
    #: Live bytes handed to the core.
    bytes: int = 0
    #: Setting up staging (pinned buffers, stream): paid once per call.
    setup_s: float = 0.0
    #: Waiting for device-to-host copies to complete (the bus, if large).
    copy_wait_s: float = 0.0
    #: Inside ``Syncer.feed`` (diff and writes, GIL released).
    feed_s: float = 0.0
    #: Issuing copies and building batches (Python).
    submit_s: float = 0.0


@dataclass(frozen=True)
class _Piece:
    shard: int
    offset: int  # file offset of this piece
    live: LiveTensor
    start: int  # byte range inside the live tensor
    stop: int


def interleave(plan: Sequence[Placement], slice_bytes: int) -> list[Placement]:
    """``plan`` (sorted by shard and offset) reordered so that the shards take
    turns, about ``slice_bytes`` each, every shard still in offset order."""
    queues: dict[int, list[Placement]] = {}
    for p in plan:
        queues.setdefault(p.shard, []).append(p)
    if len(queues) < 2:
        return list(plan)
    out: list[Placement] = []
    pos = dict.fromkeys(queues, 0)
    while pos:
        for shard in list(pos):
            q, i, taken = queues[shard], pos[shard], 0
            while i < len(q) and taken < slice_bytes:
                out.append(q[i])
                taken += q[i].live.nbytes
                i += 1
            if i == len(q):
                del pos[shard]
            else:
                pos[shard] = i
    return out


def _chunks(plan: Sequence[Placement], batch: int, chunk: int) -> Iterator[list[_Piece]]:
    """Cuts the plan into chunks of at most ``batch`` bytes, of which at most
    ``chunk`` are staged (CUDA) bytes, in plan order."""
    out: list[_Piece] = []
    total = staged = 0
    for p in plan:
        pos, n, cuda = 0, p.live.nbytes, p.live.is_cuda
        while True:
            room = min(batch - total, chunk - staged) if cuda else batch - total
            if room <= 0:
                yield out
                out, total, staged = [], 0, 0
                continue
            take = min(n - pos, room)
            out.append(_Piece(p.shard, p.offset + pos, p.live, pos, pos + take))
            total += take
            staged += take if cuda else 0
            pos += take
            if pos >= n:
                break
    if out:
        yield out


class _Stager:
    """A ring of pinned buffers and a side stream for device-to-host copies.

    Buffers are pinned on first use: pinning costs about 0.5 s per GiB on an H100
    host, so only the first one delays the start; the others are pinned while the
    core diffs the first chunk.
    """

    def __init__(self, device: torch.device, chunk: int, depth: int) -> None:
        self.device = device
        self.chunk = chunk
        self.stream = torch.cuda.Stream(device=device)  # default (lowest) priority
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.buffers: list[torch.Tensor | None] = [None] * depth
        self.views: list[Any] = [None] * depth

    def submit(
        self, slot: int, pieces: list[_Piece]
    ) -> tuple[list[tuple[int, int, Any, int]], Any]:
        """Starts the copies of ``pieces`` into buffer ``slot``; returns the segments
        (valid once the returned event has completed) and the event."""
        buf = self.buffers[slot]
        if buf is None:
            buf = self.buffers[slot] = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
            self.views[slot] = buf.numpy()
        view = self.views[slot]
        segments: list[tuple[int, int, Any, int]] = []
        pos = 0
        with torch.cuda.stream(self.stream):
            for p in pieces:
                n = p.stop - p.start
                if p.live.is_cuda:
                    buf[pos : pos + n].copy_(
                        p.live.device_bytes(p.start, p.stop), non_blocking=True
                    )
                    segments.append((p.shard, p.offset, view[pos : pos + n], width(p.live)))
                    pos += n
                else:
                    segments.append(
                        (p.shard, p.offset, p.live.stream_source(p.start, p.stop), width(p.live))
                    )
            event = torch.cuda.Event()
            event.record(self.stream)
        return segments, event


_Staged = tuple[list[_Piece], list[tuple[int, int, Any, int]], Any]
B = TypeVar("B")
S = TypeVar("S")


def width(t: LiveTensor) -> int:
    """Bytes per element of ``t`` as the log encodes it (1, 2, 4 or 8)."""
    w = itemsize(t.dtype)
    return w if w in (1, 2, 4, 8) else 1


def stream_into(
    syncer: Syncer,
    plan: Sequence[Placement],
    *,
    progress: Callable[[int], None] | None = None,
    batch_bytes: int = BATCH_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    depth: int = STAGING_DEPTH,
    parallel_shards: bool = False,
) -> StreamStats:
    """Feeds every placement of ``plan`` (sorted by shard and offset) to ``syncer``;
    returns where the time went.

    With CUDA tensors, this thread issues the copies into the ring and a feeder
    thread hands each completed buffer to the core (GIL released); a buffer is
    refilled only after the core has returned it. ``progress`` is called from the
    feeder thread. ``parallel_shards`` interleaves the shards (:func:`interleave`)
    for a logged sync, whose batches write each shard from its own thread; without
    a log the core flushes each shard once the feed has moved past it, which wants
    the shards one after the other.
    """
    stats = StreamStats()
    if parallel_shards:
        plan = interleave(plan, INTERLEAVE_BYTES)
    chunks = _chunks(plan, max(batch_bytes, chunk_bytes), chunk_bytes)
    cuda = [p.live for p in plan if p.live.is_cuda]
    if not cuda:
        for pieces in chunks:
            t0 = time.perf_counter()
            syncer.feed(
                [
                    (p.shard, p.offset, p.live.stream_source(p.start, p.stop), width(p.live))
                    for p in pieces
                ]
            )
            stats.feed_s += time.perf_counter() - t0
            _count(stats, pieces, progress)
        return stats
    device = cuda[0].device_bytes().device
    others = {str(t.device_bytes().device) for t in cuda} - {str(device)}
    if others:
        # One stream and event per device would be needed: refuse rather than
        # diff a pinned buffer whose copy was issued on another device's stream.
        raise TypeError(
            f"live CUDA tensors on several devices ({device}, {', '.join(sorted(others))}); "
            "sync one device's tensors at a time"
        )
    t0 = time.perf_counter()
    stager = _Stager(device, chunk_bytes, depth)
    stats.setup_s = time.perf_counter() - t0

    def submit(slot: int, pieces: list[_Piece]) -> _Staged:
        return (pieces, *stager.submit(slot, pieces))

    def consume(staged: _Staged) -> None:
        pieces, segments, event = staged
        t0 = time.perf_counter()
        event.synchronize()
        t1 = time.perf_counter()
        syncer.feed(segments)  # GIL released: copies and pinning go on meanwhile
        stats.copy_wait_s += t1 - t0
        stats.feed_s += time.perf_counter() - t1
        _count(stats, pieces, progress)

    staging_ring(depth, chunks, submit, consume, stats, name="apollo-sync-feed")
    return stats


def staging_ring(
    depth: int,
    batches: Iterable[B],
    submit: Callable[[int, B], S],
    consume: Callable[[S], None],
    stats: StreamStats,
    *,
    name: str,
) -> None:
    """The ring of ``depth`` staging buffers: this thread starts each batch's copies
    into a free slot (``submit(slot, batch)``), a feeder thread ``consume``s the
    staged batches in order (waits for the copies, feeds the core) and frees
    their slots. A slot is refilled only once consumed; the first error of
    either side is raised here, and nothing is consumed after it."""
    ready: queue.Queue[tuple[int, S] | None] = queue.Queue()
    free: queue.Queue[int] = queue.Queue()
    for slot in range(depth):
        free.put(slot)
    failed: list[BaseException] = []
    stop = threading.Event()

    def feeder() -> None:
        try:
            while (item := ready.get()) is not None:
                slot, staged = item
                if stop.is_set():
                    continue
                consume(staged)
                free.put(slot)
        except BaseException as e:
            failed.append(e)
            stop.set()
            free.put(-1)  # wake the submitting thread

    thread = threading.Thread(target=feeder, name=name, daemon=True)
    thread.start()
    try:
        for batch in batches:
            slot = free.get()
            if slot < 0:
                break
            t0 = time.perf_counter()
            ready.put((slot, submit(slot, batch)))
            stats.submit_s += time.perf_counter() - t0
    except BaseException:
        stop.set()
        raise
    finally:
        ready.put(None)
        thread.join()
    if failed:
        raise failed[0]


def _count(
    stats: StreamStats, pieces: list[_Piece], progress: Callable[[int], None] | None
) -> None:
    n = sum(p.stop - p.start for p in pieces)
    stats.batches += 1
    stats.bytes += n
    if progress:
        progress(n)
