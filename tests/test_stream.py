"""The staging ring both streamers share (one GPU's tensors, a set of ranks)."""

from __future__ import annotations

import threading

import pytest

from apollo_sync.stream import StreamStats, staging_ring


def test_batches_are_consumed_in_order_and_slots_are_reused_only_once_free() -> None:
    held: set[int] = set()
    most = 0
    consumed: list[int] = []
    lock = threading.Lock()

    def submit(slot: int, batch: int) -> tuple[int, int]:
        nonlocal most
        with lock:
            assert slot not in held, f"slot {slot} refilled before it was consumed"
            held.add(slot)
            most = max(most, len(held))
        return slot, batch

    def consume(staged: tuple[int, int]) -> None:
        slot, batch = staged
        consumed.append(batch)
        with lock:
            held.discard(slot)

    staging_ring(3, range(50), submit, consume, StreamStats(), name="test-ring")
    assert consumed == list(range(50))
    assert 1 <= most <= 3


def test_an_error_in_the_feeder_stops_the_ring_and_is_raised() -> None:
    consumed: list[int] = []
    submitted: list[int] = []

    def submit(slot: int, batch: int) -> int:
        submitted.append(batch)
        return batch

    def consume(batch: int) -> None:
        if batch == 5:
            raise OSError("disk full")
        consumed.append(batch)

    with pytest.raises(OSError, match="disk full"):
        staging_ring(2, range(1000), submit, consume, StreamStats(), name="test-ring")
    assert consumed == [0, 1, 2, 3, 4]
    assert len(submitted) < 1000  # the submitting side stopped too


def test_an_error_while_submitting_is_raised_and_nothing_after_it_is_consumed() -> None:
    # Batches staged before the error may or may not be consumed by then (the
    # ring stops the feeder), but never out of order and never one after it.
    consumed: list[int] = []

    def submit(slot: int, batch: int) -> int:
        if batch == 3:
            raise RuntimeError("cudaMemcpy2DAsync failed")
        return batch

    with pytest.raises(RuntimeError, match="cudaMemcpy2DAsync"):
        staging_ring(2, range(10), submit, consumed.append, StreamStats(), name="test-ring")
    assert consumed == [0, 1, 2][: len(consumed)]
