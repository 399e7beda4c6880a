"""Cutting batches of sequences up to a token budget. Pure: no Redis, no model.

Policy (better than strict FIFO, and starvation-free):
- two lanes: a batch is anchored at the oldest *urgent* (interactive) sequence when one
  waits, so a query never queues behind a bulk backfill; the oldest bulk sequence
  anchors a batch at least once every ``bulk_every`` batches, so bulk work keeps
  moving under a steady interactive load (ageing);
- every batch contains its lane's oldest waiting sequence, so nothing waits forever;
- a batch anchored at an interactive sequence grows over interactive sequences only,
  then fills its free rows with bulk ones no longer than its longest: bulk work never
  widens (slows down) a query's batch;
- around it, the batch takes neighbours in token-length order, growing towards the
  side that adds the least padding, so lengths in a batch are close and padding stays
  near zero when a backlog exists;
- cost is ``longest × count`` for padded execution and ``sum of lengths`` for packed;
  on a CPU a padded batch also stops growing where padding would pass a set ratio.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    padded: bool = True
    # While interactive work waits, every n-th batch still starts from the oldest bulk one.
    bulk_every: int = 4
    # Padded execution: a sequence joins a batch only while computed tokens stay within
    # this multiple of real ones (None: no cap). On a CPU, compute follows computed tokens
    # and a forward pass has little fixed cost, so two well-filled batches beat one
    # padded one; a GPU wants its rows filled instead.
    max_padding_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1 or self.bulk_every < 1:
            raise ValueError("batch limits must be positive")
        if self.max_padding_ratio is not None and self.max_padding_ratio < 1:
            raise ValueError("max_padding_ratio must be at least 1")


# A waiting sequence is one int, length << _SHIFT | seq (its arrival number), so the
# sorted lists order by (length, age) and compare as plain ints: merging thousands of
# them is several times cheaper than tuples. Items are looked up by seq. 48 bits of seq
# last ~90 years at 100,000 sequences a second.
_SHIFT = 48
_SEQ_MASK = (1 << _SHIFT) - 1


def _length(key: int) -> int:
    return key >> _SHIFT


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
        self._by_length: list[int] = []
        # The urgent entries again, by length: an urgent-anchored batch grows over these.
        self._urgent_by_length: list[int] = []
        # Entries added since the last cut, merged into the sorted lists by the next one:
        # inserting one by one into a list of thousands moves it each time (bisect.insort
        # is O(n)), and a 32-input job would move it 32 times.
        self._incoming: list[int] = []
        self._urgent_incoming: list[int] = []
        # Per lane (urgent first), its seq numbers in arrival order, lazily cleaned: they
        # only grow, so a deque is already sorted and drops the oldest in O(1).
        self._by_age: tuple[deque[int], deque[int]] = (deque(), deque())
        # Key and item of every waiting seq number.
        self._live: dict[int, tuple[int, T]] = {}
        self._next_seq = 0  # arrival number of the next sequence
        self._tokens = 0
        # Seq numbers of the urgent sequences waiting, and their tokens.
        self._urgent_seqs: set[int] = set()
        self._urgent_tokens = 0
        self._urgent_batches = 0  # batches anchored urgent in a row while bulk waited

    def __len__(self) -> int:
        return len(self._by_length) + len(self._incoming)

    @property
    def pending_tokens(self) -> int:
        return self._tokens

    @property
    def urgent_pending_tokens(self) -> int:
        """Tokens of the urgent (interactive) sequences waiting."""
        return self._urgent_tokens

    def add(self, item: T, length: int, *, urgent: bool = True) -> None:
        """Queue one sequence; ``urgent`` ones (the interactive lane) are served first."""
        self.add_many([item], [length], urgent=urgent)

    def add_many(self, items: Sequence[T], lengths: Sequence[int], *, urgent: bool = True) -> None:
        """Queue the sequences of one job, in order (one call instead of one per input)."""
        if len(items) != len(lengths):
            raise ValueError("one length per item")
        if min(lengths, default=1) < 1:
            raise ValueError("a sequence has at least one token")
        seqs = range(self._next_seq, self._next_seq + len(items))
        self._next_seq = seqs.stop
        new_keys = [length << _SHIFT | seq for length, seq in zip(lengths, seqs, strict=True)]
        self._incoming += new_keys
        self._live.update(zip(seqs, zip(new_keys, items, strict=True), strict=True))
        tokens = sum(lengths)
        self._tokens += tokens
        if urgent:
            self._urgent_incoming += new_keys
            self._urgent_seqs.update(seqs)
            self._urgent_tokens += tokens
        self._by_age[0 if urgent else 1].extend(seqs)

    def _oldest(self, lane: int) -> int | None:
        queue, live = self._by_age[lane], self._live
        while queue and queue[0] not in live:
            queue.popleft()
        return queue[0] if queue else None

    def _anchor_seq(self) -> tuple[int, bool]:
        """The seq number the next batch starts from, and whether it is urgent."""
        urgent, bulk = self._oldest(0), self._oldest(1)
        if urgent is None or (bulk is not None and self._urgent_batches >= self._limits.bulk_every):
            self._urgent_batches = 0
            assert bulk is not None
            return bulk, False
        if bulk is not None:
            self._urgent_batches += 1
        return urgent, True

    def _fits(self, longest: int, lengths_sum: int, count: int) -> bool:
        limits = self._limits
        if not limits.padded:
            return lengths_sum <= limits.max_batch_tokens
        cost = longest * count
        if limits.max_padding_ratio is not None and cost > limits.max_padding_ratio * lengths_sum:
            return False
        return cost <= limits.max_batch_tokens

    def _grow(self, entries: list[int], anchor: int) -> tuple[int, int]:
        """The slice [lo, hi] of ``entries`` (sorted by length) cut around ``anchor``.

        The batcher's hottest loop (one round per sequence taken), so the cost rule of
        _fits is inlined on locals.
        """
        limits = self._limits
        cap, budget, padded = limits.max_batch_size, limits.max_batch_tokens, limits.padded
        ratio = limits.max_padding_ratio
        last = len(entries) - 1
        lo = hi = anchor
        longest = entries[anchor] >> _SHIFT  # sorted by length: the longest is at hi
        total = longest
        count = 1
        while count < cap:
            grown = count + 1
            left = -1
            if lo > 0:
                length = entries[lo - 1] >> _SHIFT
                if not padded:
                    left = length if total + length <= budget else -1
                else:
                    cost = longest * grown
                    if cost <= budget and (ratio is None or cost <= ratio * (total + length)):
                        left = length
            right = -1
            if hi < last:
                length = entries[hi + 1] >> _SHIFT
                if not padded:
                    right = length if total + length <= budget else -1
                else:
                    cost = length * grown
                    if cost <= budget and (ratio is None or cost <= ratio * (total + length)):
                        right = length
            if left < 0 and right < 0:
                break
            # Grow where less padding is added: a shorter neighbour pads itself up to the
            # longest; a longer one widens every row already taken.
            if right < 0 or (left >= 0 and (not padded or longest - left <= (right - longest) * count)):
                lo -= 1
                total += left
            else:
                hi += 1
                total += right
                longest = right
            count = grown
        return lo, hi

    def _settle(self) -> None:
        """Merge the entries added since the last cut into the sorted lists."""
        for incoming, entries in (
            (self._incoming, self._by_length),
            (self._urgent_incoming, self._urgent_by_length),
        ):
            if len(incoming) <= 4:
                for e in incoming:
                    bisect.insort(entries, e)
            else:
                # Two sorted runs of ints: timsort merges them in one linear pass, in C.
                incoming.sort()
                entries += incoming
                entries.sort()
            incoming.clear()

    def next_batch(self) -> Batch[T] | None:
        if self._incoming:
            self._settle()
        if not self._by_length:
            return None
        oldest, urgent = self._anchor_seq()
        key = self._live[oldest][0]
        if urgent and len(self._urgent_by_length) < len(self._by_length):
            chosen = self._urgent_batch(key)
        else:
            entries = self._by_length
            # Entries sort by (length, seq): bisection finds the anchor without a scan.
            lo, hi = self._grow(entries, bisect.bisect_left(entries, key))
            chosen = entries[lo : hi + 1]
            if len(self._urgent_by_length) == len(entries):
                del self._urgent_by_length[lo : hi + 1]  # all urgent: the same list twice
            elif self._urgent_by_length:  # urgent neighbours of a bulk anchor ride along
                _remove(self._urgent_by_length, chosen)
            del entries[lo : hi + 1]
        seqs = [k & _SEQ_MASK for k in chosen]
        lengths = [k >> _SHIFT for k in chosen]
        pop = self._live.pop
        items: list[T] = [pop(seq)[1] for seq in seqs]
        tokens = sum(lengths)
        self._tokens -= tokens
        urgent_seqs = self._urgent_seqs
        taken = urgent_seqs.intersection(seqs)
        if taken:
            urgent_seqs.difference_update(taken)
            if len(taken) == len(seqs):
                self._urgent_tokens -= tokens
            else:
                self._urgent_tokens -= sum(n for seq, n in zip(seqs, lengths, strict=True) if seq in taken)
        return Batch(items=items, lengths=lengths)

    def _urgent_batch(self, key: int) -> list[int]:
        """Urgent sequences around the anchor, then free rows for bulk ones no longer than
        the longest taken, the longest first (the least padding).

        Growing over the whole pool instead let queries' batches eat the short end of a
        backfill, until every query rode with ~100-token bulk neighbours and its batch
        cost as much as a bulk one (bench/lanes_latency.py).
        """
        urgent = self._urgent_by_length
        lo, hi = self._grow(urgent, bisect.bisect_left(urgent, key))
        chosen = urgent[lo : hi + 1]
        del urgent[lo : hi + 1]
        entries = self._by_length
        _remove(entries, chosen)
        longest = _length(chosen[-1])
        total = sum(_length(e) for e in chosen)
        taken = len(chosen)
        # Downwards from the last entry no longer than the batch's longest.
        i = bisect.bisect_left(entries, (longest + 1) << _SHIFT)
        while i > 0 and taken < self._limits.max_batch_size:
            i -= 1
            e = entries[i]
            if _contains(urgent, e):
                continue  # left out of the urgent cut: it did not fit
            if not self._fits(longest, total + _length(e), taken + 1):
                break
            chosen.append(e)
            del entries[i]  # below i nothing moves
            total += _length(e)
            taken += 1
        return chosen


def _contains(entries: list[int], key: int) -> bool:
    i = bisect.bisect_left(entries, key)
    return i < len(entries) and entries[i] == key


def _remove(entries: list[int], gone: list[int]) -> None:
    """Delete ``gone`` from the sorted ``entries`` (those it holds)."""
    if len(gone) <= 32:
        for key in gone:
            i = bisect.bisect_left(entries, key)
            if i < len(entries) and entries[i] == key:
                del entries[i]
    else:  # one linear pass beats many list deletions
        keys = set(gone)
        entries[:] = [e for e in entries if e not in keys]
