"""How many CPU threads a forward pass runs on, after the worker sat idle. Pure.

A pass on several OpenMP threads meets the other threads at a barrier after every
parallel op (a small BERT has ~250 per pass). On a VM whose other vCPU has been idle
for more than ~10–20 ms, that vCPU wakes slowly and stays slow for the whole pass:
batch 1 × 32 tokens of all-MiniLM-L6-v2 in bf16 took 4.5 ms on 2 threads when passes
came 2–10 ms apart, but 22–24 ms after 20 ms or more of idleness. On one thread it
took 5.5–6.4 ms and 8.7 ms (docs/benchmarks.md §3, machine H). A query that arrives at
an idle worker (the common case at query time) was paying 3× for the second thread.

So a small pass (its matmuls under a FLOP budget for which one thread finishes sooner
than cold ones) runs on one thread while the other threads are cold: no pass used them
in the last 10 ms. A big pass wakes them, and so do 50 ms of passes with no gap of
10 ms between them (a steady stream of small requests).
"""

from __future__ import annotations

# Idle time after which the other cores count as cold (measured: warm at 10 ms of
# idleness, cold from 20 ms on).
COLD_AFTER_S = 0.010
# Matmul work below which one thread beats all threads when they are cold, in FLOPs of
# the pass. all-MiniLM-L6-v2 (21 MFLOP a token) on the AMX Xeon: bf16, one thread won at
# 512 tokens (24.5 vs 31.9 ms) and lost at 1,024 (40.7 vs 27.4); float32 won at 64
# tokens (18.4 vs 37.1) and lost at 256 (51.7 vs 42.8).
SINGLE_THREAD_FLOPS = {"bfloat16": 12e9, "float32": 3e9}
# Passes with no idle gap (< COLD_AFTER_S) between them for this long wake the other
# cores anyway: a steady stream of small passes would otherwise stay on one thread for
# good. That costs one cold pass.
WAKE_AFTER_BUSY_S = 0.050


class PassThreads:
    """Thread count per pass: all ``threads``, or 1 for a small pass while the other
    cores are cold. The caller gives the clock (time.monotonic()) at each pass's
    begin() and end()."""

    def __init__(self, threads: int, single_thread_tokens: int) -> None:
        self.threads = threads
        # Passes of at most this many tokens (padded) run on one thread when cold; 0: never.
        self.single_thread_tokens = single_thread_tokens
        self._parallel_end = float("-inf")  # when a pass on > 1 thread last ended
        self._last_end = float("-inf")
        self._busy_since = 0.0  # start of the current run of passes without idle gaps
        self._running = threads

    @property
    def running(self) -> int:
        """The thread count of the pass in progress, or of the last one."""
        return self._running

    def begin(self, tokens: int, now: float) -> int:
        """The thread count for a pass of ``tokens`` that starts at ``now``."""
        if now - self._last_end >= COLD_AFTER_S:
            self._busy_since = now
        cold = now - self._parallel_end >= COLD_AFTER_S and now - self._busy_since < WAKE_AFTER_BUSY_S
        small = tokens <= self.single_thread_tokens
        self._running = 1 if self.threads > 1 and cold and small else self.threads
        return self._running

    def end(self, now: float) -> None:
        self._last_end = now
        if self._running > 1:
            self._parallel_end = now


def single_thread_tokens(dtype: str, flops_per_token: float) -> int:
    """The largest pass, in tokens, that one thread runs sooner than cold threads."""
    budget = SINGLE_THREAD_FLOPS.get(dtype, 0.0)
    if flops_per_token <= 0 or budget <= 0:
        return 0
    return int(budget // flops_per_token)
