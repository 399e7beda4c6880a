"""SDK → Redis → worker with the real all-MiniLM-L6-v2 weights, against independent references."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from embedq import AsyncClient, EmptyInputError, ValidationError
from embedq.redis_server import RedisServer

from .helpers import MODEL, WorkerProcess, start_worker

TEXTS = [
    "What is Deep Learning?",
    "Deep Learning is...",
    "The quick brown fox jumps over the lazy dog.",
    "Redis Streams keep an append-only log with consumer groups.",
    "embedq sends embedding jobs through Redis to a pool of workers.",
    "짧은 한국어 문장입니다.",
    "Un texte en français, avec des accents.",
    "x",
]
LONG = " ".join(f"token{i} alpha beta" for i in range(200))  # far over 256 tokens


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def read_snapshot(path: Path) -> np.ndarray:
    body = path.read_text().split("---", 2)[2]
    vectors: list[list[float]] = []
    for line in body.splitlines():
        if line.startswith("- - "):
            vectors.append([float(line[4:])])
        elif line.startswith("  - "):
            vectors[-1].append(float(line[4:]))
    return np.array(vectors, dtype=np.float32)


@pytest.fixture(scope="module")
def st_model(model_path: Path) -> SentenceTransformer:
    return SentenceTransformer(str(model_path), device="cpu")


@pytest.fixture(scope="module")
def worker(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = start_worker(module_redis.url, tmp_path_factory.mktemp("w"), "--dtype", "float32", scope="module")
    yield w
    assert w.stop() == 0, w.log()[-3000:]


@pytest.fixture
async def client(module_redis: RedisServer, worker: WorkerProcess) -> AsyncClient:
    async with AsyncClient(module_redis.url, model=MODEL, timeout=60) as c:
        yield c  # type: ignore[misc]


async def test_matches_sentence_transformers_fp32(client: AsyncClient, st_model: SentenceTransformer) -> None:
    got = await client.embed(TEXTS)
    want = st_model.encode(TEXTS, convert_to_numpy=True)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert cosine_rows(got, want).min() >= 0.9999
    np.testing.assert_allclose(got, want, atol=2e-5)


async def test_known_values_and_single_string_shape(client: AsyncClient) -> None:
    one = await client.embed("What is Deep Learning?")
    assert one.shape == (1, 384)
    np.testing.assert_allclose(one[0, :3], [-0.077851, -0.033280, 0.019743], atol=1e-5)
    pair = await client.embed(["What is Deep Learning?", "Deep Learning is..."])
    assert abs(float(pair[0] @ pair[1]) - 0.674649) < 1e-5


async def test_tei_snapshot_unnormalized(client: AsyncClient, tei_snapshots: Path) -> None:
    want = read_snapshot(tei_snapshots / "test_bert__bert_batch.snap")
    got = await client.embed(
        ["What is Deep Learning?", "Deep Learning is...", "What is Deep Learning?"], normalize=False
    )
    assert got.shape == want.shape == (3, 384)
    assert cosine_rows(got, want).min() > 0.999999
    # TEI uses tanh-approximated GELU; transformers the exact one (~1e-3 apart).
    np.testing.assert_allclose(got, want, atol=5e-3)
    assert abs(float(np.linalg.norm(got[0])) - float(np.linalg.norm(want[0]))) < 1e-2
    single = read_snapshot(tei_snapshots / "test_bert__bert_single.snap")
    assert cosine_rows(got[:1], single).min() > 0.99999


@pytest.mark.parametrize("name", ["single", "batch"])
async def test_tei_snapshot_matryoshka(client: AsyncClient, tei_snapshots: Path, name: str) -> None:
    want = read_snapshot(tei_snapshots / f"test_http_embed__mrl_embeddings_{name}.snap")
    inputs = "test" if name == "single" else ["test", "test", "test"]
    got = await client.embed(inputs, dimensions=128)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert cosine_rows(got, want).min() > 0.99999


async def test_truncation_right_matches_sentence_transformers(
    client: AsyncClient, st_model: SentenceTransformer
) -> None:
    got = await client.embed(LONG)  # auto-truncate is on by default, to the right
    want = st_model.encode([LONG])  # ST truncates to max_seq_length (256), right side
    assert cosine_rows(got, want)[0] >= 0.9999


async def test_truncation_left_keeps_the_end(client: AsyncClient, model_path: Path) -> None:
    got = await client.embed(LONG, truncation_direction="left", normalize=False)
    # Independent reference: [CLS] + last 254 content tokens + [SEP], mean-pooled by hand.
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    content = tok(LONG, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.cls_token_id, *content[-254:], tok.sep_token_id]])
    with torch.inference_mode():
        want = model(input_ids=ids).last_hidden_state.mean(dim=1).numpy()
    assert cosine_rows(got, want)[0] >= 0.9999
    right = await client.embed(LONG, normalize=False)
    assert cosine_rows(got, right)[0] < 0.99  # really a different window


async def test_token_id_inputs_equal_text(client: AsyncClient, model_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok("What is Deep Learning?")["input_ids"]
    by_ids = await client.embed([ids])
    by_text = await client.embed("What is Deep Learning?")
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)


async def test_typed_errors(client: AsyncClient) -> None:
    with pytest.raises(EmptyInputError):
        await client.embed([])
    with pytest.raises(ValidationError, match="cannot be empty"):
        await client.embed(["fine", ""])
    with pytest.raises(ValidationError, match="less than 256 tokens"):
        await client.embed(LONG, truncate=False)
    with pytest.raises(ValidationError, match="embedding size"):
        await client.embed("x", dimensions=385)
    with pytest.raises(ValidationError, match="prompt"):
        await client.embed("x", prompt_name="query")  # this model has no prompts
    # The worker is unharmed.
    assert (await client.embed("still fine")).shape == (1, 384)


async def test_reply_carries_tracing_metadata(client: AsyncClient) -> None:
    reply = await client.request("embed", ["What is Deep Learning?", "Deep Learning is..."], {})
    assert reply.ok and reply.meta is not None and reply.embed is not None
    m = reply.meta
    assert m.worker and m.queue_ms >= 0 and m.tokenize_ms > 0 and m.infer_ms > 0
    assert m.batch_size >= 2 and m.tokens == sum(reply.embed.token_counts) == 7 + 8
    assert reply.embed.token_counts == [7, 8]  # [CLS] what is deep learning ? [SEP]; ... is three tokens


async def test_prompts(
    module_redis: RedisServer, tmp_path: Path, model_path: Path, st_model: SentenceTransformer
) -> None:
    folder = tmp_path / "minilm-prompts"
    shutil.copytree(model_path, folder)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps(
            {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "passage"}
        )
    )
    w = start_worker(
        module_redis.url,
        tmp_path,
        "--model-id",
        str(folder),
        "--served-model-name",
        "minilm-prompts",
        model="minilm-prompts",
    )
    try:
        async with AsyncClient(module_redis.url, model="minilm-prompts", timeout=60) as c:
            query = await c.embed("how do streams work", prompt_name="query")
            default = await c.embed("how do streams work")
            with pytest.raises(ValidationError, match="nope"):
                await c.embed("x", prompt_name="nope")
        want = st_model.encode(["query: how do streams work", "passage: how do streams work"])
        assert cosine_rows(query, want[:1])[0] >= 0.9999
        assert cosine_rows(default, want[1:])[0] >= 0.9999  # default_prompt_name applied
    finally:
        w.stop()


@pytest.mark.parametrize("packing", ["on", "off"])
async def test_bf16_within_cosine_0999(
    packing: str, module_redis: RedisServer, tmp_path: Path, st_model: SentenceTransformer
) -> None:
    name = f"minilm-bf16-{packing}"
    w = start_worker(
        module_redis.url,
        tmp_path,
        "--dtype",
        "bfloat16",
        "--packing",
        packing,
        "--served-model-name",
        name,
        model=name,
    )
    try:
        async with AsyncClient(module_redis.url, model=name, timeout=120) as c:
            got = await c.embed(TEXTS + [LONG])
        want = st_model.encode(TEXTS + [LONG])
        assert cosine_rows(got, want).min() >= 0.999
    finally:
        w.stop()


async def test_kill_9_with_real_model_loses_nothing(
    module_redis: RedisServer, tmp_path: Path, st_model: SentenceTransformer
) -> None:
    args = ("--served-model-name", "minilm-crash", "--consumer-name", "crash-1", "--max-batch-requests", "4")
    w = start_worker(module_redis.url, tmp_path, *args, model="minilm-crash")
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i}) " + "more words " * (i % 40) for i in range(120)]
    async with AsyncClient(module_redis.url, model="minilm-crash", timeout=180) as c:
        tasks = [asyncio.create_task(c.embed(t)) for t in texts]
        while sum(t.done() for t in tasks) < 5:
            await asyncio.sleep(0.05)
        w.kill()
        assert sum(t.done() for t in tasks) < len(texts)
        w = start_worker(module_redis.url, tmp_path, *args, model="minilm-crash")
        results = np.concatenate(await asyncio.gather(*tasks))
    w.stop()
    assert cosine_rows(results, st_model.encode(texts)).min() >= 0.9999
