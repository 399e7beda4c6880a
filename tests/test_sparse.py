"""SPLADE sparse vectors through the whole queue, against transformers on the same weights.

A tiny random-weight BertForMaskedLM (built here, saved as safetensors with the bundled
model's tokenizer) is served with `--pooling splade`; the reference is the SPLADE
formula computed directly: max over real tokens of log(1 + relu(MLM logits)).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

from embedq import Client
from embedq.redis_server import RedisServer
from embedq.worker.model_files import ModelFolderError, read_layout

from .helpers import GatewayProcess, WorkerProcess, start_gateway, start_worker

SPLADE = "tiny-splade"
TEXTS = ["sparse retrieval with learned weights", "a", "Redis streams and consumer groups, in short."]
VOCAB = 30522


@pytest.fixture(scope="module")
def splade_path(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("splade")
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
        architectures=["BertForMaskedLM"],
    )
    BertForMaskedLM(config).eval().save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_path / name).is_file():
            shutil.copy(model_path / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def worker(
    module_redis: RedisServer, splade_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    w = start_worker(
        module_redis.url, tmp_path_factory.mktemp("w"),
        "--model-id", str(splade_path), "--pooling", "splade", "--served-model-name", SPLADE,
        "--dtype", "float32", "--max-batch-tokens", "512",
        model=SPLADE, scope="module",
    )  # fmt: skip
    yield w
    w.stop()


@pytest.fixture(scope="module")
def gateway(
    module_redis: RedisServer, worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    g = start_gateway(module_redis.url, tmp_path_factory.mktemp("g"), model=SPLADE, scope="module")
    yield g
    g.stop()


def _reference(path: Path, texts: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits
    weights = torch.log1p(torch.relu(logits)) * enc["attention_mask"].unsqueeze(-1)
    return weights.max(dim=1).values.numpy()


def _dense(indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(VOCAB, dtype=np.float32)
    out[indices] = values
    return out


def test_sdk_embed_sparse_matches_the_formula(module_redis: RedisServer, worker: WorkerProcess,
                                              splade_path: Path) -> None:  # fmt: skip
    expected = _reference(splade_path, TEXTS)
    with Client(module_redis.url, model=SPLADE) as client:
        got = client.embed_sparse(TEXTS)
        top = client.embed_sparse(TEXTS[0], top_k=5)
        cut = client.embed_sparse(TEXTS[0], threshold=0.5)
    assert len(got) == len(TEXTS)
    for (indices, values), ref in zip(got, expected, strict=True):
        assert indices.dtype == np.int32 and values.dtype == np.float32
        assert np.all(np.diff(indices) > 0) and np.all(values > 0)
        np.testing.assert_allclose(_dense(indices, values), ref, atol=1e-4)
        assert len(indices) > 100  # random MLM heads light up much of the vocabulary
    (cut_idx, cut_val) = cut[0]
    assert len(cut_idx) == int((expected[0] > 0.5).sum()) > 0 and cut_val.min() > 0.5
    (idx, val) = top[0]
    assert len(idx) == 5
    np.testing.assert_allclose(np.sort(val)[::-1], np.sort(expected[0])[::-1][:5], atol=1e-4)


def test_gateway_embed_sparse(gateway: GatewayProcess, splade_path: Path) -> None:
    expected = _reference(splade_path, TEXTS[:2])
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        resp = http.post("/embed_sparse", json={"inputs": TEXTS[:2]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body) == 2 and set(body[0][0]) == {"index", "value"}
        for row, ref in zip(body, expected, strict=True):
            dense = _dense(np.array([x["index"] for x in row]), np.array([x["value"] for x in row]))
            np.testing.assert_allclose(dense, ref, atol=1e-4)
        assert int(resp.headers["x-compute-tokens"]) > 0
        top = http.post("/embed_sparse", json={"inputs": TEXTS[0], "top_k": 3}).json()
        assert len(top) == 1 and len(top[0]) == 3
        both = http.post("/embed_sparse", json={"inputs": TEXTS[0], "top_k": 2, "threshold": 0.1}).json()
        assert len(both[0]) == 2 and min(x["value"] for x in both[0]) > 0.1
        assert http.post("/embed_sparse", json={"inputs": "x", "threshold": -1}).status_code == 422
        assert http.post("/", json={"inputs": TEXTS[0]}).json()[0][0].keys() == {"index", "value"}
        assert http.get("/info").json()["model_type"] == {"embedding": {"pooling": "splade"}}
        dense_route = http.post("/embed", json={"inputs": "x"})
        assert dense_route.status_code == 424 and "splade" in dense_route.json()["error"]
        assert http.post("/embed_sparse", json={"inputs": []}).status_code == 400


def test_splade_needs_a_masked_lm_head(model_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="ForMaskedLM"):
        read_layout(model_path, pooling="splade")
