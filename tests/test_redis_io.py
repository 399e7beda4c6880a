"""worker.redis_io.exchange against a real redis-server: replies in order, errors in
place, and a connection given up mid-exchange is never reused out of step."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from embedq.redis_server import RedisServer
from embedq.worker.redis_io import exchange


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
