"""The gateway's queue side with the fake backend: admission (429), health, large
responses, split batches that fail, models that are not served."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import redis.asyncio

from embedq import AsyncClient
from embedq.common import keys
from embedq.redis_server import RedisServer
from embedq.worker.backends.fake import RAISE_WORD

from .helpers import MODEL, start_gateway, start_worker

FAKE = ("--backend", "fake")


def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


def test_large_responses_match_the_sdk(redis_server: RedisServer, tmp_path: Path) -> None:
    start_worker(redis_server.url, tmp_path, *FAKE)
    gw = start_gateway(redis_server.url, tmp_path, "--max-client-batch-size", "256")
    texts = [f"passage {i} with some words {i * 7}" for i in range(3000)]

    async def sdk() -> np.ndarray:
        async with AsyncClient(redis_server.url, model=MODEL) as client:
            return await client.embed(texts)

    expected = asyncio.run(sdk())
    with httpx.Client(base_url=gw.url, timeout=120) as http:
        tei = http.post("/embed", json={"inputs": texts})
        assert tei.status_code == 200
        np.testing.assert_array_equal(np.array(tei.json(), dtype=np.float32), expected)
        oai = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in oai["data"]])
        np.testing.assert_array_equal(decoded, expected)
        assert [d["index"] for d in oai["data"]] == list(range(3000))
        floats = http.post("/v1/embeddings", json={"input": texts[:500]}).json()
        np.testing.assert_array_equal(
            np.array([d["embedding"] for d in floats["data"]], dtype=np.float32), expected[:500]
        )
    assert gw.stop() == 0


def test_a_failing_chunk_fails_the_request(redis_server: RedisServer, tmp_path: Path) -> None:
    start_worker(redis_server.url, tmp_path, *FAKE)
    gw = start_gateway(redis_server.url, tmp_path, "--max-client-batch-size", "4")
    texts = [f"fine {i}" for i in range(10)]
    texts[9] = f"bad {RAISE_WORD}"
    resp = httpx.post(f"{gw.url}/embed", json={"inputs": texts}, timeout=60)
    assert resp.status_code == 424
    assert resp.json()["error_type"] == "Backend" and "inference failed" in resp.json()["error"]
    # The gateway keeps serving.
    assert httpx.post(f"{gw.url}/embed", json={"inputs": texts[:9]}, timeout=60).status_code == 200
    # Dead letters show on the gateway's scrape.
    with redis.Redis.from_url(redis_server.url) as r:
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"not msgpack at all"})
    _wait_for(lambda: f'embedq_dead_letters{{model="{MODEL}"}} 1.0' in httpx.get(f"{gw.url}/metrics").text)


def test_health_follows_the_workers(redis_server: RedisServer, tmp_path: Path) -> None:
    gw = start_gateway(redis_server.url, tmp_path)
    unhealthy = httpx.get(f"{gw.url}/health")
    assert unhealthy.status_code == 503
    assert unhealthy.json() == {"error": "unhealthy", "error_type": "Unhealthy"}
    # No worker registered the gateway's model yet: a 503 that clients retry (openai's
    # does), not a hang and not a 404 they would give up on; /info says the same.
    for early in (
        httpx.post(f"{gw.url}/embed", json={"inputs": "x"}, timeout=10),
        httpx.get(f"{gw.url}/info", timeout=10),
        httpx.post(f"{gw.url}/v1/embeddings", json={"input": "x", "model": MODEL}, timeout=10),
    ):
        assert early.status_code == 503, early.text
        assert "no worker has registered" in early.text and MODEL in early.text
    assert httpx.get(f"{gw.url}/info").json()["error_type"] == "Unhealthy"
    # Any other name is still not served here.
    other = httpx.post(f"{gw.url}/v1/embeddings", json={"input": "x", "model": "other"}, timeout=10)
    assert other.status_code == 404 and "not served" in other.text

    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    _wait_for(lambda: httpx.get(f"{gw.url}/health").status_code == 200)
    _wait_for(lambda: httpx.post(f"{gw.url}/embed", json={"inputs": "x"}).status_code == 200)

    worker.stop()  # a clean stop removes the heartbeat at once
    assert httpx.get(f"{gw.url}/health").status_code == 503
    time.sleep(0.6)  # routes read a snapshot refreshed every 0.25 s
    resp = httpx.post(f"{gw.url}/embed", json={"inputs": "x"})
    assert resp.json()["error_type"] == "Unhealthy" and "no live worker" in resp.json()["error"]


def test_backlog_admission_answers_429_at_once(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    gw = start_gateway(redis_server.url, tmp_path, "--max-queue-backlog", "5", "--request-timeout", "60")
    worker.proc.send_signal(signal.SIGSTOP)  # a stalled worker: the queue stops draining
    try:

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=90) as http:
                first = [asyncio.create_task(http.post("/embed", json={"inputs": f"q{i}"})) for i in range(5)]
                r = redis.asyncio.Redis.from_url(redis_server.url)
                for _ in range(300):
                    if await r.xlen(keys.jobs_stream(MODEL)) >= 5:
                        break
                    await asyncio.sleep(0.05)
                await r.aclose()
                await asyncio.sleep(0.6)  # the gateway re-reads backlogs every 0.25 s
                started = time.monotonic()
                refused = await http.post("/embed", json={"inputs": "one too many"})
                assert time.monotonic() - started < 1.0
                assert refused.status_code == 429
                assert refused.json()["error_type"] == "Overloaded"
                scrape = (await http.get("/metrics")).text
                backlog = next(
                    float(line.rsplit(" ", 1)[1])
                    for line in scrape.splitlines()
                    if line.startswith(f'embedq_queue_backlog{{lane="interactive",model="{MODEL}"}}')
                )
                assert backlog >= 5
                worker.proc.send_signal(signal.SIGCONT)
                return list(await asyncio.gather(*first))

        answered = asyncio.run(flood())
        assert [r.status_code for r in answered] == [200] * 5
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'te_request_failure{err="overloaded"} 1.0' in metrics
    finally:
        worker.proc.send_signal(signal.SIGCONT)


def test_in_flight_admission_of_one_gateway(redis_server: RedisServer, tmp_path: Path) -> None:
    # A slow fake model: 20 ms per token keeps requests in flight.
    start_worker(redis_server.url, tmp_path, *FAKE, "--fake-delay-us-per-token", "20000")
    gw = start_gateway(redis_server.url, tmp_path, "--max-concurrent-requests", "4")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
            calls = [http.post("/embed", json={"inputs": ["a b", "c d"]}) for _ in range(4)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    codes = asyncio.run(burst())
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    # A request larger than the whole limit still runs when it is alone.
    alone = httpx.post(f"{gw.url}/embed", json={"inputs": [f"w{i}" for i in range(6)]}, timeout=60)
    assert alone.status_code == 200


def test_redis_down_is_a_503_not_a_hang(redis_server: RedisServer, tmp_path: Path) -> None:
    start_worker(redis_server.url, tmp_path, *FAKE)
    gw = start_gateway(redis_server.url, tmp_path, "--request-timeout", "5")
    assert httpx.post(f"{gw.url}/embed", json={"inputs": "x"}, timeout=10).status_code == 200
    redis_server.stop()
    _wait_for(lambda: httpx.get(f"{gw.url}/health", timeout=20).status_code == 503, timeout=30)
    started = time.monotonic()
    resp = httpx.post(f"{gw.url}/embed", json={"inputs": "x"}, timeout=30)
    assert resp.status_code in (503, 504), resp.text
    assert time.monotonic() - started < 15


def test_model_option_and_v1_models(redis_server: RedisServer, tmp_path: Path) -> None:
    start_worker(redis_server.url, tmp_path, *FAKE, model="other-model")
    gw = start_gateway(redis_server.url, tmp_path, model="other-model")
    models = httpx.get(f"{gw.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["other-model"]
    ok = httpx.post(f"{gw.url}/v1/embeddings", json={"input": "x", "model": "other-model"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["model"] == "other-model"
    # No model named: the gateway's own.
    assert httpx.post(f"{gw.url}/v1/embeddings", json={"input": "x"}, timeout=30).status_code == 200
    assert httpx.get(f"{gw.url}/info").json()["served_model_name"] == "other-model"
