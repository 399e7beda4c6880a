"""One reader per client process: XREAD on the client's reply stream, futures by id.

Durable across reconnects (it resumes from the last id it saw), needs one connection
whatever the number of requests in flight, and drops duplicate or late replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeAlias, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from embedq.common import keys
from embedq.common.aio import cancel_tasks, raise_if_cancelled
from embedq.common.errors import ProtocolError, QueueUnavailableError
from embedq.common.wire import Reply, unpack_reply

log = logging.getLogger(__name__)

BLOCK_MS = 1000
TRIM_EVERY = 256

# XREAD's reply as this client gets it (responses not decoded): bytes throughout.
# redis-py's annotations also allow str and the RESP3 dict shape.
_ReadReply: TypeAlias = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


class ReplyReader:
    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self._redis = redis
        self.stream = stream
        self._waiters: dict[str, asyncio.Future[Reply]] = {}
        self._last_id = b"0-0"
        self._task: asyncio.Task[None] | None = None
        self._since_trim = 0
        self._closing = False
        self.duplicates_dropped = 0
        # Called after the first read that works on a new connection (see connected).
        self.on_reconnect: Callable[[], None] | None = None
        self._connections = 0
        self._reconnected = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedq-replies")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await cancel_tasks([self._task])
            self._task = None
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(QueueUnavailableError("the client was closed"))
        self._waiters.clear()

    def connected(self) -> None:
        """The reader's connection was (re)made. Every connection after the first
        replaces a broken one: Redis restarted, failed over or was unreachable, and may
        have lost queued jobs. ``on_reconnect`` runs after the next read that works, once
        however many connections a Redis still loading its data took (it accepts
        connections and answers LOADING)."""
        self._connections += 1
        if self._connections > 1:
            self._reconnected = True

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        return fut

    def forget(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    async def _run(self) -> None:
        backoff = 0.1
        failing = False
        while not self._closing:
            raise_if_cancelled()
            try:
                resp = cast(
                    "_ReadReply | None",
                    await self._redis.xread({self.stream: self._last_id}, count=512, block=BLOCK_MS),
                )
                backoff = 0.1
                if failing:
                    log.info("reply stream readable again")
                failing = False
                if self._reconnected:
                    self._reconnected = False
                    if self.on_reconnect is not None:
                        self.on_reconnect()
            except RedisError as exc:
                failing = True
                log.warning("reply stream read failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    self._deliver(fields.get(keys.REPLY_FIELD))
                    self._since_trim += 1
            if self._since_trim >= TRIM_EVERY or (not resp and self._since_trim):
                try:
                    # Everything before the last id was handled: drop it.
                    await self._redis.xtrim(self.stream, minid=self._last_id, approximate=False)
                    self._since_trim = 0
                except RedisError as exc:
                    log.debug("reply stream trim failed: %s", exc)

    def _deliver(self, raw: bytes | None) -> None:
        if raw is None:
            return
        try:
            reply = unpack_reply(raw)
        except ProtocolError as exc:
            log.warning("dropping an undecodable reply: %s", exc)
            return
        fut = self._waiters.pop(reply.id, None)
        if fut is None:
            self.duplicates_dropped += 1  # a duplicate, or the caller gave up
        elif not fut.done():
            fut.set_result(reply)
