"""Padding-free execution: a batch's sequences laid end to end in one row.

The model runs on ``[1, total_tokens]`` with position ids restarting at every sequence,
so its Linear layers see real tokens only. Attention must not cross sequences: the
model is loaded with the attention function registered here, which reads the batch's
cumulative sequence lengths (``cu_seq_lens_q``, the names transformers' own packed path
uses, passed through the model's ``**kwargs``) and attends within each sequence:

- on CUDA with bf16/fp16, one ``torch.nn.attention.varlen.varlen_attn`` call (flash
  attention over variable-length sequences);
- elsewhere (a CPU), scaled dot-product attention per sequence.

Either is checked against padded batches at start (TorchBackend._check_packing).

Calls without ``cu_seq_lens_q`` (a padded batch) go to transformers' SDPA path with its
usual mask, so one loaded model serves both layouts.

Only families whose attention goes through transformers' attention interface and whose
positions come from ``position_ids`` are packed (PACKED_FAMILIES); MPNet, for one, adds
a relative position bias inside its own attention and is not.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTENTION = "embedq_packed"

# config.model_type values verified against padded SDPA (tests/test_packed.py). Each
# takes position_ids and calls the attention interface with its own module.
PACKED_FAMILIES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "modernbert", "qwen2", "qwen3"}
)
# Families whose absolute positions start after the padding id (fairseq's convention).
_PADDING_OFFSET_FAMILIES = frozenset({"roberta", "xlm-roberta", "camembert"})


@dataclass(frozen=True)
class PackedBatch:
    """Tensors of one packed batch, on the model's device."""

    ids: torch.Tensor  # [1, total] token ids, sequences end to end
    positions: torch.Tensor  # [1, total] position ids, restarting at each sequence
    cu_seqlens: torch.Tensor  # [n + 1] int32: where each sequence starts (and the total)
    lengths: torch.Tensor  # [n] int64
    max_length: int

    @property
    def attention_kwargs(self) -> dict[str, Any]:
        """What the model's forward passes down to the attention function."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


def position_offset(config: Any) -> int:
    """The first position id of a sequence: pad id + 1 for RoBERTa-style models."""
    if config.model_type in _PADDING_OFFSET_FAMILIES:
        return int(config.pad_token_id) + 1
    return 0


def pack(batch: Sequence[Sequence[int]], offset: int, device: torch.device) -> PackedBatch:
    """Lay ``batch`` end to end; pinned host buffers when copying to a GPU."""
    lengths = np.fromiter((len(s) for s in batch), dtype=np.int64, count=len(batch))
    total = int(lengths.sum())
    ids = np.fromiter((t for s in batch for t in s), dtype=np.int64, count=total)
    starts = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts[:-1], lengths) + offset
    pin = device.type == "cuda"
    host = [
        torch.from_numpy(ids)[None],
        torch.from_numpy(positions)[None],
        torch.from_numpy(starts.astype(np.int32)),
        torch.from_numpy(lengths),
    ]
    if pin:
        host = [t.pin_memory() for t in host]
    ids_t, pos_t, cu_t, len_t = (t.to(device, non_blocking=pin) for t in host)
    return PackedBatch(ids_t, pos_t, cu_t, len_t, int(lengths.max()))


def pool(hidden: torch.Tensor, batch: PackedBatch, pooling: str | None) -> torch.Tensor:
    """[n, width] float32 vectors from packed [total, width] token states."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[batch.cu_seqlens[:-1].long()]
    if pooling == "last-token":
        return hidden[batch.cu_seqlens[1:].long() - 1]
    # Mean (also for layouts that name no pooling, as the padded path does). The rows
    # go back into a zero-padded grid and are summed there, in the padded path's order:
    # index_add_ would be quicker but adds in a different order on a GPU each time.
    n, total = len(batch.lengths), hidden.shape[0]
    # output_size: no device-to-host sync to learn the total.
    rows = torch.repeat_interleave(torch.arange(n, device=hidden.device), batch.lengths, output_size=total)
    cols = torch.arange(total, device=hidden.device) - batch.cu_seqlens[:-1].long()[rows]
    grid = hidden.new_zeros(n, batch.max_length, hidden.shape[1])
    grid[rows, cols] = hidden
    return grid.sum(dim=1) / batch.lengths.unsqueeze(1).to(hidden.dtype)


