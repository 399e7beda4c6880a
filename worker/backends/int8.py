"""``--quantize int8`` on CPU: the transformer body's Linear layers as int8 × int8 → int32.

Two kernels (``--int8-kernel``), both with symmetric int8 weights, one scale per output
channel:

- ``int_mm`` (Int8Linear): ``torch._int_mm``, fast only with VNNI or AMX. Activations
  are quantized on the fly, one scale and zero point per row (token). Where a layer's
  input is an exact GELU (BERT-family feed-forward blocks), the layer applies the GELU
  itself so that the quantization range comes from the pre-activation row maximum: the
  activation is then computed once per element instead of twice (once for the range,
  once for the codes), which was a fifth of an int8 + compile forward pass
  (docs/benchmarks.md §5).
- ``fbgemm`` (FbgemmInt8Linear): torch's quantized engine, whose dynamic int8 linear
  has AVX2 kernels: on a CPU without VNNI its matmuls run ~1.5× float32 where
  ``torch._int_mm`` falls to reference code (2-3 GOP/s). Rows are scaled to a common
  range first, so its one activation scale per batch acts as one per row.
"""

from __future__ import annotations

import warnings
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F

Int8Kernel: TypeAlias = Literal["int_mm", "fbgemm"]

# The global minimum of the exact GELU, x·Φ(x), reached near x = -0.7518, rounded down:
# no GELU output lies below it, so it can stand for a row's minimum.
GELU_FLOOR = -0.17


