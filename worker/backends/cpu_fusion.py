"""oneDNN fusions for a bfloat16 encoder on a CPU.

transformers runs a BERT layer's matmuls as ``addmm`` (the bias is first copied into
the output), then GELU, and the residual add, each as a separate pass over memory. In
bfloat16 on an AMX Xeon those passes cost more than the matmuls around them: a
2,816 × 384 → 1,536 Linear took 1.5 ms, the GELU after it 1.6–5.6 ms. oneDNN's matmul
applies bias, GELU or an added tensor while the result is still in registers
(``torch.ops.mkldnn._linear_pointwise``): +9–17% passages/s for all-MiniLM-L6-v2, cosine
0.99996 to the unfused bf16 model (docs/benchmarks.md §1, machine H).

Each module is rewired only when it has the expected parts *and* its class passed a
numerical check against its own forward; anything else keeps transformers' code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

# The fused and the original forward of a class must agree this closely on a random
# input (bf16 rounds at ~0.4% of a value; the fused path rounds once instead of twice).
_MAX_ERROR = 0.05


def fusion_available() -> bool:
    """oneDNN's fused bf16 matmuls exist in this torch *and* run on this CPU: without
    AVX512-BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only Zen 3, say) oneDNN has no bf16
    matmul and every call raises (a worker started with --dtype bfloat16 there)."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")):  # type: ignore[no-untyped-call]
        return False
    supported = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is None or bool(supported())


@dataclass
class Fused:
    """What fuse_model rewired, and the modules warm-up should run once per shape."""

    linear_gelu: int = 0
    linear_add: int = 0
    linear: int = 0
    # One module per distinct kernel (kind, in, out, bias): warm-up runs each at every
    # shape. Kind "add" modules take (hidden_states, residual); the others one tensor.
    kernels: dict[tuple[str, int, int, bool], nn.Module] = field(default_factory=dict)


def _is_exact_gelu(act: object) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers' GELUActivation holds F.gelu (exact) unless told to use a Python version.
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu


def _linear_forward(dense: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, dense.weight, dense.bias, "none", [], "")
        return out

    return forward


def _linear_gelu_forward(dense: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight, bias = dense.weight, dense.bias
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            hidden_states, weight, bias, "gelu", [], "none"
        )
        return out

    return forward


def _linear_add_norm_forward(
    dense: nn.Linear, norm: nn.LayerNorm
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def forward(hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        # dropout is the identity in eval mode
        added = torch.ops.mkldnn._linear_pointwise.binary(
            hidden_states, input_tensor, dense.weight, dense.bias, "add"
        )
        out: torch.Tensor = norm(added)
        return out

    return forward


def _agrees(
    original: Callable[..., torch.Tensor], fused: Callable[..., torch.Tensor], *inputs: torch.Tensor
) -> bool:
    with torch.inference_mode():
        want = original(*inputs).float()
        try:
            got = fused(*inputs).float()
        except RuntimeError as exc:  # oneDNN has no kernel for this shape or CPU
            log.warning("fused forward failed (%s)", exc)
            return False
    return bool(((want - got).abs() <= _MAX_ERROR * (1 + want.abs())).all())


def _sample(width: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, width, generator=generator).to(like.dtype)


def fuse_model(model: nn.Module) -> Fused:
    """Rewire a bf16 CPU model's Linear layers to oneDNN's fused matmuls, in place."""
    fused = Fused()
    checked: dict[type, bool] = {}
    taken: set[int] = set()  # Linear layers now run inside a fused parent

    def passes(module: nn.Module, forward: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> bool:
        if type(module) not in checked:
            checked[type(module)] = _agrees(module.forward, forward, *inputs)
            if not checked[type(module)]:
                log.warning(
                    "%s: fused forward disagrees with transformers'; left as is", type(module).__name__
                )
        return checked[type(module)]

    for module in model.modules():
        dense = getattr(module, "dense", None)
        if not isinstance(dense, nn.Linear) or dense.weight.device.type != "cpu":
            continue
        norm = getattr(module, "LayerNorm", None)
        if _is_exact_gelu(getattr(module, "intermediate_act_fn", None)):
            forward = _linear_gelu_forward(dense)
            if passes(module, forward, _sample(dense.in_features, dense.weight)):
                setattr(module, "forward", forward)  # noqa: B010 (an instance attribute)
                taken.add(id(dense))
                fused.linear_gelu += 1
                key = ("gelu", dense.in_features, dense.out_features, dense.bias is not None)
                fused.kernels.setdefault(key, module)
        elif isinstance(norm, nn.LayerNorm):
            # The BertSelfOutput / BertOutput shape: LayerNorm(dense(h) + residual).
            forward2 = _linear_add_norm_forward(dense, norm)
            x, residual = _sample(dense.in_features, dense.weight), _sample(dense.out_features, dense.weight)
            if passes(module, forward2, x, residual):
                setattr(module, "forward", forward2)  # noqa: B010
                taken.add(id(dense))
                fused.linear_add += 1
                key = ("add", dense.in_features, dense.out_features, dense.bias is not None)
                fused.kernels.setdefault(key, module)
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in taken and module.weight.device.type == "cpu":
            setattr(module, "forward", _linear_forward(module))  # noqa: B010
            fused.linear += 1
            key = ("none", module.in_features, module.out_features, module.bias is not None)
            fused.kernels.setdefault(key, module)
    return fused
