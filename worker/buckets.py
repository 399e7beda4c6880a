"""Sequence-length buckets: the widths a backend pads its batches up to. Pure.

A CPU backend whose matmuls go through oneDNN (bfloat16, and anything torch.compile
emits) builds a kernel for every new matrix shape: ~3.5 ms for each of a BERT layer's
three Linear shapes on an AMX Xeon, against ~1–4 ms to run one (docs/benchmarks.md §1,
machine H). Each kernel also keeps ~1 MiB in oneDNN's cache. Padding the length up to a
bucket bounds the shapes a worker ever meets, so that after warm-up a batch almost never
pays for a new kernel and the cache stops growing.

Buckets are ``min_step`` apart up to ``16 · min_step`` tokens, then 16 per doubling of
length, so bucket padding stays under 1/16 of the longest sequence (~3% on average).
"""

from __future__ import annotations

# Buckets per doubling of the length, past the first 16 steps.
PER_DOUBLING = 16
# Steps of the eager bfloat16 path on a CPU, and of --compile (whose graph warm-up runs
# each bucket; 16 keeps it to 32 buckets up to 512 tokens).
EAGER_MIN_STEP = 8
COMPILE_MIN_STEP = 16


def bucket_step(width: int, min_step: int) -> int:
    """Distance between the buckets around ``width`` tokens."""
    return max(min_step, (1 << (max(width, 1).bit_length() - 1)) // PER_DOUBLING)


def bucket_length(width: int, cap: int, min_step: int) -> int:
    """``width`` rounded up to its bucket, but never past ``cap`` nor below ``width``."""
    step = bucket_step(width, min_step)
    return max(width, min(cap, -(-width // step) * step))


def bucket_lengths(top: int, cap: int, min_step: int) -> list[int]:
    """Every bucket a width of 1..``top`` tokens pads to, shortest first."""
    out: list[int] = []
    width = 1
    while width <= top:
        bucket = bucket_length(width, cap, min_step)
        out.append(bucket)
        width = bucket + 1
    return out
