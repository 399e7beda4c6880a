"""Padding-free (packed) batches: worker/backends/packed.py and the torch backend's use of it.

The CPU runs the reference attention (SDPA per sequence); the CUDA kernel cannot run
here, so the glue around it (layouts, GQA, causal and window options, both keyword
dialects of torch's varlen_attn) is run against a stand-in kernel written from that
function's documented contract. Families through the whole queue: tests/test_families.py.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from embedq.worker.backends import packed
from embedq.worker.backends.cpu_fusion import fusion_available
from embedq.worker.backends.torch_backend import TorchBackend, cpu_has_amx, poisons_device
from embedq.worker.config import ConfigError, WorkerConfig

from .test_families import FAMILIES, _build

RNG = np.random.default_rng(7)
# Mixed lengths, a 1-token sequence between long ones: attention leaking across
# sequences would move it most.
LENGTHS = (9, 1, 40, 3, 17)


def _batch(lengths: tuple[int, ...] = LENGTHS, vocab: int = 30522) -> list[list[int]]:
    return [RNG.integers(1000, vocab, size=n).tolist() for n in lengths]


def _backend(folder: Path | str, packing: str, dtype: str = "float32", **extra: Any) -> TorchBackend:
    config = WorkerConfig(
        model_id="m", model_path=str(folder), served_model_name="m", dtype=dtype, packing=packing, **extra
    )  # type: ignore[arg-type]
    return TorchBackend(config)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed-families")
    return {f: _build(root / f, model_path, f) for f in FAMILIES if f != "mpnet"}


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f != "mpnet"))
def test_packed_matches_padded(family: str, family_folders: dict[str, Path]) -> None:
    """Every packed family gives the padded path's vectors and token states (float32)."""
    on, off = _backend(family_folders[family], "on"), _backend(family_folders[family], "off")
    assert on.description.packed and not off.description.packed
    assert on.description.length_step == 0
    batch = _batch()
    got, want = on.embed(batch), off.embed(batch)
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) < 1e-5, family
    for g, w in zip(on.embed_all(batch), off.embed_all(batch), strict=True):
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) < 1e-5, family


def test_packed_positions_restart_per_sequence(family_folders: dict[str, Path]) -> None:
    """A sequence's vector does not depend on what precedes it in the packed row
    (positions restart at the padding offset for RoBERTa-style models)."""
    on = _backend(family_folders["roberta"], "on")
    assert on._position_offset == 2  # pad id 1 + 1
    first, second = _batch((12,)), _batch((12,))
    alone = on.embed(second)
    after = on.embed(first + second)[1:]
    assert float(np.abs(alone - after).max()) < 1e-5


def _local_modernbert(folder: Path, model_path: Path, window: int = 8) -> Path:
    """A tiny ModernBERT whose layers alternate local (``window``-token) and global attention."""
    _build(folder, model_path, "modernbert")
    cfg = json.loads((folder / "config.json").read_text())
    layers = [
        "full_attention" if i % 2 == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])
    ]
    cfg.update(global_attn_every_n_layers=2, local_attention=window, layer_types=layers)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_modernbert_local_attention_window(model_path: Path, tmp_path: Path) -> None:
    """ModernBERT's local layers attend within a sliding window: packed rows honour it
    (sequences longer than the window, so the window changes the result)."""
    folder = _local_modernbert(tmp_path / "local", model_path)
    on, off = _backend(folder, "on"), _backend(folder, "off")
    batch = _batch((30, 5, 25))
    assert float(np.abs(on.embed(batch) - off.embed(batch)).max()) < 1e-5
    # The window matters at these lengths: the same layers with a window wider than any
    # sequence give other vectors.
    wide = _backend(_local_modernbert(tmp_path / "wide", model_path, window=1000), "off")
    assert float(np.abs(wide.embed(batch) - off.embed(batch)).max()) > 1e-3


