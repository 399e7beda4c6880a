"""A worker's own Prometheus endpoint (--metrics-port), scraped over real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from embedq import AsyncClient, ValidationError
from embedq.common import keys
from embedq.redis_server import RedisServer

from .helpers import MODEL, free_port, start_worker


def _samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_worker_metrics_endpoint(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--metrics-port", str(port))

    async def traffic() -> None:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=20) as client:
            await asyncio.gather(*(client.embed([f"text {i}", "a b c d e f"]) for i in range(10)))
            with pytest.raises(ValidationError):
                await client.embed("")

    asyncio.run(traffic())
    with redis.Redis.from_url(redis_server.url) as r:
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"garbage"})
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    samples = _samples(url)
    while _value(samples, "embedq_worker_dead_letters_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
        samples = _samples(url)
    worker.stop()

    assert _value(samples, "embedq_worker_jobs_total", kind="embed", outcome="ok", model=MODEL) == 10
    assert _value(samples, "embedq_worker_jobs_total", outcome="validation") == 1
    assert _value(samples, "embedq_worker_dead_letters_total", reason="undecodable") == 1
    assert _value(samples, "embedq_worker_batch_size_count") >= 1
    assert _value(samples, "embedq_worker_batch_tokens_sum") >= 10 * (4 + 8)  # [CLS] words [SEP]
    assert 0 < _value(samples, "embedq_worker_padding_efficiency") <= 1
    assert _value(samples, "embedq_worker_queue_seconds_count") == 11
    assert 0 <= _value(samples, "embedq_worker_heartbeat_age_seconds") < 10