def _codes(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """int8 codes of ``rows`` over [lo, hi] (lo ≤ 0 ≤ hi), with each row's scale and zero point."""
    scale = (hi - lo).div_(255).clamp_(min=1e-12)
    zero = torch.round(lo / scale).neg_().sub_(128)  # lo maps to -128, 0 to an exact code
    q = torch.addcmul(zero, rows, scale.reciprocal()).round_().clamp_(-128, 127).to(torch.int8)
    return q, scale, zero


class Int8Linear(torch.nn.Module):
    """A Linear layer computed as an int8 × int8 → int32 matmul (``torch._int_mm``).

    Activations: asymmetric uint8-range int8, one scale and zero point per row.
    ``torch.ao.quantization.quantize_dynamic`` uses one activation scale for the whole
    batch instead: all-MiniLM-L6-v2's FFN inputs carry outlier channels ~15× the median,
    and that one scale cost it cosine 0.88–0.95 to float32 (docs/benchmarks.md §5).

    With ``gelu_input`` the layer receives the pre-activation and applies the exact GELU
    itself. The GELU is increasing wherever it is positive and never below GELU_FLOOR,
    so a row's range is [GELU_FLOOR, gelu(max x)] without computing every GELU twice.
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    weight_sum: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, *, gelu_input: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu_input = gelu_input
        self.register_buffer("weight_q", q.t().contiguous())  # (in, out), as _int_mm takes it
        self.register_buffer("weight_scale", scale)
        # scale_n · Σ_k W[k, n], to take the activations' zero point back out of the sums.
        self.register_buffer("weight_sum", q.sum(dim=1, dtype=torch.int32).float() * scale)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few passes over the activations: on CPU, these elementwise passes (not the int8
        # matmul) are most of this layer's time unless torch.compile fuses them.
        rows = x.reshape(-1, self.in_features)
        if self.gelu_input:
            hi = rows.amax(dim=1, keepdim=True).clamp_(min=0)
            lo = torch.full_like(hi, GELU_FLOOR)
            rows = F.gelu(rows)
        else:
            lo = rows.amin(dim=1, keepdim=True).clamp_(max=0)
            hi = rows.amax(dim=1, keepdim=True).clamp_(min=0)
        q, scale, zero = _codes(rows, lo, hi)
        # rows ≈ scale · (q − zero), so rows·W = scale · (q·W − zero · ΣW).
        acc = torch.mul(torch._int_mm(q, self.weight_q), self.weight_scale)  # int32 → float32
        out = acc.mul_(scale) if self.bias is None else torch.addcmul(self.bias, acc, scale)
        out.addr_((zero * scale).squeeze(1), self.weight_sum, alpha=-1)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gelu = ", gelu input" if self.gelu_input else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{gelu}"


class FbgemmInt8Linear(torch.nn.Module):
    """A Linear layer computed by torch's quantized engine (``quantized::linear_dynamic``,
    fbgemm's int8 GEMM on x86, AVX2 and up).

    The engine quantizes a whole batch of activations to uint8 with one scale and zero
    point, from the batch's minimum and maximum. Alone, one loud token would cost every
    other row its resolution (cosine 0.95 to float32 for all-MiniLM-L6-v2), and a text's
    vector would move with its batch. So each row is divided by its largest magnitude,
    and one extra row holding 1 and -1 pins the batch's range to [-1, 1]: every row gets
    the same codes in any batch. Weights keep 7 bits (±63) so that AVX2's 16-bit sums of
    two uint8 × int8 products cannot saturate (2 × 255 × 63 < 32,767) and the activations
    can have all 8 (short texts: cosine 0.986 against 0.973 the other way round).
    """

    bias: torch.Tensor | None
    anchor: torch.Tensor

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 63).double()
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 marks quantized tensors deprecated; the engine's packed weight
            # is still built from one (the packed form is what the layer keeps).
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        anchor = torch.zeros(self.in_features)
        anchor[0], anchor[-1] = 1.0, -1.0
        self.register_buffer("anchor", anchor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        peak = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        scaled = rows.new_empty((n + 1, self.in_features))
        torch.div(rows, peak, out=scaled[:n])
        scaled[n] = self.anchor
        # reduce_range False: 8-bit activations (the 7-bit weights leave the room).
        out = torch.ops.quantized.linear_dynamic(scaled, self._packed, False)[:n]
        out = out.mul_(peak) if self.bias is None else torch.addcmul(self.bias, out, peak)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (fbgemm)"


def fbgemm_available() -> bool:
    """True where torch has the quantized engine FbgemmInt8Linear runs on."""
    return bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def _is_exact_gelu(act: object) -> bool:
    """True for transformers' GELUActivation on the erf GELU, or torch's nn.GELU('none')."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _fuse_gelu_into_output(body: torch.nn.Module) -> set[str]:
    """BERT-style blocks (``intermediate.intermediate_act_fn`` feeding ``output.dense``):
    move the GELU into the output projection; returns the names of those projections."""
    fused: set[str] = set()
    for name, module in list(body.named_modules()):  # the loop replaces submodules
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        act = getattr(inter, "intermediate_act_fn", None)
        dense = getattr(out, "dense", None)
        if act is None or not _is_exact_gelu(act) or not isinstance(dense, torch.nn.Linear):
            continue
        assert inter is not None
        inter.intermediate_act_fn = torch.nn.Identity()
        fused.add(f"{name}.output.dense" if name else "output.dense")
    return fused


def quantize_int8(model: torch.nn.Module, kernel: Int8Kernel = "int_mm") -> int:
    """Swap the Linear layers of the transformer body for int8 ones; returns how many.

    Heads stay float32: a pooler, a classifier, an MLM or LM head (SPLADE, LLM rerankers)
    sit outside ``model.base_model`` or under its ``pooler``, and are small or sensitive.
    """
    body: torch.nn.Module = getattr(model, "base_model", model)
    gelu_fed = _fuse_gelu_into_output(body) if kernel == "int_mm" else set()
    swapped: set[str] = set()
    for name, module in list(body.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name.split(".")[0] == "pooler":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        layer = (
            Int8Linear(module, gelu_input=name in gelu_fed)
            if kernel == "int_mm"
            else FbgemmInt8Linear(module)
        )
        setattr(parent, child, layer)
        swapped.add(name)
    # A GELU moved out of a block must have landed in its output projection (int_mm).
    assert gelu_fed <= swapped, f"GELU removed but not re-applied: {sorted(gelu_fed - swapped)}"
    return len(swapped)
