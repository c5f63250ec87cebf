"""Streaming live bytes into the Rust core in bounded batches.

Host tensors are handed over in place (buffer protocol, no copy). CUDA tensors are
copied in chunks into a small ring of pinned host buffers on a side stream; while
the core diffs chunk *i* (GIL released), the copies of the next chunks proceed.
Host memory stays bounded by the ring, whatever the model weighs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from apollo_sync._core import Syncer
from apollo_sync.live import LiveTensor

#: Bytes handed to the core per call (progress is reported between calls).
BATCH_BYTES = 256 << 20
#: Size and number of pinned staging buffers for CUDA tensors.
CHUNK_BYTES = 64 << 20
STAGING_DEPTH = 3


@dataclass(frozen=True)
class Placement:
    """Live bytes and where they go: shard index and absolute file offset."""

    shard: int
    offset: int
    live: LiveTensor


@dataclass(frozen=True)
class _Piece:
    shard: int
    offset: int  # file offset of this piece
    live: LiveTensor
    start: int  # byte range inside the live tensor
    stop: int


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
    """A ring of pinned buffers and a side stream for device-to-host copies."""

    def __init__(self, device: torch.device, chunk: int, depth: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)  # default (lowest) priority
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.buffers = [
            torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(depth)
        ]
        self.views = [b.numpy() for b in self.buffers]

    def submit(self, slot: int, pieces: list[_Piece]) -> tuple[list[tuple[int, int, Any]], Any]:
        """Starts the copies of ``pieces`` into buffer ``slot``; returns the segments
        (valid once the returned event has completed) and the event."""
        segments: list[tuple[int, int, Any]] = []
        pos = 0
        with torch.cuda.stream(self.stream):
            for p in pieces:
                n = p.stop - p.start
                if p.live.is_cuda:
                    self.buffers[slot][pos : pos + n].copy_(
                        p.live.device_bytes(p.start, p.stop), non_blocking=True
                    )
                    segments.append((p.shard, p.offset, self.views[slot][pos : pos + n]))
                    pos += n
                else:
                    segments.append((p.shard, p.offset, p.live.stream_source(p.start, p.stop)))
            event = torch.cuda.Event()
            event.record(self.stream)
        return segments, event


def stream_into(
    syncer: Syncer,
    plan: Sequence[Placement],
    *,
    progress: Callable[[int], None] | None = None,
    batch_bytes: int = BATCH_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    depth: int = STAGING_DEPTH,
) -> None:
    """Feeds every placement of ``plan`` (sorted by shard and offset) to ``syncer``."""
    chunks = _chunks(plan, batch_bytes, chunk_bytes)
    cuda = [p.live for p in plan if p.live.is_cuda]
    if not cuda:
        for pieces in chunks:
            syncer.feed(
                [(p.shard, p.offset, p.live.stream_source(p.start, p.stop)) for p in pieces]
            )
            if progress:
                progress(sum(p.stop - p.start for p in pieces))
        return
    device = cuda[0].device_bytes().device
    others = {str(t.device_bytes().device) for t in cuda} - {str(device)}
    if others:
        # One stream and event per device would be needed: refuse rather than
        # diff a pinned buffer whose copy was issued on another device's stream.
        raise TypeError(
            f"live CUDA tensors on several devices ({device}, {', '.join(sorted(others))}); "
            "sync one device's tensors at a time"
        )
    stager = _Stager(device, chunk_bytes, depth)
    inflight: deque[tuple[int, list[_Piece], list[tuple[int, int, Any]], Any]] = deque()

    def submit(slot: int) -> None:
        pieces = next(chunks, None)
        if pieces is not None:
            inflight.append((slot, pieces, *stager.submit(slot, pieces)))

    for slot in range(depth):
        submit(slot)
    while inflight:
        slot, pieces, segments, event = inflight.popleft()
        event.synchronize()
        syncer.feed(segments)  # GIL released: the next copies run meanwhile
        if progress:
            progress(sum(p.stop - p.start for p in pieces))
        submit(slot)