def test_real_model_packed(model_path: Path) -> None:
    """all-MiniLM-L6-v2: packed float32 equals padded; packed bf16 stays within bf16's bound."""
    batch = _batch((5, 60, 1, 128, 22))
    want = _backend(model_path, "off").embed(batch)
    assert float(np.abs(_backend(model_path, "on").embed(batch) - want).max()) < 1e-5
    bf16 = _backend(model_path, "on", dtype="bfloat16")
    assert bf16.description.packed and bf16.description.dtype == "bfloat16"
    assert _cosines(bf16.embed(batch), want).min() >= 0.999


def test_choice() -> None:
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    kw: dict[str, Any] = {
        "device": cpu,
        "dtype": bf16,
        "task": "embedding",
        "family": "bert",
        "compiled": False,
    }
    assert packed.choose("on", **kw)
    assert not packed.choose("off", **kw)
    assert packed.choose("auto", **kw)
    assert packed.choose("auto", **{**kw, "dtype": torch.float32})
    # Where oneDNN builds a kernel per shape (bf16 on AMX), and with int8: padded buckets.
    assert not packed.choose("auto", **kw, shape_kernels=True)
    assert not packed.choose("auto", **kw, quantized=True)
    assert packed.choose("on", **kw, shape_kernels=True)
    # A GPU packs only where the flash kernel runs: half precision (never here, no CUDA).
    assert not packed.choose("auto", **{**kw, "device": torch.device("cuda"), "dtype": torch.float32})
    for change, words in (
        ({"family": "mpnet"}, "model type 'mpnet'"),
        ({"task": "classifier"}, "only embedding models"),
        ({"compiled": True}, "--compile"),
    ):
        assert not packed.choose("auto", **{**kw, **change})
        with pytest.raises(ConfigError, match=words):
            packed.choose("on", **{**kw, **change})


def test_packing_on_refuses_what_it_cannot_pack(family_folders: dict[str, Path], model_path: Path) -> None:
    with pytest.raises(ConfigError, match="--compile"):
        _backend(model_path, "on", compile=True)
    # auto on this CPU: packed, unless bf16 on AMX keeps the padded length buckets.
    auto = _backend(model_path, "auto", dtype="bfloat16")
    assert auto.description.packed is not cpu_has_amx()
    assert (auto.description.length_step > 0) is cpu_has_amx()
    assert not _backend(model_path, "auto", dtype="float32", quantize="int8").description.packed
    padded = _backend(model_path, "off", dtype="bfloat16")
    assert not padded.description.packed and padded.description.length_step > 0


def test_check_at_start_catches_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    """A packed path that lets sequences see each other fails the start check: refused
    with --packing on, left off (padded) otherwise."""

    def leaky(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], **kw: Any
    ) -> Any:
        return packed._reference_attention(query, key, value, [bounds[0], bounds[-1]], **kw)

    good = _backend(model_path, "on")
    monkeypatch.setattr(packed, "_reference_attention", leaky)
    with pytest.raises(ConfigError, match="fails its check at start"):
        _backend(model_path, "on")
    assert good._check_packing(required=False) is False  # what auto does on a GPU


