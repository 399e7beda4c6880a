"""The HTTP gateway with the real model: real HTTP, real clients (openai, huggingface_hub),
real Redis and a real worker. Every route, error shape and header TEI defines."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from sentence_transformers import SentenceTransformer

from embedq import AsyncClient
from embedq.redis_server import RedisServer

from .helpers import MODEL, GatewayProcess, WorkerProcess, start_gateway, start_worker

DOCS = [
    "Redis Streams are an append-only log with consumer groups.",
    "The Eiffel Tower is in Paris.",
    "Photosynthesis turns light into chemical energy in plants.",
    "A consumer group lets several workers share one stream.",
]
API_KEY = "s3cret-key"


@pytest.fixture(scope="module")
def worker(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = start_worker(module_redis.url, tmp_path_factory.mktemp("w"), "--dtype", "float32", scope="module")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def gateway(
    module_redis: RedisServer, worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    g = start_gateway(module_redis.url, tmp_path_factory.mktemp("g"), scope="module")
    yield g
    assert g.stop() == 0, g.log()


@pytest.fixture(scope="module")
def strict_gateway(
    module_redis: RedisServer, worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """API key, small payload limit, small client batches rejected, CORS for one origin."""
    tmp = tmp_path_factory.mktemp("g2")
    (tmp / "api-key").write_text(API_KEY + "\n")  # a secret mounted as a file
    g = start_gateway(
        module_redis.url,
        tmp,
        "--api-key-file", str(tmp / "api-key"),
        "--payload-limit", "2000",
        "--max-client-batch-size", "4",
        "--client-batch-policy", "reject",
        "--cors-allow-origin", "https://app.example",
        "--model-alias", f"text-embedding-3-small={MODEL}",
        scope="module",
    )  # fmt: skip
    yield g
    g.stop()


@pytest.fixture(scope="module")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def st_model(model_path: Path) -> SentenceTransformer:
    return SentenceTransformer(str(model_path), device="cpu")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


# ------------------------------------------------------------------ the seed's examples
def test_seed_curl_example(gateway: GatewayProcess, st_model: SentenceTransformer) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    port = gateway.url.rsplit(":", 1)[1]
    out = subprocess.run(
        [curl, "-s", "-f", f"127.0.0.1:{port}/embed", "-X", "POST",
         "-d", '{"inputs":["문서 1","문서 2","문서 3"]}', "-H", "Content-Type: application/json"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    vectors = np.array(json.loads(out.stdout), dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = st_model.encode(["문서 1", "문서 2", "문서 3"], normalize_embeddings=True)
    assert _cos(vectors, expected).min() >= 0.9999


class TinyRag:
    """The seed's RAG class: post documents to /embed, keep the vectors, rank by cosine."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.docs: list[str] = []
        self.vectors = np.zeros((0, 0), dtype=np.float32)

    def _embed(self, texts: list[str]) -> np.ndarray:
        resp = httpx.post(f"{self.url}/embed", json={"inputs": texts}, timeout=60)
        resp.raise_for_status()
        return np.array(resp.json(), dtype=np.float32)

    def add(self, docs: list[str]) -> None:
        self.docs += docs
        new = self._embed(docs)
        self.vectors = new if not self.vectors.size else np.vstack([self.vectors, new])

    def search(self, query: str, k: int = 2) -> list[tuple[str, float]]:
        q = self._embed([query])[0]
        scores = self.vectors @ q / (np.linalg.norm(self.vectors, axis=1) * np.linalg.norm(q))
        order = np.argsort(-scores)[:k]
        return [(self.docs[i], float(scores[i])) for i in order]


def test_seed_rag_class(gateway: GatewayProcess) -> None:
    rag = TinyRag(gateway.url)
    rag.add(DOCS)
    top = rag.search("How do several consumers read the same Redis stream?")
    assert top[0][0] in (DOCS[0], DOCS[3])
    assert rag.search("Which city has the Eiffel Tower?", k=1)[0][0] == DOCS[1]


# ------------------------------------------------------------------------------ /embed
def test_embed_matches_sentence_transformers_and_the_sdk(
    http: httpx.Client, st_model: SentenceTransformer, module_redis: RedisServer
) -> None:
    resp = http.post("/embed", json={"inputs": DOCS})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    got = np.array(resp.json(), dtype=np.float32)
    expected = st_model.encode(DOCS, normalize_embeddings=True)
    assert _cos(got, expected).min() >= 0.9999
    np.testing.assert_allclose(got, expected, atol=2e-5)

    # One string: still a 2-D list, as TEI answers.
    single = http.post("/embed", json={"inputs": DOCS[0]}).json()
    assert len(single) == 1 and len(single[0]) == 384

    async def sdk() -> np.ndarray:
        async with AsyncClient(module_redis.url, model=MODEL) as client:
            return await client.embed(DOCS)

    np.testing.assert_allclose(got, asyncio.run(sdk()), atol=1e-6)


