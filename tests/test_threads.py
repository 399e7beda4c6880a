"""Thread count per forward pass while the other cores are cold (worker/threads.py),
pure and in the torch backend."""

from __future__ import annotations

import time

import pytest
import torch

from embedq.worker.threads import COLD_AFTER_S, WAKE_AFTER_BUSY_S, PassThreads, single_thread_tokens


def run(policy: PassThreads, tokens: int, start: float, seconds: float = 0.001) -> int:
    threads = policy.begin(tokens, start)
    policy.end(start + seconds)
    return threads


def test_small_passes_run_on_one_thread_until_a_big_one_wakes_the_others() -> None:
    policy = PassThreads(threads=4, single_thread_tokens=512)
    assert run(policy, 512, 100.0) == 1  # never used: cold
    assert run(policy, 16, 100.003) == 1  # one-thread passes leave the others cold
    assert run(policy, 513, 100.006) == 4  # big: every thread, cold or not
    assert run(policy, 16, 100.006 + COLD_AFTER_S / 2) == 4  # warm now
    assert run(policy, 16, 101.0) == 1  # idle for a second: cold again


def test_a_worker_kept_busy_by_small_passes_wakes_the_others() -> None:
    policy = PassThreads(threads=2, single_thread_tokens=512)
    now, seen = 50.0, []
    while now < 50.0 + 2 * WAKE_AFTER_BUSY_S:
        seen.append(run(policy, 64, now, seconds=0.004))
        now += 0.005  # 1 ms between passes: never idle
    first_two = seen.index(2)
    assert 0 < first_two <= WAKE_AFTER_BUSY_S / 0.005 + 1
    assert set(seen[first_two:]) == {2}  # then warm for good
    # An idle gap starts a new busy run: one thread again.
    assert run(policy, 64, now + 1.0) == 1


def test_never_single_thread_when_disabled_or_already_one() -> None:
    assert run(PassThreads(threads=2, single_thread_tokens=0), 1, 10.0) == 2
    assert run(PassThreads(threads=1, single_thread_tokens=512), 1, 10.0) == 1


def test_token_limit_shrinks_with_the_model_and_the_dtype() -> None:
    minilm = 2 * (6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384)  # 21.5 MFLOP a token
    bf16, fp32 = single_thread_tokens("bfloat16", minilm), single_thread_tokens("float32", minilm)
    assert 512 <= bf16 < 1024  # the measured crossover (module docstring)
    assert 64 <= fp32 < 256
    base = 2 * 12 * (4 * 768 * 768 + 2 * 768 * 3072)  # BERT-base: 8× the work a token
    assert single_thread_tokens("bfloat16", base) == pytest.approx(bf16 / 8, rel=0.05)
    assert single_thread_tokens("float16", minilm) == 0  # not measured: left alone
    assert single_thread_tokens("bfloat16", 0) == 0


# ---------------------------------------------------------------- in the backend


def test_backend_runs_small_passes_on_one_thread_while_the_others_are_cold() -> None:
    from embedq.worker.backends.torch_backend import TorchBackend, linear_flops_per_token
    from embedq.worker.config import WorkerConfig, resolve_model

    from .test_precision import _backend

    assert _backend(dtype="float32")._thread_policy.single_thread_tokens == 0  # off by default
    backend: TorchBackend = _backend(dtype="float32", cold_single_thread=True)
    if backend._thread_policy.threads < 2:
        pytest.skip("one CPU thread: nothing to choose")
    assert linear_flops_per_token(backend.model) == pytest.approx(21.5e6, rel=0.01)
    seen: list[int] = []
    backend.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    small, big = [[101, 2000, 102]], [[101, *range(2000, 2300), 102]] * 2
    threads = backend._thread_policy.threads
    time.sleep(2 * COLD_AFTER_S)
    for batch, expect in [(small, 1), (big, threads)]:  # (no timing upper bound: CI is noisy)
        vectors = backend.embed(batch)
        assert seen[-1] == expect, (len(seen), len(batch))
        assert vectors.shape == (len(batch), 384)
    time.sleep(2 * COLD_AFTER_S)
    backend.embed(small)
    assert seen[-1] == 1
    # That pass left this thread at one; a backend built after it still takes all.
    assert torch.get_num_threads() == 1
    model_id, path = resolve_model(None, "torch")
    config = WorkerConfig(
        model_id=model_id,
        model_path=path,
        served_model_name=model_id,
        dtype="float32",
        cold_single_thread=True,
    )
    assert TorchBackend(config)._thread_policy.threads > 1  # no --threads: torch's default
