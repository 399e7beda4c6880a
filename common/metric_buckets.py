"""Histogram buckets shared by every embedq metric (gateway and workers)."""

from __future__ import annotations

# TEI's duration buckets: 1e-5 · 1.5^i seconds, i = 1..35 (15 µs to ~25 min).
DURATION_BUCKETS = tuple(1e-5 * 1.5**i for i in range(1, 36))
# Token counts and batch sizes: powers of two.
POWER_OF_TWO_BUCKETS = tuple(float(2**i) for i in range(0, 21))
