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


def test_bulk_never_widens_a_query_batch() -> None:
    b: Batcher[str] = Batcher(BatchLimits(max_batch_tokens=4096, max_batch_size=4))
    for n in (5, 8, 10, 50, 100, 200):
        b.add(f"bulk{n}", n, urgent=False)
    b.add("query", 10)
    first = b.next_batch()
    # Free rows take the longest bulk sequences that add no padding; none longer.
    assert first is not None and first.items == ["query", "bulk10", "bulk8", "bulk5"]
    assert first.padded_tokens == 40


def test_queries_keep_short_batches_under_a_long_backfill() -> None:
    # Growing over the whole pool let queries eat the backfill's short end, until each
    # query rode with ~100-token neighbours (bench/lanes_latency.py).
    rng = random.Random(4)
    b: Batcher[str] = Batcher(BatchLimits(max_batch_tokens=16384, max_batch_size=16))
    bulk = 0
    for step in range(400):
        while b.pending_tokens < 50_000:
            b.add(f"b{bulk}", rng.randint(12, 256), urgent=False)
            bulk += 1
        b.add(f"q{step}", 10)
        batch = b.next_batch()
        assert batch is not None and f"q{step}" in batch.items
        assert max(batch.lengths) == 10
        b.next_batch()  # a bulk batch between queries


def test_mixed_lanes_serve_every_sequence_once_within_limits() -> None:
    rng = random.Random(5)
    limits = BatchLimits(max_batch_tokens=1024, max_batch_size=8, bulk_every=2)
    b: Batcher[int] = Batcher(limits)
    served: list[int] = []
    for i in range(3000):
        b.add(i, rng.randint(1, 256), urgent=rng.random() < 0.3)
        if i % 3 == 0 and (batch := b.next_batch()) is not None:
            assert batch.padded_tokens <= limits.max_batch_tokens or len(batch.items) == 1
            assert len(batch.items) <= limits.max_batch_size
            served += batch.items
    served += [x for batch in _drain(b) for x in batch]
    assert sorted(served) == list(range(3000))
    assert b.pending_tokens == 0 and len(b) == 0


def test_a_padding_cap_splits_batches_of_mixed_lengths() -> None:
    lengths = [10, 12, 100, 110, 11, 105]
    capped: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=4096, max_padding_ratio=1.25))
    uncapped: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=4096))
    for i, n in enumerate(lengths):
        capped.add(i, n)
        uncapped.add(i, n)
    batches = _drain(capped)
    assert sorted(sorted(b) for b in batches) == [[0, 1, 4], [2, 3, 5]]
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert longest * len(b) <= 1.25 * sum(lengths[i] for i in b)
    assert len(_drain(uncapped)) == 1  # the budget alone takes them all, padded to 110


def test_a_padding_cap_never_leaves_a_sequence_behind() -> None:
    rng = random.Random(7)
    b: Batcher[int] = Batcher(BatchLimits(max_batch_tokens=2048, max_batch_size=16, max_padding_ratio=1.1))
    for i in range(500):
        b.add(i, rng.randint(1, 256), urgent=rng.random() < 0.5)
    served = [x for batch in _drain(b) for x in batch]
    assert sorted(served) == list(range(500))


def test_a_padding_ratio_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        BatchLimits(max_padding_ratio=0.9)


def test_urgent_tokens_are_counted_apart() -> None:
    b: Batcher[str] = Batcher(BatchLimits(max_batch_tokens=64, max_batch_size=2))
    b.add("q1", 5)
    b.add("bulk", 7, urgent=False)
    b.add("q2", 6)
    assert (b.pending_tokens, b.urgent_pending_tokens) == (18, 11)
    _drain(b)  # type: ignore[arg-type]
    assert (b.pending_tokens, b.urgent_pending_tokens) == (0, 0)


def test_add_many_matches_one_by_one_adds() -> None:
    """A job's sequences queued in one call are cut exactly as if added one at a time."""
    rng = random.Random(7)
    jobs = [[rng.randint(1, 60) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    lanes = [rng.random() < 0.4 for _ in jobs]
    limits = BatchLimits(max_batch_tokens=256, max_batch_size=16, max_padding_ratio=1.25)
    one, many = Batcher[tuple[int, int]](limits), Batcher[tuple[int, int]](limits)
    cuts_one, cuts_many = [], []
    for j, (lengths, urgent) in enumerate(zip(jobs, lanes, strict=True)):
        for i, n in enumerate(lengths):
            one.add((j, i), n, urgent=urgent)
        many.add_many([(j, i) for i in range(len(lengths))], lengths, urgent=urgent)
        if j % 3 == 2:  # cut while more arrive, as the worker does
            cuts_one.append(one.next_batch())
            cuts_many.append(many.next_batch())
        assert one.pending_tokens == many.pending_tokens
        assert one.urgent_pending_tokens == many.urgent_pending_tokens
        assert len(one) == len(many)
    while (b := one.next_batch()) is not None:
        cuts_one.append(b)
        cuts_many.append(many.next_batch())
    assert many.next_batch() is None
    assert [b.items if b else None for b in cuts_one] == [b.items if b else None for b in cuts_many]
    assert sorted(i for b in cuts_many if b for i in b.items) == [
        (j, i) for j, lengths in enumerate(jobs) for i in range(len(lengths))
    ]


def test_add_many_refuses_empty_sequences_and_mismatched_lengths() -> None:
    b = Batcher[str](BatchLimits())
    with pytest.raises(ValueError):
        b.add_many(["a", "b"], [3, 0])
    with pytest.raises(ValueError):
        b.add_many(["a", "b"], [3])
    assert len(b) == 0 and b.pending_tokens == 0