# ---------------------------------------------------------------- the CUDA kernel's glue
def _stand_in_varlen(dialect: str) -> Callable[..., torch.Tensor]:
    """varlen_attn's documented contract, on the CPU: [total, heads, dim] tensors,
    cumulative lengths, full attention by default. The new dialect (torch 2.13) takes
    ``scale``, ``window_size`` and ``enable_gqa``; the old one (torch 2.9) only
    ``is_causal``, and scales by 1/sqrt(head_dim)."""

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        scale: float | None,
        window_size: tuple[int, int],
        enable_gqa: bool,
    ) -> torch.Tensor:
        assert q.dim() == 3 and q.is_contiguous() and cu_q.dtype == torch.int32
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        assert enable_gqa or k.shape[1] == q.shape[1], "shared K/V heads need enable_gqa"
        left, right = window_size
        bounds = cu_q.tolist()
        out = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
            pos = torch.arange(b - a)
            delta = pos[:, None] - pos[None, :]  # query minus key position
            mask = torch.ones(b - a, b - a, dtype=torch.bool)
            if left >= 0:
                mask &= delta <= left
            if right >= 0:
                mask &= -delta <= right
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
            out.append(o.transpose(0, 1))
        return torch.cat(out)

    # The positional part (q, k, v, cu_seq_q, cu_seq_k, max_q, max_k) is the same in both;
    # the keywords are what the backend reads off the signature.
    def new(
        *args: Any,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        return run(*args, scale, window_size, enable_gqa)

    def old(*args: Any, is_causal: bool = False) -> torch.Tensor:
        return run(*args, None, (-1, 0) if is_causal else (-1, -1), False)

    return new if dialect == "new" else old


@pytest.mark.parametrize("dialect", ["new", "old"])
@pytest.mark.parametrize("family", ["bert", "qwen3", "modernbert"])
def test_varlen_glue(
    dialect: str,
    family: str,
    family_folders: dict[str, Path],
    model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The CUDA path's layouts and options, run against a stand-in with varlen_attn's
    contract: the same vectors as padded SDPA for an encoder, a causal decoder with
    shared K/V heads (Qwen3), and ModernBERT's sliding window (new dialect only)."""
    folder = family_folders[family]
    if family == "modernbert":
        folder = _local_modernbert(tmp_path / "local", model_path)
    off = _backend(folder, "off")
    on = _backend(folder, "on")
    kernel = _stand_in_varlen(dialect)
    monkeypatch.setattr(packed, "_VARLEN", (kernel, frozenset(inspect.signature(kernel).parameters)))
    monkeypatch.setattr(packed, "varlen_available", lambda device, dtype: True)
    batch = _batch((30, 1, 12))
    if family == "modernbert" and dialect == "old":
        with pytest.raises(NotImplementedError, match="sliding window"):
            on.embed(batch)
        return
    assert float(np.abs(on.embed(batch) - off.embed(batch)).max()) < 1e-5


def test_pool_layouts() -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    batch = packed.pack([[5, 6, 7], [8], [9, 10]], 0, torch.device("cpu"))
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6] and batch.max_length == 3
    assert batch.positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.pool(hidden, batch, "cls").tolist() == [[0, 1], [6, 7], [8, 9]]
    assert packed.pool(hidden, batch, "last-token").tolist() == [[4, 5], [6, 7], [10, 11]]
    assert packed.pool(hidden, batch, "mean").tolist() == [[2, 3], [6, 7], [9, 10]]
    assert [t.shape[0] for t in packed.split(hidden, batch)] == [3, 1, 2]
    assert packed.pack([[1, 2]], 2, torch.device("cpu")).positions.tolist() == [[2, 3]]


def test_tested_families_are_the_packed_list(family_folders: dict[str, Path]) -> None:
    """PACKED_FAMILIES names model_type values, each tested here (a family added to the
    list without a tiny model in tests/test_families.py fails this)."""
    tested = {transformers.AutoConfig.from_pretrained(f).model_type for f in family_folders.values()}
    assert tested == packed.PACKED_FAMILIES


@pytest.mark.skipif(not fusion_available(), reason="kernel priming follows the oneDNN bf16 fusions")
def test_packed_warmup_primes_the_one_thread_counts(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Small packed passes run on one thread at their exact token count: warm-up builds
    each matmul kernel at every count up to the one-thread budget."""
    backend = _backend(model_path, "on", dtype="bfloat16", threads=2)
    limit = backend._thread_policy.single_thread_tokens
    assert 128 <= limit < 160 and len(backend._kernels) == 4
    with caplog.at_level(logging.INFO, logger="embedq.worker.backends.torch_backend"):
        backend.warmup()
    assert f"warm-up: {4 * limit} matmul kernels" in caplog.text


def test_a_device_poisoning_error_in_the_check_is_fatal(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    """A CUDA error that poisons the context (a device-side assert) must not fall back to
    the padded path on the same device: the worker refuses to start and says why."""
    good = _backend(model_path, "auto")

    def device_assert(batch: Any) -> Any:
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(good, "_embed_packed", device_assert)
    with pytest.raises(ConfigError, match="--packing off"):
        good._check_packing(required=False)

    def out_of_memory(batch: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(good, "_embed_packed", out_of_memory)
    assert good._check_packing(required=False) is False  # recoverable: run padded
    assert poisons_device(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not poisons_device(RuntimeError("shape mismatch"))