def test_embed_parameters(http: httpx.Client, st_model: SentenceTransformer) -> None:
    raw = np.array(http.post("/embed", json={"inputs": DOCS[:2], "normalize": False}).json())
    expected = st_model.encode(DOCS[:2], normalize_embeddings=True)  # its pipeline ends in Normalize
    assert _cos(raw, expected).min() >= 0.9999
    assert np.linalg.norm(raw, axis=1).min() > 1.5  # mean-pooled MiniLM vectors are far from unit length

    cut = np.array(http.post("/embed", json={"inputs": DOCS[:2], "dimensions": 128}).json())
    assert cut.shape == (2, 128)
    ref = expected[:, :128] / np.linalg.norm(expected[:, :128], axis=1, keepdims=True)
    assert _cos(cut, ref).min() >= 0.9999

    # Token ids, Right/Left accepted, unknown fields ignored.
    ids = http.post("/tokenize", json={"inputs": DOCS[1]}).json()[0]
    by_ids = http.post(
        "/embed", json={"inputs": [t["id"] for t in ids], "truncation_direction": "Left", "parameters": {}}
    )
    assert by_ids.status_code == 200
    by_text = http.post("/embed", json={"inputs": DOCS[1]}).json()
    assert _cos(np.array(by_ids.json()), np.array(by_text)).min() >= 0.9999


