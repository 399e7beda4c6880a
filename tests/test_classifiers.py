"""Rerankers and classifiers (sequence-classification heads) through the whole queue.

Tiny random-weight BERT models, built here from a transformers config and saved as
safetensors with the bundled model's tokenizer, are served by real workers; results
through the SDK and the gateway are compared with sentence-transformers' CrossEncoder
and with transformers run directly on the same weights.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from embedq import AsyncClient, Client, ValidationError
from embedq.redis_server import RedisServer

from .helpers import GatewayProcess, WorkerProcess, start_gateway, start_worker

RERANKER = "tiny-reranker"
CLASSIFIER = "tiny-classifier"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MAX_LEN = 64
QUERY = "how do consumer groups share a stream"
TEXTS = [
    "Consumer groups let several workers read one stream.",
    "Bananas are rich in potassium.",
    "XREADGROUP delivers each entry to one consumer of the group.",
    "The weather is sunny today.",
    "a",
]
TOL = 1e-4


def _build(folder: Path, bundled: Path, num_labels: int) -> Path:
    torch.manual_seed(num_labels)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
        # Wider than BERT's 0.02 so the logits of random weights spread out.
        initializer_range=0.3,
        num_labels=num_labels,
        id2label=LABELS if num_labels == 3 else {0: "LABEL_0"},
        label2id={v: k for k, v in LABELS.items()} if num_labels == 3 else {"LABEL_0": 0},
        architectures=["BertForSequenceClassification"],
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundled / name).is_file():
            shutil.copy(bundled / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    return _build(tmp_path_factory.mktemp("reranker"), model_path, 1)


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    return _build(tmp_path_factory.mktemp("classifier"), model_path, 3)


@pytest.fixture(scope="module")
def workers(
    module_redis: RedisServer,
    reranker_path: Path,
    classifier_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[WorkerProcess]]:
    tmp = tmp_path_factory.mktemp("workers")
    common = ("--dtype", "float32", "--max-batch-tokens", "1024")
    ws = [
        start_worker(module_redis.url, tmp, "--model-id", str(path), "--served-model-name", name,
                     *common, model=name, scope="module")
        for path, name in ((reranker_path, RERANKER), (classifier_path, CLASSIFIER))
    ]  # fmt: skip
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def rerank_gw(
    module_redis: RedisServer, workers: list[WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    g = start_gateway(module_redis.url, tmp_path_factory.mktemp("g"), model=RERANKER, scope="module")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def classify_gw(
    module_redis: RedisServer, workers: list[WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    g = start_gateway(module_redis.url, tmp_path_factory.mktemp("g"), model=CLASSIFIER, scope="module")
    yield g
    g.stop()


def _reference_logits(path: Path, pairs: list[tuple[str, str]] | list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if pairs and isinstance(pairs[0], tuple):
        a, b = zip(*pairs, strict=True)
        enc = tok(list(a), list(b), padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    else:
        enc = tok(list(pairs), padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits.float().numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# ------------------------------------------------------------------------------- SDK
def test_sdk_rerank_matches_cross_encoder(module_redis: RedisServer, workers: list[WorkerProcess],
                                          reranker_path: Path) -> None:  # fmt: skip
    cross = CrossEncoder(str(reranker_path), device="cpu", max_length=MAX_LEN)
    expected = np.asarray(cross.predict([(QUERY, t) for t in TEXTS]), dtype=np.float32)
    logits = _reference_logits(reranker_path, [(QUERY, t) for t in TEXTS])[:, 0]
    np.testing.assert_allclose(expected, _sigmoid(logits), atol=1e-5)  # CrossEncoder = sigmoid(logit)

    with Client(module_redis.url, model=RERANKER) as client:
        hits = client.rerank(QUERY, TEXTS)
        raw = client.rerank(QUERY, TEXTS, raw_scores=True)
        top2 = client.rerank(QUERY, TEXTS, top_n=2)
    assert sorted(h.index for h in hits) == list(range(len(TEXTS)))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:
        assert abs(h.score - expected[h.index]) < TOL
    for h in raw:
        assert abs(h.score - logits[h.index]) < TOL
    assert [h.index for h in top2] == [h.index for h in hits[:2]]
    assert float(np.ptp(expected)) > 0.05, "random weights should spread the scores"


def test_sdk_predict_matches_transformers(module_redis: RedisServer, workers: list[WorkerProcess],
                                          classifier_path: Path) -> None:  # fmt: skip
    singles = ["I love this.", "This is terrible and slow.", "It arrived on Tuesday."]
    pairs = [("The cat sat.", "A cat was sitting."), ("Stocks fell.", "It rained in Paris.")]
    ref_single = _reference_logits(classifier_path, singles)
    ref_pairs = _reference_logits(classifier_path, pairs)

    async def run() -> tuple[list, list, list]:  # type: ignore[type-arg]
        async with AsyncClient(module_redis.url, model=CLASSIFIER) as client:
            return (
                await client.predict(singles),
                await client.predict(list(pairs[0])),  # one [text, text] pair
                await client.predict([list(p) for p in pairs], raw_scores=True),
            )

    got_single, got_pair, got_raw = asyncio.run(run())
    for row, ref in zip(got_single, ref_single, strict=True):
        probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
        assert {p.label for p in row} == set(LABELS.values())
        assert [p.score for p in row] == sorted((p.score for p in row), reverse=True)
        for p in row:
            label_id = next(k for k, v in LABELS.items() if v == p.label)
            assert abs(p.score - probs[label_id]) < TOL
    assert len(got_pair) == 1
    assert abs(sum(p.score for p in got_pair[0]) - 1.0) < 1e-5
    for row, ref in zip(got_raw, ref_pairs, strict=True):
        for p in row:
            label_id = next(k for k, v in LABELS.items() if v == p.label)
            assert abs(p.score - ref[label_id]) < TOL


def test_pair_truncation_is_longest_first(module_redis: RedisServer, workers: list[WorkerProcess],
                                          reranker_path: Path) -> None:  # fmt: skip
    long_text = " ".join(f"word{i}" for i in range(200))
    ref = _reference_logits(reranker_path, [(QUERY, long_text)])[0, 0]
    with Client(module_redis.url, model=RERANKER) as client:
        (hit,) = client.rerank(QUERY, [long_text], raw_scores=True)
        assert abs(hit.score - ref) < TOL
        with pytest.raises(ValidationError, match="less than 64 tokens"):
            client.rerank(QUERY, [long_text], truncate=False)


# --------------------------------------------------------------------------- gateway
def test_gateway_rerank_routes(rerank_gw: GatewayProcess, reranker_path: Path) -> None:
    cross = CrossEncoder(str(reranker_path), device="cpu", max_length=MAX_LEN)
    expected = np.asarray(cross.predict([(QUERY, t) for t in TEXTS]), dtype=np.float32)
    order = list(np.argsort(-expected, kind="stable"))
    with httpx.Client(base_url=rerank_gw.url, timeout=60) as http:
        tei = http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True})
        assert tei.status_code == 200, tei.text
        body = tei.json()
        assert [r["index"] for r in body] == order
        for r in body:
            assert abs(r["score"] - expected[r["index"]]) < TOL
            assert r["text"] == TEXTS[r["index"]]
        assert int(tei.headers["x-compute-tokens"]) > 0
        plain = http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
        assert set(plain[0]) == {"index", "score"}

        cohere = http.post(
            "/v1/rerank",
            json={"model": RERANKER, "query": QUERY, "documents": [{"text": t} for t in TEXTS],
                  "top_n": 3, "return_documents": True},
        )  # fmt: skip
        assert cohere.status_code == 200, cohere.text
        c = cohere.json()
        assert [r["index"] for r in c["results"]] == order[:3]
        assert c["results"][0]["document"] == {"text": TEXTS[order[0]]}
        assert abs(c["results"][0]["relevance_score"] - expected[order[0]]) < TOL
        assert c["model"] == RERANKER and c["usage"]["total_tokens"] > 0
        jina = http.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS}).json()
        assert len(jina["results"]) == len(TEXTS) and "document" not in jina["results"][0]

        # The root routes a reranker to /rerank; /info says what the model is.
        root = http.post("/", json={"query": QUERY, "texts": TEXTS[:2]})
        assert root.status_code == 200 and len(root.json()) == 2
        info = http.get("/info").json()
        assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        assert info["max_input_length"] == MAX_LEN

        for path, bad, status, kind in (
            ("/rerank", {"query": QUERY, "texts": []}, 400, "Empty"),
            ("/rerank", {"texts": ["a"]}, 422, "Validation"),
            ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}, 422, "Validation"),
            ("/v1/rerank", {"query": QUERY, "documents": [{"title": "x"}]}, 422, "Validation"),
            ("/rerank", {"query": QUERY, "texts": [" w" * 300], "truncate": False}, 422, "Validation"),
            ("/embed", {"inputs": "x"}, 424, "Backend"),
            ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "NotFound"),
        ):
            resp = http.post(path, json=bad)
            assert resp.status_code == status, (path, bad, resp.text)
            assert resp.json()["error_type"] == kind
        # The worker owns the tokenizer for every model kind.
        assert http.post("/tokenize", json={"inputs": "hello"}).status_code == 200

        # As in TEI, a pair with one empty text is scored (RAG corpora hold empty chunks);
        # only a pair of two empty texts is refused.
        with_empty = http.post("/rerank", json={"query": QUERY, "texts": [TEXTS[0], ""]})
        assert with_empty.status_code == 200, with_empty.text
        want = cross.predict([(QUERY, TEXTS[0]), (QUERY, "")])
        for r in with_empty.json():
            assert abs(r["score"] - float(want[r["index"]])) < TOL
        assert http.post("/rerank", json={"query": "", "texts": ["a"]}).status_code == 200
        empty = http.post("/rerank", json={"query": "", "texts": ["a", ""]})
        assert empty.status_code == 422 and empty.json()["error"] == "`inputs` cannot be empty"
        # x-compute-characters counts the query once per pair, as TEI does.
        assert int(with_empty.headers["x-compute-characters"]) == 2 * len(QUERY) + len(TEXTS[0])
        # TEI's failure reasons: the wrong model type for the route (/embed above), and
        # an unknown model (404) as a validation failure.
        metrics = http.get("/metrics").text
        assert 'te_request_failure{err="model_type"} 1.0' in metrics
        assert 'te_request_failure{err="inference"}' not in metrics


def test_gateway_predict_route(classify_gw: GatewayProcess, classifier_path: Path) -> None:
    ref = _reference_logits(classifier_path, ["I love this."])[0]
    probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
    with httpx.Client(base_url=classify_gw.url, timeout=60) as http:
        single = http.post("/predict", json={"inputs": "I love this."})
        assert single.status_code == 200, single.text
        rows = single.json()
        assert [set(r) for r in rows] == [{"score", "label"}] * 3
        assert rows[0]["label"] == LABELS[int(np.argmax(probs))]
        assert abs(rows[0]["score"] - probs.max()) < TOL

        pair = http.post("/predict", json={"inputs": ["The cat sat.", "A cat was sitting."]}).json()
        assert len(pair) == 3 and isinstance(pair[0], dict)  # one pair: one answer
        batch = http.post(
            "/predict",
            json={"inputs": [["The cat sat.", "A cat sat."], "I love this.", "x y z"], "raw_scores": True},
        ).json()
        assert len(batch) == 3 and all(len(r) == 3 for r in batch)
        by_label = {r["label"]: r["score"] for r in batch[1]}
        for label_id, name in LABELS.items():
            assert abs(by_label[name] - ref[label_id]) < TOL

        assert http.post("/", json={"inputs": "I love this."}).json()[0]["label"] == rows[0]["label"]
        info = http.get("/info").json()
        assert info["model_type"]["classifier"]["id2label"] == {str(k): v for k, v in LABELS.items()}
        assert http.post("/predict", json={"inputs": []}).status_code == 400
        assert http.post("/predict", json={"inputs": [["a", "b", "c"]]}).status_code == 422
        one_empty = http.post("/predict", json={"inputs": ["The cat sat.", ""]})
        assert one_empty.status_code == 200 and len(one_empty.json()) == 3  # one pair
        assert int(one_empty.headers["x-compute-characters"]) == len("The cat sat.")
        both = http.post("/predict", json={"inputs": [["", ""]]})
        assert both.status_code == 422 and both.json()["error"] == "`inputs` cannot be empty"
        assert http.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 424


# ------------------------------------------------------------------ LLM-style reranker
LLM_RERANKER = "tiny-llm-reranker"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def llm_reranker_path(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("llm-reranker")
    torch.manual_seed(3)
    config = Qwen3Config(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, max_position_embeddings=256, initializer_range=0.3, pad_token_id=0,
        architectures=["Qwen3ForCausalLM"],
    )  # fmt: skip
    Qwen3ForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_path / name).is_file():
            shutil.copy(model_path / name, folder / name)
    return folder


def _qwen3_reranker_reference(path: Path, query: str, docs: list[str]) -> np.ndarray:
    """Qwen3-Reranker's published recipe, one pair at a time: P(yes) at the last token."""
    from transformers import AutoModelForCausalLM

    from embedq.worker.tokenization import LLM_RERANK_PREFIX, LLM_RERANK_SUFFIX

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prefix = tok(LLM_RERANK_PREFIX, add_special_tokens=False)["input_ids"]
    suffix = tok(LLM_RERANK_SUFFIX, add_special_tokens=False)["input_ids"]
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = []
    for doc in docs:
        text = f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
        ids = prefix + tok(text, add_special_tokens=False)["input_ids"] + suffix
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, [no, yes]]
        out.append(torch.softmax(logits.float(), dim=-1)[1].item())
    return np.array(out, dtype=np.float32)


def test_llm_reranker_matches_the_qwen3_recipe(
    module_redis: RedisServer, llm_reranker_path: Path, tmp_path: Path
) -> None:
    expected = _qwen3_reranker_reference(llm_reranker_path, QUERY, TEXTS)
    worker = start_worker(
        module_redis.url, tmp_path,
        "--model-id", str(llm_reranker_path), "--llm-reranker", "--served-model-name", LLM_RERANKER,
        "--dtype", "float32",
        model=LLM_RERANKER,
    )  # fmt: skip
    try:
        with Client(module_redis.url, model=LLM_RERANKER) as client:
            hits = client.rerank(QUERY, TEXTS)
        assert sorted(h.index for h in hits) == list(range(len(TEXTS)))
        for h in hits:
            assert abs(h.score - expected[h.index]) < TOL, (h, expected)
        assert [h.index for h in hits] == list(np.argsort(-expected, kind="stable"))
        assert float(np.ptp(expected)) > 0.01, "random weights should spread the scores"
    finally:
        worker.stop()
