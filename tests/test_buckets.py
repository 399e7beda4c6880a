"""Length buckets (worker/buckets.py): the widths a backend pads batches up to. Pure."""

from __future__ import annotations

import pytest

from embedq.worker.buckets import COMPILE_MIN_STEP, EAGER_MIN_STEP, bucket_length, bucket_lengths, bucket_step


def test_steps_are_min_step_then_a_sixteenth_of_the_length() -> None:
    assert [bucket_step(w, 8) for w in (1, 8, 127, 128, 255, 256, 511, 512, 1024)] == [
        8, 8, 8, 8, 8, 16, 16, 32, 64,
    ]  # fmt: skip
    assert [bucket_step(w, 16) for w in (1, 255, 256, 511, 512)] == [16, 16, 16, 16, 32]


def test_bucket_length_rounds_up_within_the_cap() -> None:
    assert [bucket_length(w, 256, 8) for w in (1, 8, 9, 130, 250, 256)] == [8, 8, 16, 136, 256, 256]
    assert [bucket_length(w, 512, 8) for w in (257, 300, 500)] == [272, 304, 512]
    assert bucket_length(100, 100, 8) == 100  # capped at the model's limit
    assert bucket_length(97, 100, 16) == 100
    assert bucket_length(300, 256, 8) == 300  # never shorter than the batch
    # --compile's buckets stay multiples of 16 up to 512 tokens, as before buckets grew.
    widths = (1, 17, 250, 300, 512)
    assert [bucket_length(w, 512, COMPILE_MIN_STEP) for w in widths] == [16, 32, 256, 304, 512]


@pytest.mark.parametrize("cap", [128, 256, 300, 512, 8192])
@pytest.mark.parametrize("min_step", [EAGER_MIN_STEP, COMPILE_MIN_STEP])
def test_every_width_pads_to_a_listed_bucket_and_by_little(cap: int, min_step: int) -> None:
    top = min(cap, 2048)
    buckets = bucket_lengths(top, cap, min_step)
    assert buckets == sorted(set(buckets)) and buckets[-1] == top
    for width in range(1, top + 1):
        padded = bucket_length(width, cap, min_step)
        assert padded in buckets and width <= padded <= cap
        # At most one step of padding: under 1/16 of the width past 16 steps.
        assert padded - width < max(min_step, width / 16 + 1)


def test_few_buckets() -> None:
    assert len(bucket_lengths(256, 256, EAGER_MIN_STEP)) == 32
    assert len(bucket_lengths(512, 512, EAGER_MIN_STEP)) == 48
    assert len(bucket_lengths(512, 512, COMPILE_MIN_STEP)) == 32
    assert len(bucket_lengths(8192, 8192, EAGER_MIN_STEP)) == 48 + 4 * 16