@pytest.mark.parametrize(
    ("body", "status", "error_type", "message"),
    [
        ({"inputs": []}, 400, "Empty", "Batch is empty"),
        ({"inputs": ""}, 422, "Validation", "cannot be empty"),
        ({"inputs": "x", "dimensions": 0}, 422, "Validation", "dimensions"),
        ({"inputs": "x", "dimensions": 385}, 422, "Validation", "greater than the model's embedding size"),
        ({"inputs": "x", "prompt_name": "nope"}, 422, "Validation", "prompt"),
        ({"inputs": " word" * 400, "truncate": False}, 422, "Validation", "must have less than 256 tokens"),
        ({"inputs": "x", "truncation_direction": "up"}, 422, "Validation", "truncation_direction"),
        ({"inputs": {"a": 1}}, 422, "Validation", "inputs"),
        ({"nothing": 1}, 422, "Validation", "missing field `inputs`"),
        ({"inputs": [[1, 2], "text", 3]}, 422, "Validation", "inputs"),
        ({"inputs": [999999]}, 422, "Validation", "outside the vocabulary"),
        ({"inputs": "x", "prompt_name": "p" * 300}, 422, "Validation", "prompt_name"),
    ],
)
def test_embed_errors_have_teis_shape(
    http: httpx.Client, body: dict[str, object], status: int, error_type: str, message: str
) -> None:
    resp = http.post("/embed", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error", "error_type"}
    assert err["error_type"] == error_type
    assert message in err["error"]


def test_malformed_json_and_missing_content_type(http: httpx.Client) -> None:
    resp = http.post("/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error_type"] == "Validation"
    # curl -d without -H sends a form content type; the body is JSON all the same.
    form = http.post(
        "/embed", content=b'{"inputs":"hello"}', headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert form.status_code == 200 and len(form.json()[0]) == 384


def test_unknown_paths_and_wrong_methods_have_the_error_shapes(http: httpx.Client) -> None:
    missing = http.get("/no-such-route")
    assert missing.status_code == 404
    assert missing.json() == {"error": "Not Found", "error_type": "NotFound"}
    wrong = http.get("/embed")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {"error": "Method Not Allowed", "error_type": "MethodNotAllowed"}
    openai_wrong = http.get("/v1/embeddings")
    assert openai_wrong.status_code == 405
    assert openai_wrong.json() == {
        "error": {"message": "Method Not Allowed", "type": "MethodNotAllowed", "code": "method_not_allowed"}
    }


def test_timing_headers(http: httpx.Client) -> None:
    resp = http.post("/embed", json={"inputs": ["hello world", "héllo"]})
    h = resp.headers
    for name in (
        "x-compute-time",
        "x-total-time",
        "x-tokenization-time",
        "x-queue-time",
        "x-inference-time",
        "x-compute-tokens",
        "x-compute-characters",
    ):
        assert int(h[name]) >= 0, name
    assert h["x-compute-type"] == "cpu"
    assert int(h["x-compute-characters"]) == len("hello world") + len("héllo")
    tokens = http.post("/tokenize", json={"inputs": ["hello world", "héllo"]}).json()
    assert int(h["x-compute-tokens"]) == sum(len(t) for t in tokens)
    assert int(h["x-total-time"]) >= int(h["x-inference-time"])


def test_client_batches_are_split_and_merged_in_order(http: httpx.Client) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'finance'}" for i in range(75)]
    whole = http.post("/embed", json={"inputs": texts})
    assert whole.status_code == 200, whole.text
    vectors = np.array(whole.json(), dtype=np.float32)
    assert vectors.shape == (75, 384)
    for i in (0, 31, 32, 33, 64, 74):  # first, chunk edges, last
        one = np.array(http.post("/embed", json={"inputs": texts[i]}).json()[0])
        assert _cos(vectors[i], one) >= 0.99999, i


# ----------------------------------------------------------------------- real clients
def test_huggingface_hub_clients(gateway: GatewayProcess, st_model: SentenceTransformer) -> None:
    expected = st_model.encode(DOCS[:2], normalize_embeddings=True)
    root = InferenceClient(model=gateway.url).feature_extraction(DOCS[:2])
    embed = InferenceClient().feature_extraction(DOCS[:2], model=f"{gateway.url}/embed", normalize=True)
    for got in (root, embed):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (2, 384)
        assert _cos(got, expected).min() >= 0.9999
    cut = InferenceClient(model=f"{gateway.url}/embed").feature_extraction(DOCS[0], dimensions=64)
    assert cut.shape == (1, 64)

    async def run_async() -> np.ndarray:
        client = AsyncInferenceClient(model=f"{gateway.url}/embed")
        try:
            return await client.feature_extraction(DOCS[:2])
        finally:
            await client.close()

    assert _cos(asyncio.run(run_async()), expected).min() >= 0.9999

    sims = InferenceClient(model=f"{gateway.url}/similarity").sentence_similarity(
        DOCS[0], other_sentences=[DOCS[3], DOCS[1]]
    )
    q = st_model.encode([DOCS[0], DOCS[3], DOCS[1]], normalize_embeddings=True)
    np.testing.assert_allclose(sims, [q[0] @ q[1], q[0] @ q[2]], atol=1e-4)
    assert sims[0] > sims[1]


def test_openai_sdk(gateway: GatewayProcess, st_model: SentenceTransformer) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    expected = st_model.encode(DOCS, normalize_embeddings=True)

    # The SDK asks for base64 when the caller does not choose, and decodes it.
    default = client.embeddings.create(input=DOCS, model=MODEL)
    got = np.array([d.embedding for d in default.data], dtype=np.float32)
    assert [d.index for d in default.data] == [0, 1, 2, 3]
    assert _cos(got, expected).min() >= 0.9999
    assert default.model == MODEL
    assert default.usage.prompt_tokens == default.usage.total_tokens > len(DOCS) * 3

    floats = client.embeddings.create(input=DOCS[0], model=MODEL, encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, got[0], atol=1e-6)

    small = client.embeddings.create(input=[DOCS[0]], model=MODEL, dimensions=32)
    assert len(small.data[0].embedding) == 32
    assert abs(np.linalg.norm(small.data[0].embedding) - 1.0) < 1e-5

    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(input="x", model="text-embedding-3-small")
    assert "not served" in str(not_found.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(input=[], model=MODEL)
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(input="x", model=MODEL, dimensions=1000)

    # The route without /v1, through the async client.
    async_client = openai.AsyncOpenAI(base_url=gateway.url, api_key="unused", max_retries=0)
    resp = asyncio.run(async_client.embeddings.create(input="hello", model=MODEL))
    assert len(resp.data[0].embedding) == 384
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_openai_raw_base64_and_error_shape(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/embeddings", json={"input": ["a", "b"], "encoding_format": "base64", "model": MODEL}
    )
    body = resp.json()
    raw = base64.b64decode(body["data"][1]["embedding"])
    vec = np.frombuffer(raw, dtype="<f4")
    assert vec.shape == (384,)
    ref = np.array(http.post("/embed", json={"inputs": "b"}).json()[0])
    np.testing.assert_allclose(vec, ref, atol=1e-6)
    bad = http.post("/v1/embeddings", json={"input": [], "model": MODEL})
    assert bad.status_code == 400
    assert set(bad.json()["error"]) == {"message", "type", "code"}


# ------------------------------------------------------------------- the other routes
def test_tokenize_and_decode(http: httpx.Client) -> None:
    toks = http.post("/tokenize", json={"inputs": "héllo world"}).json()
    assert len(toks) == 1
    first, *middle, last = toks[0]
    assert first == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert last["special"] and last["start"] is None
    raw = "héllo world".encode()
    for t in middle:  # byte offsets into the UTF-8 text, as TEI reports them
        assert raw[t["start"] : t["stop"]].decode() == t["text"]
    assert middle[-1]["text"] == "world" and middle[-1]["start"] == len("héllo ".encode())

    plain = http.post("/tokenize", json={"inputs": ["a b", "c"], "add_special_tokens": False}).json()
    assert [len(x) for x in plain] == [2, 1] and not any(t["special"] for x in plain for t in x)
    with_prompt = http.post("/tokenize", json={"inputs": "x", "prompt_name": "nope"})
    assert with_prompt.status_code == 422

    ids = [t["id"] for t in toks[0]]
    assert http.post("/decode", json={"ids": ids}).json() == ["hello world"]
    assert http.post("/decode", json={"ids": [ids, ids[:2]], "skip_special_tokens": False}).json() == [
        "[CLS] hello world [SEP]",
        "[CLS] hello",
    ]
    assert http.post("/decode", json={"ids": []}).status_code == 400


def test_embed_all_pools_back_to_embed(http: httpx.Client) -> None:
    per_token = http.post("/embed_all", json={"inputs": ["hello world", "a longer sentence here"]})
    assert per_token.status_code == 200
    rows = per_token.json()
    assert [len(r) for r in rows] == [4, 6]  # special tokens included
    pooled = np.array(http.post("/embed", json={"inputs": ["hello world"], "normalize": False}).json()[0])
    np.testing.assert_allclose(np.mean(np.array(rows[0]), axis=0), pooled, atol=1e-5)


def test_similarity_route(http: httpx.Client) -> None:
    resp = http.post(
        "/similarity",
        json={
            "inputs": {
                "source_sentence": "a cat sits",
                "sentences": ["a cat is sitting", "stock prices fell"],
            }
        },
    )
    assert resp.status_code == 200
    sims = resp.json()
    assert len(sims) == 2 and sims[0] > sims[1]
    empty = http.post("/similarity", json={"inputs": {"source_sentence": "a", "sentences": []}})
    assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/rerank", {"query": "q", "texts": ["a", "b"]}),
        ("/v1/rerank", {"query": "q", "documents": ["a", "b"], "top_n": 1}),
        ("/predict", {"inputs": "x"}),
        ("/embed_sparse", {"inputs": "x"}),
    ],
)
def test_routes_of_other_model_kinds_answer_424(
    http: httpx.Client, path: str, body: dict[str, object]
) -> None:
    resp = http.post(path, json=body)
    assert resp.status_code == 424
    assert resp.json()["error_type"] == "Backend"
    assert "embedding model" in resp.json()["error"]


