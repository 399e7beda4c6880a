"""The Redis embedding cache: repeated inputs never reach a worker, keys follow the
model's revision and the request's parameters, and hits are counted for /metrics."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from embedq import AsyncClient
from embedq.common import keys
from embedq.common.errors import RequestTimeoutError
from embedq.redis_server import RedisServer

from .helpers import MODEL, free_port, start_gateway, start_worker, wait_healthy


def _answered(url: str) -> int:
    """Inputs the workers have answered (their counters land with each heartbeat)."""
    raw = redis.Redis.from_url(url).hget(keys.stats_key(MODEL), "inputs_answered")
    return int(raw or 0)


async def test_repeated_inputs_are_served_from_the_cache(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--heartbeat-s", "0.2")
    r = redis.Redis.from_url(redis_server.url)
    async with (
        AsyncClient(redis_server.url, model=MODEL, cache_ttl_s=60) as cached,
        AsyncClient(redis_server.url, model=MODEL) as plain,
    ):
        texts = ["alpha beta", "gamma", "delta epsilon zeta"]
        reference = await plain.embed(texts)
        first = await cached.embed(texts)
        np.testing.assert_array_equal(first, reference)
        assert cached.cache is not None and cached.cache.stats.misses == 3
        time.sleep(0.6)
        before = _answered(redis_server.url)

        # All three cached, plus one new input in the middle: only that one is computed.
        again = await cached.embed(["alpha beta", "new one", "gamma", "delta epsilon zeta"])
        np.testing.assert_array_equal(again[[0, 2, 3]], reference)
        np.testing.assert_array_equal(again[1], (await plain.embed("new one"))[0])
        time.sleep(0.6)
        assert _answered(redis_server.url) - before == 2  # "new one", by each client once
        reply = await cached.request("embed", ["gamma"], {})
        assert reply.meta is not None and reply.meta.worker == "cache"
        assert reply.embed is not None and reply.embed.token_counts == [3]

        # Other parameters, other entries.
        unnormalized = await cached.embed(texts, normalize=False)
        np.testing.assert_allclose(unnormalized, await plain.embed(texts, normalize=False))
        assert not np.allclose(unnormalized, reference)
        short = await cached.embed(texts, dimensions=8)
        assert short.shape == (3, 8)

        stats = {k.decode(): int(v) for k, v in r.hgetall(keys.stats_key(MODEL)).items()}
        assert stats["cache_hits"] == cached.cache.stats.hits == 4
        assert stats["cache_misses"] == cached.cache.stats.misses == 10
        assert all(r.ttl(k) > 0 for k in r.scan_iter(match="embedq:cache:*"))

        # A new model revision under the same name: nothing cached applies any more.
        r.hset(keys.model_info_key(MODEL), "revision", "something-else")
        cached.cache._identity.clear()
        misses = cached.cache.stats.misses
        await cached.embed(texts)
        assert cached.cache.stats.misses == misses + 3
    worker.stop()


async def test_errors_are_not_cached(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    async with AsyncClient(redis_server.url, model=MODEL, cache_ttl_s=60) as client:
        for _ in range(2):
            try:
                await client.embed(["fine", "x"], dimensions=100_000)
            except Exception as exc:  # noqa: BLE001 - the typed error is the point
                assert "dimensions" in str(exc)
            else:
                raise AssertionError("an out-of-range dimensions must fail")
        assert not list(redis.Redis.from_url(redis_server.url).scan_iter(match="embedq:cache:*"))
    worker.stop()


async def test_the_deadline_covers_the_cache_lookup(redis_server: RedisServer, tmp_path: Path) -> None:
    """A stalled Redis (CLIENT PAUSE) holds the cache's reads too: the caller's timeout
    still ends the call, with the typed error."""
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=1.0, cache_ttl_s=60) as client:
            await client.embed("warm")
            redis.Redis.from_url(redis_server.url).execute_command("CLIENT", "PAUSE", "4000", "ALL")
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                await client.embed("not cached yet")
            assert time.monotonic() - start < 2.0
    finally:
        redis.Redis.from_url(redis_server.url).execute_command("CLIENT", "UNPAUSE")
        worker.stop()


def test_gateway_cache_and_exporter_metrics(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--heartbeat-s", "0.2")
    exporter_port = free_port()
    gateway = start_gateway(redis_server.url, tmp_path, "--embedding-cache-ttl", "60")
    exporter = subprocess.Popen(
        [sys.executable, "-m", "embedq", "exporter", "--redis-url", redis_server.url,
         "--port", str(exporter_port), "--refresh-s", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_healthy(gateway)
        base = gateway.url
        first = httpx.post(f"{base}/embed", json={"inputs": ["one two", "three"]})
        second = httpx.post(f"{base}/embed", json={"inputs": ["one two", "three"]})
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        time.sleep(1.0)  # heartbeats carry the workers' counters; the exporter re-reads
        gateway_metrics = httpx.get(f"{base}/metrics").text
        exported = httpx.get(f"http://127.0.0.1:{exporter_port}/metrics").text
        for text in (gateway_metrics, exported):
            assert f'embedq_cache_hits_total{{model="{MODEL}"}} 2.0' in text
            assert f'embedq_cache_misses_total{{model="{MODEL}"}} 2.0' in text
            assert f'embedq_inputs_answered_total{{model="{MODEL}"}} 2.0' in text
            assert f'embedq_queue_backlog{{lane="bulk",model="{MODEL}"}} 0.0' in text
            assert f'embedq_live_workers{{model="{MODEL}"}} 1.0' in text
            assert "embedq_redis_up 1.0" in text
        assert "te_request_count" in gateway_metrics and "te_request_count" not in exported
    finally:
        gateway.stop()
        exporter.terminate()
        exporter.wait(timeout=30)
        worker.stop()
    assert exporter.returncode == 0
