"""Cutting batches of sequences up to a token budget. Pure: no Redis, no model.

Policy (better than strict FIFO, and starvation-free):
- two lanes: a batch is anchored at the oldest *urgent* (interactive) sequence when one
  waits, so a query never queues behind a bulk backfill; the oldest bulk sequence
  anchors a batch at least once every ``bulk_every`` batches, so bulk work keeps
  moving under a steady interactive load (ageing);
- every batch contains its lane's oldest waiting sequence, so nothing waits forever;
- around it, the batch takes neighbours in token-length order, growing towards the
  side that adds the least padding, so lengths in a batch are close and padding stays
  near zero when a backlog exists;
- cost is ``longest × count`` for padded execution and ``sum of lengths`` for packed.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    padded: bool = True
    # While interactive work waits, every n-th batch still starts from the oldest bulk one.
    bulk_every: int = 4

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1 or self.bulk_every < 1:
            raise ValueError("batch limits must be positive")


@dataclass(order=True)
class _Entry(Generic[T]):
    length: int
    seq: int
    item: T = field(compare=False)


@dataclass(frozen=True)
class Batch(Generic[T]):
    items: list[T]
    lengths: list[int]

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padded_tokens(self) -> int:
        return max(self.lengths, default=0) * len(self.lengths)


class Batcher(Generic[T]):
    """Holds waiting sequences and cuts the next batch on demand."""

    def __init__(self, limits: BatchLimits) -> None:
        self._limits = limits
        self._by_length: list[_Entry[T]] = []
        # Per lane (urgent first), a heap of seq numbers, lazily cleaned.
        self._by_age: tuple[list[int], list[int]] = ([], [])
        # Length of every waiting seq number (finds its place in _by_length by bisection).
        self._live: dict[int, int] = {}
        self._counter = itertools.count()
        self._tokens = 0
        self._urgent_batches = 0  # batches anchored urgent in a row while bulk waited

    def __len__(self) -> int:
        return len(self._by_length)

    @property
    def pending_tokens(self) -> int:
        return self._tokens

    def add(self, item: T, length: int, *, urgent: bool = True) -> None:
        """Queue one sequence; ``urgent`` ones (the interactive lane) are served first."""
        if length < 1:
            raise ValueError("a sequence has at least one token")
        seq = next(self._counter)
        bisect.insort(self._by_length, _Entry(length, seq, item))
        heapq.heappush(self._by_age[0 if urgent else 1], seq)
        self._live[seq] = length
        self._tokens += length

    def _oldest(self, lane: int) -> int | None:
        heap = self._by_age[lane]
        while heap and heap[0] not in self._live:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _anchor_seq(self) -> int:
        urgent, bulk = self._oldest(0), self._oldest(1)
        if urgent is None or (bulk is not None and self._urgent_batches >= self._limits.bulk_every):
            self._urgent_batches = 0
            assert bulk is not None
            return bulk
        if bulk is not None:
            self._urgent_batches += 1
        return urgent

    def _fits(self, longest: int, lengths_sum: int, count: int) -> bool:
        cost = longest * count if self._limits.padded else lengths_sum
        return cost <= self._limits.max_batch_tokens

    def _padding_left(self, entries: list[_Entry[T]], lo: int, hi: int) -> int:
        return entries[hi].length - entries[lo - 1].length if self._limits.padded else 0

    def _padding_right(self, entries: list[_Entry[T]], hi: int, count: int) -> int:
        return (entries[hi + 1].length - entries[hi].length) * count if self._limits.padded else 0

    def next_batch(self) -> Batch[T] | None:
        if not self._by_length:
            return None
        oldest = self._anchor_seq()
        entries = self._by_length
        # Entries sort by (length, seq): bisection finds the anchor without a scan.
        anchor = bisect.bisect_left(entries, _Entry(self._live[oldest], oldest, None))  # type: ignore[arg-type]

        lo = hi = anchor
        total = entries[anchor].length
        limits = self._limits
        while hi - lo + 1 < limits.max_batch_size:
            count = hi - lo + 1
            longest = entries[hi].length  # sorted by length: the longest is at hi
            left = (
                lo - 1 if lo > 0 and self._fits(longest, total + entries[lo - 1].length, count + 1) else None
            )
            right = (
                hi + 1
                if hi + 1 < len(entries)
                and self._fits(entries[hi + 1].length, total + entries[hi + 1].length, count + 1)
                else None
            )
            if left is None and right is None:
                break
            # Grow where less padding is added: a shorter neighbour pads itself up to the
            # longest; a longer one widens every row already taken.
            if right is None or (
                left is not None
                and self._padding_left(entries, lo, hi) <= self._padding_right(entries, hi, count)
            ):
                lo -= 1
                total += entries[lo].length
            else:
                hi += 1
                total += entries[hi].length

        chosen = entries[lo : hi + 1]
        del entries[lo : hi + 1]
        for e in chosen:
            del self._live[e.seq]
            self._tokens -= e.length
        return Batch(items=[e.item for e in chosen], lengths=[e.length for e in chosen])
