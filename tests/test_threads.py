"""Thread count per forward pass by its size (worker/threads.py), pure and in the torch
backend."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from embedq.worker.threads import PassThreads, single_thread_tokens

MINILM_FLOPS = 2 * (6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384)  # 21.5 MFLOP a token


def test_small_passes_run_on_one_thread_and_the_rest_on_all() -> None:
    policy = PassThreads(threads=4, single_thread_tokens=128)
    assert [policy.for_pass(n) for n in (1, 64, 128, 129, 4096)] == [1, 1, 1, 4, 4]


def test_never_single_thread_when_disabled_or_already_one() -> None:
    assert PassThreads(threads=2, single_thread_tokens=0).for_pass(1) == 2
    assert PassThreads(threads=1, single_thread_tokens=512).for_pass(1) == 1


def test_token_limit_follows_the_model_the_dtype_and_the_thread_count() -> None:
    bf16 = single_thread_tokens("bfloat16", MINILM_FLOPS, threads=2)
    assert 128 <= bf16 < 160  # one query or a few (module docstring)
    base = 2 * 12 * (4 * 768 * 768 + 2 * 768 * 3072)  # BERT-base: 8× the work a token
    assert single_thread_tokens("bfloat16", base, threads=2) == pytest.approx(bf16 / 8, rel=0.05)
    # More threads give up more on one thread when warm: a smaller budget.
    assert single_thread_tokens("bfloat16", MINILM_FLOPS, threads=8) == pytest.approx(bf16 / 4, abs=1)
    # float32 lost 40–60% on one thread back to back; float16 was not measured.
    assert single_thread_tokens("float32", MINILM_FLOPS, threads=2) == 0
    assert single_thread_tokens("float16", MINILM_FLOPS, threads=2) == 0
    assert single_thread_tokens("bfloat16", MINILM_FLOPS, threads=1) == 0
    assert single_thread_tokens("bfloat16", 0, threads=2) == 0


# ---------------------------------------------------------------- in the backend


@pytest.mark.parametrize("packing", ["on", "off"])
def test_backend_runs_small_passes_on_one_thread_and_their_vectors_do_not_depend_on_timing(
    packing: str,
) -> None:
    from embedq.worker.backends import torch_backend
    from embedq.worker.backends.torch_backend import TorchBackend, linear_flops_per_token
    from embedq.worker.config import WorkerConfig, resolve_model

    from .test_precision import _backend

    assert _backend(dtype="float32")._thread_policy.single_thread_tokens == 0  # bf16 only
    off = _backend(dtype="bfloat16", single_thread_small_passes=False)
    assert off._thread_policy.single_thread_tokens == 0
    backend: TorchBackend = _backend(dtype="bfloat16", packing=packing)  # on by default
    assert backend.description.packed is (packing == "on")
    threads = backend._thread_policy.threads  # 2: _backend sets it, whatever the cores
    assert linear_flops_per_token(backend.model) == pytest.approx(MINILM_FLOPS, rel=0.01)
    seen: list[int] = []
    backend.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    # 64 tokens: one thread and two give vectors up to ~1e-3 apart here, so a rule that
    # looked at the clock (or at the pass before) would show in the vectors.
    small = [[101, *range(2000, 2062), 102]]
    big = [[101, *range(2000, 2300), 102]] * 2
    after_idle = backend.embed(small)
    assert seen[-1] == 1
    backend.embed(big)
    assert seen[-1] == threads
    after_big = backend.embed(small)  # (no timing upper bound: CI is noisy)
    assert seen[-1] == 1
    time.sleep(0.05)
    after_sleep = backend.embed(small)
    np.testing.assert_array_equal(after_big, after_idle)
    np.testing.assert_array_equal(after_sleep, after_idle)
    # That pass left this thread at one; a backend built after it still takes all.
    assert torch.get_num_threads() == 1
    model_id, path = resolve_model(None, "torch")
    config = WorkerConfig(model_id=model_id, model_path=path, served_model_name=model_id, dtype="bfloat16")
    # No --threads: torch's default count, taken at import (> 1 on a multi-core machine).
    assert TorchBackend(config)._thread_policy.threads == torch_backend._DEFAULT_THREADS


def test_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_precision import _config

    assert _config().single_thread_small_passes is True
    assert _config("--single-thread-small-passes", "false").single_thread_small_passes is False
    # The environment sets the default (read when the parser is built).
    monkeypatch.setenv("EMBEDQ_SINGLE_THREAD_SMALL_PASSES", "off")
    assert _config().single_thread_small_passes is False
    assert _config("--single-thread-small-passes", "true").single_thread_small_passes is True
