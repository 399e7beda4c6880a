"""The two lanes of a model: interactive requests overtake a bulk backfill; bulk entries
keep their lane through dead-lettering and replay; queue state per lane."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis

from embedq import AsyncClient
from embedq.common import keys
from embedq.dlq import read, replay
from embedq.producer.gateway.directory import ModelDirectory
from embedq.redis_server import RedisServer

from .helpers import MODEL, start_worker

WORDS = " ".join(f"w{i}" for i in range(20))  # 22 tokens with the specials


async def test_interactive_request_overtakes_a_bulk_backfill(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # 0.5 ms per token: a 16-sequence batch takes ~180 ms; the backfill below is ~40 batches.
    worker = start_worker(
        redis_server.url, tmp_path, "--backend", "fake", "--fake-delay-us-per-token", "500",
        "--max-batch-requests", "16",
    )  # fmt: skip
    async with AsyncClient(redis_server.url, model=MODEL, timeout=120) as client:
        await client.embed("warm up")
        done_bulk = 0

        async def backfill() -> None:
            nonlocal done_bulk
            texts = [f"{WORDS} {i}" for i in range(640)]
            async for chunk in client.embed_many(texts, chunk_size=16, max_in_flight=40):
                done_bulk += len(chunk)

        bulk = asyncio.create_task(backfill())
        # Wait until the backlog is queued and the worker is busy with it.
        r = redis.Redis.from_url(redis_server.url)
        while r.xlen(keys.jobs_stream(MODEL, "bulk")) < 30:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        latencies = []
        for i in range(5):
            t0 = time.perf_counter()
            vec = await client.embed(f"query {i}")
            latencies.append(time.perf_counter() - t0)
            assert vec.shape == (1, 384)
        bulk_done_when_queries_finished = done_bulk
        await bulk
    worker.stop()
    # Each query waits for at most the batch in hand plus its own: far from the ~7 s of
    # backlog a FIFO queue would put in front of it.
    assert max(latencies) < 1.5, latencies
    assert bulk_done_when_queries_finished < 640 * 0.6
    assert done_bulk == 640


async def test_queue_state_is_reported_per_lane(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    worker.stop()  # registered, group created; nobody serves now
    r = redis.Redis.from_url(redis_server.url)
    async with AsyncClient(redis_server.url, model=MODEL, timeout=0) as client:
        tasks = [asyncio.create_task(client.embed("x", lane="bulk")) for _ in range(3)]
        tasks.append(asyncio.create_task(client.embed("y")))
        while r.xlen(keys.jobs_stream(MODEL, "bulk")) < 3 or r.xlen(keys.jobs_stream(MODEL)) < 1:
            await asyncio.sleep(0.01)
        directory = ModelDirectory(redis.asyncio.Redis.from_url(redis_server.url))
        await directory.refresh()
        view = directory.models[MODEL]
        assert view.lanes["bulk"].backlog == 3 and view.lanes["bulk"].lag == 3
        assert view.lanes["interactive"].backlog == 1 and view.interactive_backlog == 1
        assert view.backlog == 4 and view.pending == 0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await directory.redis.aclose()


async def test_bulk_dead_letters_are_replayed_to_the_bulk_lane(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--max-deliveries", "1")
    r = redis.Redis.from_url(redis_server.url)
    async with AsyncClient(redis_server.url, model=MODEL, timeout=30) as client:
        # Malformed entries on each lane go to the DLQ with their lane.
        r.xadd(keys.jobs_stream(MODEL, "bulk"), {keys.JOB_FIELD: b"\xc1 not msgpack"})
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"\xc1 not msgpack either"})
        deadline = time.monotonic() + 20
        while r.xlen(keys.dead_letter_stream(MODEL)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await client.embed("still serving")).shape == (1, 384)
    letters = read(r, MODEL)
    assert sorted(d.lane for d in letters) == ["bulk", "interactive"]
    worker.stop()
    assert replay(r, MODEL, [], everything=True) == 2
    assert r.xlen(keys.jobs_stream(MODEL, "bulk")) == 1
    assert r.xlen(keys.jobs_stream(MODEL)) == 1
    assert r.xlen(keys.dead_letter_stream(MODEL)) == 0


async def test_dead_letter_stream_is_trimmed(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--dlq-max-len", "10")
    r = redis.Redis.from_url(redis_server.url)
    for i in range(300):
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"\xc1 garbage %d" % i})
    deadline = time.monotonic() + 30
    while r.xlen(keys.jobs_stream(MODEL)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    assert r.xlen(keys.jobs_stream(MODEL)) == 0
    # Approximate trimming keeps whole macro nodes (100 entries by default), never 300.
    assert 10 <= r.xlen(keys.dead_letter_stream(MODEL)) <= 110


async def test_queries_are_read_while_bulk_reads_overshoot_the_read_ahead(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # One read takes up to 64 bulk jobs of 64 inputs: ~90k tokens against a read-ahead
    # of 4,096. The reader once stopped reading both lanes above 2x the read-ahead, and a
    # query then waited seconds until the batcher drained.
    worker = start_worker(
        redis_server.url, tmp_path, "--backend", "fake", "--fake-delay-us-per-token", "100",
        "--max-batch-tokens", "512", "--max-batch-requests", "16",
    )  # fmt: skip
    async with AsyncClient(redis_server.url, model=MODEL, timeout=120) as client:
        await client.embed("warm up")
        r = redis.Redis.from_url(redis_server.url)
        texts = [f"{WORDS} {i}" for i in range(64 * 48)]

        async def backfill() -> int:
            return sum([len(c) async for c in client.embed_many(texts, chunk_size=64, max_in_flight=48)])

        bulk = asyncio.create_task(backfill())
        while r.xlen(keys.jobs_stream(MODEL, "bulk")) < 40:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the worker has read a large share of it by now
        latencies = []
        for i in range(5):
            t0 = time.perf_counter()
            assert (await client.embed(f"query {i}")).shape == (1, 384)
            latencies.append(time.perf_counter() - t0)
        assert await bulk == len(texts)
    worker.stop()
    # A batch is at most 512 tokens (~50 ms here): a query waits for the one in hand.
    assert max(latencies) < 1.0, latencies
