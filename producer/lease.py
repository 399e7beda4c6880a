"""A lease on an explicit client id, so two clients never share one reply stream.

Every client reads its whole reply stream and trims what it has read. Two clients
started with the same ``client_id`` would each drop replies the other has not read yet,
and their callers would wait for answers that are gone. A random id (the default) needs
no lease; an explicit one is held with a key that expires unless its client renews it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from embedq.common import keys
from embedq.common.aio import cancel_tasks, raise_if_cancelled
from embedq.common.errors import ClientIdInUseError, QueueUnavailableError

log = logging.getLogger(__name__)

# How long a lease outlives its last renewal: also how long the id of a client that
# stopped without closing (killed, crashed) stays taken.
LEASE_MS = 10_000


class ClientLease:
    def __init__(self, redis: aioredis.Redis, client_id: str) -> None:
        self._redis = redis
        self.client_id = client_id
        self.key = keys.client_lease(client_id)
        self._token = secrets.token_hex(8)
        self._task: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Take the id, waiting up to one lease period for a lease left by a client that
        stopped without closing; raises ClientIdInUseError if it is still held."""
        deadline = time.monotonic() + LEASE_MS / 1000
        while not await self._take():
            if time.monotonic() >= deadline:
                raise ClientIdInUseError(
                    f"client id {self.client_id!r} is in use by another client on this Redis: "
                    "two clients sharing one reply stream would drop each other's replies"
                )
            await asyncio.sleep(min(0.25, LEASE_MS / 4000))
        self._task = asyncio.create_task(self._renew(), name="embedq-client-lease")

    async def _take(self) -> bool:
        try:
            return bool(await self._redis.set(self.key, self._token, nx=True, px=LEASE_MS))
        except RedisError as exc:  # down, or an ACL from before leases (no GET/SET)
            raise QueueUnavailableError(f"cannot lease client id {self.client_id!r}: {exc}") from exc

    async def _renew(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(LEASE_MS / 3000)
            try:
                # SET ... GET: renews and tells whether the lease was still ours (None:
                # it expired or Redis lost it, and this takes it back).
                held = await self._redis.set(self.key, self._token, px=LEASE_MS, get=True)
            except RedisError as exc:
                log.debug("client lease renewal failed: %s", exc)
                continue
            if held is not None and held != self._token.encode():
                log.error(
                    "client id %r was taken by another client while this one was stalled; "
                    "replies of either may be lost",
                    self.client_id,
                )

    async def release(self) -> None:
        if self._task is None:
            return
        await cancel_tasks([self._task])
        self._task = None
        try:
            if await self._redis.get(self.key) == self._token.encode():
                await self._redis.delete(self.key)
        except RedisError as exc:  # it expires on its own
            log.debug("client lease release failed: %s", exc)
