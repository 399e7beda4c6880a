"""oneDNN fusions of a bf16 CPU model (worker/backends/cpu_fusion.py): every family's
tiny random model gives the same hidden states fused and unfused, and anything that does
not match the expected shape or fails the numerical check is left alone."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
import transformers

from embedq.worker.backends.cpu_fusion import fuse_model, fusion_available

from .test_families import FAMILIES

needs_fusion = pytest.mark.skipif(
    not fusion_available(), reason="no oneDNN bf16 matmul in this torch or on this CPU"
)


def test_fusion_is_offered_exactly_where_onednn_runs_it() -> None:
    """On a CPU without oneDNN bf16 (AVX2 only) the fused op raises: a bf16 worker there
    must not fuse, and where it runs the worker must use it."""
    x, weight, bias = (torch.randn(*shape).to(torch.bfloat16) for shape in ((4, 8), (16, 8), (16,)))
    try:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    except (RuntimeError, AttributeError):
        runs = False
    else:
        runs = True
        torch.testing.assert_close(
            out.float(), torch.nn.functional.linear(x, weight, bias).float(), rtol=0.02, atol=0.05
        )
    assert fusion_available() == runs


def _tiny(family: str, **overrides: Any) -> torch.nn.Module:
    config_name, fields, _pooling = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=512, initializer_range=0.2, **{**fields, **overrides}
    )
    try:
        model = transformers.AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    except ValueError:  # no SDPA path (MPNet): the worker falls back to eager attention too
        model = transformers.AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    return model.eval()


def _hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return out


@needs_fusion
@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if "+" not in f))
def test_fused_model_matches_transformers(family: str) -> None:
    model = _tiny(family)
    plain = copy.deepcopy(model)
    ids = torch.randint(5, 500, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    fused = fuse_model(model)
    assert fused.linear > 0  # at least the plain Linear layers run as oneDNN matmuls
    if family in ("bert", "roberta", "xlm-roberta", "camembert"):
        # 2 layers: an FFN input with exact GELU, and two Linear + residual + LayerNorm each.
        assert (fused.linear_gelu, fused.linear_add) == (2, 4)
    if family == "mpnet":  # its attention output is named `o`, not `dense`: left to Linear
        assert (fused.linear_gelu, fused.linear_add) == (2, 2)
    want, got = _hidden(plain, ids, mask), _hidden(model, ids, mask)
    cos = torch.nn.functional.cosine_similarity(want, got, dim=-1)[mask.bool()]
    assert float(cos.min()) > 0.999, cos


@needs_fusion
def test_approximate_gelu_is_not_fused_as_exact() -> None:
    fused = fuse_model(_tiny("bert", hidden_act="gelu_new"))
    assert fused.linear_gelu == 0 and fused.linear_add == 4


@needs_fusion
def test_a_module_whose_forward_differs_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    from transformers.models.bert.modeling_bert import BertIntermediate

    class ShiftedIntermediate(BertIntermediate):  # same parts, another computation
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) + 1.0

    model = _tiny("bert")
    for layer in model.encoder.layer:
        shifted = ShiftedIntermediate(model.config).to(torch.bfloat16)
        shifted.load_state_dict(layer.intermediate.state_dict())
        layer.intermediate = shifted
    plain = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="embedq.worker.backends.cpu_fusion"):
        fused = fuse_model(model)
    assert fused.linear_gelu == 0 and "ShiftedIntermediate: fused forward disagrees" in caplog.text
    ids = torch.randint(5, 500, (2, 9))
    mask = torch.ones_like(ids)
    cos = torch.nn.functional.cosine_similarity(_hidden(plain, ids, mask), _hidden(model, ids, mask), dim=-1)
    assert float(cos.min()) > 0.999
