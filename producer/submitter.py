"""Coalesces concurrent job submissions into pipelined XADDs on one connection.

A thousand concurrent ``embed`` calls become a few round trips, not a thousand, and
use one connection. XADD carries NOMKSTREAM: a stream no worker ever created is
reported instead of silently created.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from embedq.common import keys
from embedq.common.aio import cancel_tasks, raise_if_cancelled
from embedq.common.errors import QueueUnavailableError

log = logging.getLogger(__name__)

MAX_PIPELINE = 512


@dataclass(slots=True)
class _Submission:
    stream: str
    payload: bytes
    done: asyncio.Future[bool]


class Submitter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queue: asyncio.Queue[_Submission] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedq-submitter")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await cancel_tasks([self._task])
            self._task = None
        while not self._queue.empty():
            sub = self._queue.get_nowait()
            if not sub.done.done():
                sub.done.set_exception(QueueUnavailableError("the client was closed"))

    def submit(self, stream: str, payload: bytes) -> asyncio.Future[bool]:
        """A future: True once the entry is in the stream, False if the stream does not
        exist. (A plain function: a coroutine around the future would cost one more
        object and frame per request.)"""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Submission(stream, payload, fut))
        return fut

    async def _run(self) -> None:
        while not self._closing:
            raise_if_cancelled()
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_PIPELINE:
                batch.append(self._queue.get_nowait())
            batch = [s for s in batch if not s.done.done()]
            if not batch:
                continue
            pipe = self._redis.pipeline(transaction=False)
            for s in batch:
                pipe.xadd(s.stream, {keys.JOB_FIELD: s.payload}, nomkstream=True)
            try:
                results = await pipe.execute(raise_on_error=False)
            except asyncio.CancelledError:
                # Closed mid-flight: whether these entries landed is unknown; say so.
                for s in batch:
                    if not s.done.done():
                        s.done.set_exception(QueueUnavailableError("the client was closed while enqueuing"))
                raise
            except Exception as exc:  # connection lost: every caller learns it
                for s in batch:
                    if not s.done.done():
                        s.done.set_exception(exc)
                continue
            for s, res in zip(batch, results, strict=True):
                if s.done.done():
                    continue
                if isinstance(res, Exception):
                    s.done.set_exception(res)
                else:
                    s.done.set_result(res is not None)