def split(hidden: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Each sequence's [length, width] rows of packed token states."""
    return list(torch.split(hidden, batch.lengths.tolist()))


# ---------------------------------------------------------------- attention
def _window(kwargs: dict[str, Any]) -> int | None:
    """Half-width of a bidirectional sliding window (ModernBERT's local layers), or None.

    transformers passes ``sliding_window`` = half-width + 1 and its flash path attends
    within ``sliding_window - 1`` tokens on each side; so does this.
    """
    window = kwargs.get("sliding_window")
    return None if window is None else int(window) - 1


def _reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    *,
    causal: bool,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """SDPA over each sequence alone; [1, heads, total, dim] in, [1, total, heads, dim] out."""
    gqa = query.shape[1] != key.shape[1]
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
        q, k, v = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        mask = None
        if window is not None:
            pos = torch.arange(stop - start, device=query.device)
            mask = (pos[:, None] - pos[None, :]).abs() <= window
            if causal:
                mask &= pos[:, None] >= pos[None, :]
        out.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(out, dim=2).transpose(1, 2)


def _varlen_options() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """torch's varlen attention and the keyword names this torch gives it, if present."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN = _varlen_options()


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the flash varlen kernel can run: a CUDA device, half precision."""
    return _VARLEN is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    *,
    causal: bool,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """One flash varlen call; [1, heads, total, dim] in, [1, total, heads, dim] out."""
    assert _VARLEN is not None
    varlen_attn, names = _VARLEN
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [total, heads, dim]
    options: dict[str, Any] = {}
    if "scale" in names:
        options["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:
        # The first dialect (torch 2.9) always scales by 1/sqrt(head_dim).
        raise NotImplementedError(f"this torch's varlen_attn takes no scale ({sorted(names)})")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:  # older torch: repeat the shared key/value heads
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if window is not None or causal:
        if "window_size" in names:
            # (left, right) tokens each query sees; -1 is unlimited.
            left = window if window is not None else -1
            options["window_size"] = (left, 0 if causal else left)
        elif window is None and "is_causal" in names:
            options["is_causal"] = True
        else:
            raise NotImplementedError(f"this torch's varlen_attn has no sliding window ({sorted(names)})")
    cu = cu_seqlens.to(torch.int32)
    out: torch.Tensor = varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_length, max_length, **options
    )
    return out[None]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: per-sequence attention in a packed row."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:  # a padded batch through the same model
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out
    # As transformers' SDPA path decides: the call's is_causal, else the module's.
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    window = _window(kwargs)
    if varlen_available(query.device, query.dtype):
        max_length = int(kwargs["max_length_q"])
        return _varlen_attention(
            query, key, value, cu_seqlens, max_length, causal=causal, scale=scaling, window=window
        ), None
    bounds = cu_seqlens.tolist()
    return _reference_attention(query, key, value, bounds, causal=causal, scale=scaling, window=window), None


def _packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a packed batch (attention_mask None); SDPA's mask for a padded one."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    mask: torch.Tensor | None = sdpa_mask(*args, **kwargs)
    return mask


def register() -> None:
    """Make ATTENTION a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, _packed_mask)


# ---------------------------------------------------------------- choice
def choose(
    mode: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    task: str,
    family: str,
    compiled: bool,
    quantized: bool = False,
    shape_kernels: bool = False,
) -> bool:
    """Whether a backend packs its batches (``--packing``); ConfigError when ``on`` cannot.

    ``auto`` packs on a GPU where the flash varlen kernel runs (half precision), and on
    a CPU, except with int8 (not measured) and where the matmul library builds a kernel
    for every new shape (``shape_kernels``: bf16 on an AMX Xeon, ~3.5 ms a kernel): a
    packed row's length changes with every batch, which padded length buckets avoid.
    On a Zen 5 CPU packing gained 9–28% at 1 × 16 and 0–6% in bulk, bf16 and float32
    alike (docs/benchmarks.md §1, machine J).
    """
    from embedq.worker.config import ConfigError

    if mode == "off":
        return False
    reasons = []
    if task != "embedding":
        reasons.append(f"the model is served as {task!r}; only embedding models are packed")
    if family not in PACKED_FAMILIES:
        reasons.append(f"model type {family!r} is not one of {', '.join(sorted(PACKED_FAMILIES))}")
    if compiled:
        reasons.append("--compile runs padded length buckets")
    if reasons:
        if mode == "on":
            raise ConfigError("--packing on: " + "; ".join(reasons))
        return False
    if mode == "on":
        return True
    if device.type == "cuda":
        return varlen_available(device, dtype)
    return device.type == "cpu" and not quantized and not shape_kernels
