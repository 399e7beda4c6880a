"""JobStream's reply path against a real redis-server: a reply and its request's
acknowledgement land together, or neither does."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from embedq.common import keys
from embedq.redis_server import RedisServer
from embedq.worker.stream import Delivery, JobStream, OutgoingReply

MODEL = "stream-test"


async def _one_delivery(server: RedisServer) -> tuple[aioredis.Redis, JobStream, Delivery]:
    client = aioredis.Redis.from_url(server.url)
    stream = JobStream(client, MODEL, "c1", reply_ttl_s=60)
    await stream.ensure_group()
    await client.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"job"})
    (delivery,) = await stream.read_new(10, 100)
    await stream.mark_suspects([delivery])
    return client, stream, delivery


def _pending(r: redis.Redis) -> int:
    return int(r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)["pending"])


async def test_reply_and_ack_land_together_after_the_script_cache_is_flushed(
    redis_server: RedisServer,
) -> None:
    client, stream, delivery = await _one_delivery(redis_server)
    r = redis.Redis.from_url(redis_server.url)
    try:
        r.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        reply_to = keys.reply_stream("caller-1")
        failed = await stream.reply_and_ack([OutgoingReply(delivery, reply_to, b"payload")])
        assert failed == []
        assert [fields for _, fields in r.xrange(reply_to)] == [{keys.REPLY_FIELD: b"payload"}]
        assert 0 < r.pttl(reply_to) <= 60_000
        assert r.xlen(keys.jobs_stream(MODEL)) == 0 and _pending(r) == 0
        assert r.hlen(keys.suspects_key(MODEL)) == 0
    finally:
        await client.aclose()
        r.close()


async def test_a_reply_that_cannot_be_written_leaves_its_request_pending(redis_server: RedisServer) -> None:
    client, stream, delivery = await _one_delivery(redis_server)
    r = redis.Redis.from_url(redis_server.url)
    try:
        reply_to = keys.reply_stream("caller-2")
        r.set(reply_to, "not a stream")
        good_to = keys.reply_stream("caller-3")
        await client.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: b"job 2"})
        (second,) = await stream.read_new(10, 100)
        failed = await stream.reply_and_ack(
            [OutgoingReply(delivery, reply_to, b"lost?"), OutgoingReply(second, good_to, b"ok")]
        )
        assert len(failed) == 1 and failed[0][0].delivery == delivery
        assert "WRONGTYPE" in str(failed[0][1])
        # The refused one is still in the stream and pending (for a retry or the DLQ);
        # the other was answered and removed in the same round trip.
        assert r.xlen(keys.jobs_stream(MODEL)) == 1 and _pending(r) == 1
        assert r.xlen(good_to) == 1
    finally:
        await client.aclose()
        r.close()
