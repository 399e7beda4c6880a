"""worker.redis_io.exchange against a real redis-server: replies in order, errors in
place, and a connection given up mid-exchange is never reused out of step."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from embedq.redis_server import RedisServer
from embedq.worker.redis_io import exchange, refusal_passes


async def test_replies_in_order_with_errors_in_place(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        out = await exchange(client, [("SET", "k", "1"), ("INCR", "k"), ("LPUSH", "k", "x"), ("GET", "k")])
        assert out[:2] == [b"OK", 2] and out[3] == b"2"
        assert isinstance(out[2], ResponseError) and "WRONGTYPE" in str(out[2])
        assert await exchange(client, []) == []
    finally:
        await client.aclose()


async def _stale_reply_check(client: aioredis.Redis) -> None:
    """The BLPOP given up on answers nil after 1 s; a reused socket would hand it over."""
    await asyncio.sleep(1.2)
    assert await exchange(client, [("PING",), ("ECHO", "mine")]) == [b"PONG", b"mine"]


async def test_a_deadline_drops_the_connection(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.2, max_connections=1)
    try:
        with pytest.raises(RedisTimeoutError):
            await exchange(client, [("BLPOP", "nothing", 1)])
        await _stale_reply_check(client)
    finally:
        await client.aclose()


async def test_a_cancelled_exchange_drops_the_connection(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, max_connections=1)
    try:
        task = asyncio.create_task(exchange(client, [("BLPOP", "nothing", 1)]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _stale_reply_check(client)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("reply", "passes"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("READONLY You can't write against a read only replica.", True),
        ("LOADING Redis is loading the dataset in memory", True),
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist", True),
        ("BUSY Redis is busy running a script.", True),
        ("UNBLOCKED force unblock from blocking operation, instance state changed", True),
        ("NOPERM User worker has no permissions to run the 'hincrby' command", True),
        ("EXECABORT Transaction discarded because of: OOM command not allowed when used memory", True),
        ("EXECABORT Transaction discarded because of previous errors.", False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
        ("ERR The stream has exhausted the last possible ID, unable to add more items", False),
        ("NOGROUP No such key 'k' or consumer group 'g'", False),
    ],
)
def test_which_refusals_pass(reply: str, passes: bool) -> None:
    """Errors as redis-py's parser builds them from Redis's replies (it strips the
    prefixes it maps to classes): out of memory, a replica, loading... pass; a refusal
    of the command itself does not."""
    assert refusal_passes(BaseParser.parse_error(reply)) is passes
