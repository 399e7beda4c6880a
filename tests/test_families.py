"""Encoder families through the whole queue, against sentence-transformers on the same weights.

For each family a tiny random-weight model is built from a transformers config, saved as
safetensors with a sentence-transformers layout (modules.json, 1_Pooling) and the
bundled model's WordPiece tokenizer, served by a real worker in float32, and compared
with SentenceTransformer encoding each text alone (no padding in the reference).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

from embedq import Client
from embedq.redis_server import RedisServer

from .helpers import start_worker

TEXTS = [
    "A short one.",
    "Redis Streams deliver each entry to one consumer of a group, and keep it pending until acknowledged.",
    "x",
    "Token budgets decide how many sequences share a forward pass; padding wastes compute.",
]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

# family -> (config class, extra config fields, pooling)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "bert": ("BertConfig", {**SMALL, "max_position_embeddings": 128}, "mean"),
    # sentence-transformers Dense modules after pooling (Tanh, then Identity).
    "bert+dense": ("BertConfig", {**SMALL, "max_position_embeddings": 128}, "mean"),
    "roberta": ("RobertaConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}, "mean"),
    "xlm-roberta": ("XLMRobertaConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}, "cls"),
    "camembert": ("CamembertConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}, "mean"),
    "distilbert": (
        "DistilBertConfig",
        {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 128},
        "mean",
    ),
    "mpnet": ("MPNetConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}, "mean"),
    "modernbert": (
        "ModernBertConfig",
        {
            **SMALL,
            "max_position_embeddings": 128,
            "pad_token_id": 0,
            "bos_token_id": 101,
            "eos_token_id": 102,
            "cls_token_id": 101,
            "sep_token_id": 102,
            "global_attn_every_n_layers": 1,
        },
        "mean",
    ),  # fmt: skip
    "qwen2": (
        "Qwen2Config",
        {**SMALL, "num_key_value_heads": 1, "max_position_embeddings": 128, "pad_token_id": 0},
        "last-token",
    ),
    "qwen3": (
        "Qwen3Config",
        {
            **SMALL,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 128,
            "pad_token_id": 0,
        },
        "last-token",
    ),
}
POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last-token": "pooling_mode_lasttoken",
}


def _build(folder: Path, bundled: Path, family: str) -> Path:
    config_name, fields, pooling = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=30522, initializer_range=0.2, **fields)
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundled / name).is_file():
            shutil.copy(bundled / name, folder / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if family.endswith("+dense"):
        from sentence_transformers.models import Dense

        for idx, (n_in, n_out, act) in enumerate(
            ((32, 24, torch.nn.Tanh()), (24, 16, torch.nn.Identity())), 2
        ):
            (folder / f"{idx}_Dense").mkdir()
            Dense(n_in, n_out, activation_function=act).save(str(folder / f"{idx}_Dense"))
            modules.append(
                {
                    "idx": idx,
                    "name": str(idx),
                    "path": f"{idx}_Dense",
                    "type": "sentence_transformers.models.Dense",
                }
            )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir()
    pool_cfg = {"word_embedding_dimension": 32, **{k: False for k in POOLING_KEYS.values()}}
    pool_cfg[POOLING_KEYS[pooling]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    return folder


# Packed (padding-free) batches through the queue for one family per pooling; every
# packed family is compared with padded batches in tests/test_packed.py.
PACKED_THROUGH_QUEUE = ("bert+dense", "xlm-roberta", "qwen3")


@pytest.mark.parametrize(
    ("family", "packing"),
    [(f, "off") for f in sorted(FAMILIES)] + [(f, "on") for f in PACKED_THROUGH_QUEUE],
)
def test_family_embeddings_match_sentence_transformers(
    family: str, packing: str, module_redis: RedisServer, model_path: Path, tmp_path: Path
) -> None:
    folder = _build(tmp_path / family, model_path, family)
    reference = SentenceTransformer(str(folder), device="cpu")
    expected = np.stack([reference.encode([t], normalize_embeddings=False)[0] for t in TEXTS])

    name = f"tiny-{family}-{packing}"
    args = (
        "--model-id",
        str(folder),
        "--served-model-name",
        name,
        "--dtype",
        "float32",
        "--packing",
        packing,
    )
    worker = start_worker(module_redis.url, tmp_path, *args, model=name)
    try:
        with Client(module_redis.url, model=name) as client:
            got = client.embed(TEXTS, normalize=False)  # one job: the worker pads these together
    finally:
        worker.stop()
    assert f"{'packed' if packing == 'on' else 'padded'} batches)" in worker.log()
    diff = float(np.abs(got - expected).max())
    cos = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    print(f"{family} ({packing}): max abs diff {diff:.2e}, min cosine {cos.min():.6f}")
    assert cos.min() >= 0.9999, (family, cos)
    assert diff < 1e-4, (family, diff)


def test_qwen3_instruction_prompts(module_redis: RedisServer, model_path: Path, tmp_path: Path) -> None:
    """Qwen3-Embedding style: last-token pooling with an instruction prompt for queries."""
    folder = _build(tmp_path / "qwen3", model_path, "qwen3")
    prompts = {
        "query": "Instruct: Given a question, retrieve passages that answer it\nQuery: ",
        "document": "",
    }
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    reference = SentenceTransformer(str(folder), device="cpu")
    queries = ["what is a consumer group?", "how long is a lease"]
    expected = np.stack([reference.encode([q], prompt_name="query")[0] for q in queries])
    plain = np.stack([reference.encode([q])[0] for q in queries])

    args = ("--model-id", str(folder), "--served-model-name", "tiny-qwen3-prompts", "--dtype", "float32")
    worker = start_worker(module_redis.url, tmp_path, *args, model="tiny-qwen3-prompts")
    try:
        with Client(module_redis.url, model="tiny-qwen3-prompts") as client:
            got = client.embed(queries, prompt_name="query", normalize=False)
    finally:
        worker.stop()
    assert float(np.abs(got - expected).max()) < 1e-4
    assert float(np.abs(got - plain).max()) > 1e-3  # the prompt changed the vectors


CROSS_ENCODERS = {
    "roberta": ("RobertaConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}),
    "xlm-roberta": ("XLMRobertaConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}),
    "distilbert": (
        "DistilBertConfig",
        {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 128},
    ),
    "mpnet": ("MPNetConfig", {**SMALL, "max_position_embeddings": 130, "pad_token_id": 1}),
    "modernbert": FAMILIES["modernbert"][:2],
}


def _save_head(folder: Path, bundled: Path, family: str, auto: str, **extra: Any) -> Any:
    """A tiny model of ``family`` with a task head (transformers Auto class ``auto``)."""
    config_name, fields = CROSS_ENCODERS[family]
    torch.manual_seed(1)
    config = getattr(transformers, config_name)(vocab_size=30522, initializer_range=0.3, **fields, **extra)
    getattr(transformers, auto).from_config(config).eval().save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundled / name).is_file():
            shutil.copy(bundled / name, folder / name)
    return getattr(transformers, auto).from_pretrained(folder).eval()


def _encode(tok: Any, model: Any, *texts: str) -> dict[str, torch.Tensor]:
    enc = dict(tok(*texts, return_tensors="pt"))
    if int(getattr(model.config, "type_vocab_size", 0) or 0) <= 1:
        enc.pop("token_type_ids", None)  # models without token types (embedq does not send them)
    return enc


def _serve(module_redis: RedisServer, tmp_path: Path, folder: Path, name: str, *extra: str) -> Any:
    args = ("--model-id", str(folder), "--served-model-name", name, "--dtype", "float32", *extra)
    return start_worker(module_redis.url, tmp_path, *args, model=name)


@pytest.mark.parametrize("family", sorted(CROSS_ENCODERS))
def test_family_heads_match_transformers(
    family: str, module_redis: RedisServer, model_path: Path, tmp_path: Path
) -> None:
    """Per family: a cross-encoder (rerank), a 3-label classifier (predict on pairs) and,
    where the family has a masked-LM head, SPLADE — each against transformers."""
    query, docs = TEXTS[0], TEXTS[1:]
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    diffs: dict[str, float] = {}

    folder = tmp_path / "rerank"
    model = _save_head(folder, model_path, family, "AutoModelForSequenceClassification", num_labels=1)
    with torch.inference_mode():
        expected = np.array([model(**_encode(tok, model, query, d)).logits[0, 0].item() for d in docs])
    worker = _serve(module_redis, tmp_path, folder, f"{family}-rerank")
    try:
        with Client(module_redis.url, model=f"{family}-rerank") as client:
            hits = client.rerank(query, docs, raw_scores=True)
    finally:
        worker.stop()
    got = np.zeros(len(docs))
    for h in hits:
        got[h.index] = h.score
    diffs["rerank"] = float(np.abs(got - expected).max())
    assert float(np.ptp(expected)) > 1e-3

    folder = tmp_path / "classify"
    labels = {0: "a", 1: "b", 2: "c"}
    model = _save_head(folder, model_path, family, "AutoModelForSequenceClassification", num_labels=3,
                       id2label=labels, label2id={v: k for k, v in labels.items()})  # fmt: skip
    with torch.inference_mode():
        ref = np.stack([model(**_encode(tok, model, query, d)).logits[0].numpy() for d in docs])
    worker = _serve(module_redis, tmp_path, folder, f"{family}-classify")
    try:
        with Client(module_redis.url, model=f"{family}-classify") as client:
            rows = client.predict([[query, d] for d in docs], raw_scores=True)
    finally:
        worker.stop()
    got_rows = np.array([[{p.label: p.score for p in row}[labels[i]] for i in range(3)] for row in rows])
    diffs["predict"] = float(np.abs(got_rows - ref).max())

    folder = tmp_path / "splade"
    model = _save_head(folder, model_path, family, "AutoModelForMaskedLM")
    with torch.inference_mode():
        enc = _encode(tok, model, docs[0])
        weights = torch.log1p(torch.relu(model(**enc).logits[0]))
        dense_ref = weights.max(dim=0).values.numpy()
    worker = _serve(module_redis, tmp_path, folder, f"{family}-splade", "--pooling", "splade")
    try:
        with Client(module_redis.url, model=f"{family}-splade") as client:
            [(indices, values)] = client.embed_sparse(docs[0])
    finally:
        worker.stop()
    dense = np.zeros_like(dense_ref)
    dense[indices] = values
    assert len(indices) > 100 and int((dense_ref > 0).sum()) == len(indices)
    diffs["splade"] = float(np.abs(dense - dense_ref).max())

    print(f"{family}: " + ", ".join(f"{k} max abs diff {v:.2e}" for k, v in diffs.items()))
    assert all(v < 1e-4 for v in diffs.values()), (family, diffs)
