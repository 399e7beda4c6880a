import random

import pytest

from embedq.worker.batcher import Batcher, BatchLimits


def _drain(b: Batcher[int]) -> list[list[int]]:
    out = []
    while (batch := b.next_batch()) is not None:
        out.append(batch.items)
    return out


def test_empty() -> None:
    assert Batcher[int](BatchLimits()).next_batch() is None


def test_padded_budget_respected_and_everything_served() -> None:
    rng = random.Random(1)
    lengths = {i: rng.randint(1, 256) for i in range(2000)}
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=4096, max_batch_size=64))
    for i, n in lengths.items():
        b.add(i, n)
    served: list[int] = []
    while (batch := b.next_batch()) is not None:
        assert batch.padded_tokens <= 4096
        assert len(batch.items) <= 64
        served += batch.items
    assert sorted(served) == list(lengths)
    assert b.pending_tokens == 0 and len(b) == 0


def test_single_sequence_over_budget_still_runs_alone() -> None:
    b: Batcher[str] = Batcher(BatchLimits(max_batch_tokens=100))
    b.add("long", 500)
    b.add("short", 5)
    first = b.next_batch()
    assert first is not None and first.items == ["long"]


def test_every_batch_contains_the_oldest() -> None:
    rng = random.Random(2)
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=2048, max_batch_size=32))
    order = list(range(500))
    for i in order:
        b.add(i, rng.randint(1, 200))
    waiting = set(order)
    while (batch := b.next_batch()) is not None:
        assert min(waiting) in batch.items
        waiting -= set(batch.items)


def test_long_input_is_not_starved_by_a_stream_of_short_ones() -> None:
    b: Batcher[str] = Batcher(BatchLimits(max_batch_tokens=512, max_batch_size=16))
    b.add("long", 400)
    for i in range(16):
        b.add(f"s{i}", 10)
    served_at = None
    for step in range(50):
        for i in range(16):  # a steady stream of new short inputs
            b.add(f"n{step}-{i}", 10)
        batch = b.next_batch()
        assert batch is not None
        if "long" in batch.items:
            served_at = step
            break
    assert served_at == 0


def test_length_aware_batches_have_little_padding() -> None:
    rng = random.Random(3)
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=16384, max_batch_size=32))
    real = padded = 0
    for i in range(4000):
        b.add(i, rng.randint(10, 256))
    while (batch := b.next_batch()) is not None:
        real += batch.real_tokens
        padded += batch.padded_tokens
    # Strict FIFO in batches of 32 would pad to ~1.6x here.
    assert padded / real < 1.1


def test_fifo_order_when_lengths_equal() -> None:
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=1000, max_batch_size=4))
    for i in range(10):
        b.add(i, 10)
    assert _drain(b) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_packed_budget_counts_real_tokens() -> None:
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=100, max_batch_size=100, padded=False))
    for i, n in enumerate([50, 10, 10, 10, 10, 10]):
        b.add(i, n)
    first = b.next_batch()
    assert first is not None and first.real_tokens <= 100 and len(first.items) == 6


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        BatchLimits(max_batch_tokens=0)
    with pytest.raises(ValueError):
        Batcher[int](BatchLimits()).add(1, 0)


def test_urgent_sequences_are_served_before_older_bulk_ones() -> None:
    b: Batcher[str] = Batcher(BatchLimits(max_batch_tokens=64, max_batch_size=2))
    for i in range(10):
        b.add(f"bulk{i}", 30, urgent=False)
    b.add("query", 30)
    first = b.next_batch()
    assert first is not None and "query" in first.items


def test_bulk_lane_is_not_starved_by_steady_interactive_load() -> None:
    limits = BatchLimits(max_batch_tokens=10, max_batch_size=1, bulk_every=3)
    b: Batcher[str] = Batcher(limits)
    b.add("bulk", 5, urgent=False)
    served: list[str] = []
    for i in range(20):  # a new query arrives before every batch
        b.add(f"q{i}", 5)
        batch = b.next_batch()
        assert batch is not None
        served += batch.items
    # The bulk item anchors a batch after at most bulk_every urgent ones.
    assert served.index("bulk") == limits.bulk_every


def test_bulk_alone_is_served_in_age_order() -> None:
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=8, max_batch_size=1))
    for i in range(5):
        b.add(i, 3, urgent=False)
    assert [x for batch in _drain(b) for x in batch] == [0, 1, 2, 3, 4]
