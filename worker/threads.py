"""How many CPU threads a forward pass runs on: one for a small pass, all for the rest. Pure.

A pass on several OpenMP threads meets the other threads at a barrier after every
parallel op (a small BERT has ~250 per pass). On a VM whose other vCPU has been idle
for 20–50 ms (the line moves from run to run), that vCPU wakes slowly and stays slow
for the whole pass: batch 1 × 32 tokens of all-MiniLM-L6-v2 in bf16 took 4.5 ms on 2
threads when passes came back to back, but 23 ms after 50 ms of idleness. On one thread
it took 5.4 ms and 9.1 ms (docs/benchmarks.md §3, machine H). A query that arrives at an
idle worker, the common case at query time, was paying 2.5–3× for the second thread.

So a small pass always runs on one thread. The choice depends on the batch alone, never
on timing, because the thread count changes the numbers: at 1 × 64 and 4 × 32 tokens,
bf16 vectors from one and two threads differ by up to 1.1e-3 and 3.0e-3. The same batch
must give the same vectors whenever it runs. When passes come back to back, one thread
costs 0.6–1.6 ms more per small bf16 pass (+11–21%) on machine H. float32 stays on every
thread: there one thread cost +40–60% back to back.
"""

from __future__ import annotations

from dataclasses import dataclass

# Matmul FLOPs of a pass up to which one thread runs it, for a worker of two threads:
# ~140 tokens of all-MiniLM-L6-v2 (21 MFLOP a token). In bf16 on machine H, after 50 ms of
# idleness one thread was 2.5–2.7× faster up to 1 × 64 tokens (10.3–10.9 vs 27.1–27.2 ms),
# while at 128–512 tokens the idle penalty came and went from run to run (one thread vs
# all, 1 × 128: 13.3 vs 10.7 ms; 8 × 64: 27.0 vs 36.1), so those passes keep every thread.
SINGLE_THREAD_FLOPS = {"bfloat16": 3e9}
# Measured on two threads only. With more, a one-thread pass gives up more when the
# cores are warm, so the budget shrinks with the thread count.
MEASURED_THREADS = 2


@dataclass(frozen=True)
class PassThreads:
    """Thread count per pass: 1 for a pass of at most ``single_thread_tokens`` tokens
    (padded, the whole batch), else all ``threads``."""

    threads: int
    # 0: every pass runs on all threads.
    single_thread_tokens: int

    def for_pass(self, tokens: int) -> int:
        return 1 if self.threads > 1 and tokens <= self.single_thread_tokens else self.threads


def single_thread_tokens(dtype: str, flops_per_token: float, threads: int) -> int:
    """The largest pass, in tokens, that runs on one thread (0: none)."""
    budget = SINGLE_THREAD_FLOPS.get(dtype, 0.0) * min(1.0, MEASURED_THREADS / max(threads, 1))
    if flops_per_token <= 0 or budget <= 0 or threads < 2:
        return 0
    return int(budget // flops_per_token)