def test_root_routes_by_model_kind(http: httpx.Client) -> None:
    resp = http.post("/", json={"inputs": "hello"})
    assert resp.status_code == 200
    assert np.array(resp.json()).shape == (1, 384)


def test_info_health_metrics_docs(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert info["model_id"] == MODEL
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256
    assert info["model_dtype"] == "float32"
    assert info["max_client_batch_size"] == 32
    assert info["auto_truncate"] is True
    assert len(info["model_sha"]) == 16  # the worker's fingerprint of config and weights
    for field in ("model_sha", "max_concurrent_requests", "max_batch_tokens", "max_batch_requests",
                  "tokenization_workers", "version", "sha", "docker_label", "served_model_name"):  # fmt: skip
        assert field in info

    health = http.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert http.get("/ping").status_code == 200

    def counter(series: str) -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    http.post("/embed", json={"inputs": "counted"})
    batches = counter('te_request_count{method="batch"}')
    http.post("/embed", json={"inputs": []})
    # As in TEI, an empty batch is a counted request that failed.
    assert counter('te_request_count{method="batch"}') == batches + 1
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert '\nte_request_count{method="single"} ' in text
    assert '\nte_embed_success{method="single"} ' in text
    assert 'te_request_failure{err="validation"} ' in text
    assert "# TYPE te_request_duration histogram" in text
    assert "te_request_duration_bucket{le=" in text
    assert "te_queue_size " in text
    assert f'embedq_live_workers{{model="{MODEL}"}} 1.0' in text
    assert f'embedq_dead_letters{{model="{MODEL}"}} 0.0' in text
    assert f'embedq_queue_backlog{{lane="interactive",model="{MODEL}"}} ' in text
    assert f'embedq_queue_pending{{lane="bulk",model="{MODEL}"}} ' in text
    assert f'embedq_jobs_answered_total{{model="{MODEL}"}} ' in text
    # TEI's counters carry no _total suffix; embedq's own follow Prometheus' convention.
    assert not [line for line in text.splitlines() if line.startswith("te_") and "_total" in line]

    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = http.get("/api-doc/openapi.json").json()
    for path in ("/embed", "/embed_all", "/rerank", "/v1/embeddings", "/tokenize", "/decode", "/similarity"):
        assert path in spec["paths"], path
    assert "EmbedRequest" in spec["components"]["schemas"]
    assert spec["paths"]["/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbedRequest"
    }


# ------------------------------------------------------------------ the strict gateway
def test_api_key(strict_gateway: GatewayProcess) -> None:
    url = strict_gateway.url
    missing = httpx.post(f"{url}/embed", json={"inputs": "x"})
    assert missing.status_code == 401
    assert missing.json() == {"error": "Unauthorized", "error_type": "Unauthorized"}
    wrong = httpx.post(f"{url}/embed", json={"inputs": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{url}/info").status_code == 401
    ok = httpx.post(f"{url}/embed", json={"inputs": "x"}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    # Probes and scrapers stay open.
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert len(client.embeddings.create(input="x", model=MODEL).data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            input="x", model=MODEL
        )
    assert API_KEY not in strict_gateway.log()  # never logged


def test_model_alias_names_the_served_model(strict_gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{strict_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    aliased = client.embeddings.create(input=DOCS[:2], model="text-embedding-3-small")
    assert aliased.model == "text-embedding-3-small"  # the name the caller used
    direct = client.embeddings.create(input=DOCS[:2], model=MODEL)
    np.testing.assert_allclose(
        [d.embedding for d in aliased.data], [d.embedding for d in direct.data], atol=1e-6
    )
    assert sorted(m.id for m in client.models.list().data) == sorted([MODEL, "text-embedding-3-small"])
    with pytest.raises(openai.NotFoundError):  # only the alias given, not any name
        client.embeddings.create(input="x", model="text-embedding-3-large")


def test_model_alias_flag_is_checked() -> None:
    from embedq.producer.gateway.config import GatewayConfigError, _model_aliases

    assert _model_aliases(["a=org/m", " b = org/m "]) == (("a", "org/m"), ("b", "org/m"))
    for bad in (["a"], ["=org/m"], ["a="], ["org/m=org/m"], ["a=x", "a=y"], ["a=bad name"]):
        with pytest.raises(GatewayConfigError):
            _model_aliases(bad)


def test_payload_limit_is_a_json_413(strict_gateway: GatewayProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    resp = httpx.post(f"{strict_gateway.url}/embed", json={"inputs": "x" * 3000}, headers=auth)
    assert resp.status_code == 413
    assert resp.json()["error_type"] == "PayloadTooLarge"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    chunked = httpx.post(f"{strict_gateway.url}/embed", content=chunks(), headers=auth)
    assert chunked.status_code == 413


def test_reject_policy_and_cors(strict_gateway: GatewayProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    resp = httpx.post(f"{strict_gateway.url}/embed", json={"inputs": ["a"] * 5}, headers=auth)
    assert resp.status_code == 422
    assert resp.json() == {"error": "batch size 5 > maximum allowed batch size 4", "error_type": "Validation"}
    assert (
        httpx.post(f"{strict_gateway.url}/embed", json={"inputs": ["a"] * 4}, headers=auth).status_code == 200
    )

    preflight = httpx.options(
        f"{strict_gateway.url}/embed",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{strict_gateway.url}/embed",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers
    # A refusal reaches the browser as the 401 it is, and every x-* header is readable.
    refused = httpx.post(
        f"{strict_gateway.url}/embed", json={"inputs": "a"}, headers={"Origin": "https://app.example"}
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    served = httpx.post(
        f"{strict_gateway.url}/embed", json={"inputs": "a"}, headers={**auth, "Origin": "https://app.example"}
    )
    exposed = {h.strip() for h in served.headers["access-control-expose-headers"].split(",")}
    assert {h for h in served.headers if h.startswith("x-")} <= exposed
    assert len(exposed) == 8
