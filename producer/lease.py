"""A lease on a client id, so two clients never share one reply stream.

Every client reads its whole reply stream and trims what it has read. Two clients
started with the same ``client_id`` would each drop replies the other has not read yet,
and their callers would wait for answers that are gone. The id is held with a key that
expires unless its client renews it.

The key also tells of data Redis lost while the connections stayed up (a FLUSHALL, an
eviction): a renewal that finds it gone calls ``on_lost``, and the client sends its jobs
in flight again. A random id cannot be shared, but is leased for that reason too, in the
background: its start makes no round trip, and cannot wait or fail.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

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
        # Called when a renewal finds the key gone: Redis lost it (and maybe queued jobs).
        self.on_lost: Callable[[], None] | None = None
        # False until the key was written: a key never written cannot be lost.
        self._held = False
        self._refused = False  # the ACL refused a renewal (warned once)

    async def acquire(self, *, exclusive: bool = True) -> None:
        """Take the id. Exclusive (an id the caller chose): wait up to one lease period
        for a lease left by a client that stopped without closing, then raise
        ClientIdInUseError; raise QueueUnavailableError if Redis cannot be reached.
        Otherwise (a random id, which no other client has): taken in the background,
        by the first renewal that reaches Redis."""
        if not exclusive:
            self._task = asyncio.create_task(self._renew(), name="embedq-client-lease")
            return
        deadline = time.monotonic() + LEASE_MS / 1000
        while not await self._take():
            if time.monotonic() >= deadline:
                raise ClientIdInUseError(
                    f"client id {self.client_id!r} is in use by another client on this Redis: "
                    "two clients sharing one reply stream would drop each other's replies"
                )
            await asyncio.sleep(min(0.25, LEASE_MS / 4000))
        self._held = True
        self._task = asyncio.create_task(self._renew(), name="embedq-client-lease")

    async def _take(self) -> bool:
        try:
            return bool(await self._redis.set(self.key, self._token, nx=True, px=LEASE_MS))
        except RedisError as exc:  # down, or an ACL from before leases (no GET/SET)
            raise QueueUnavailableError(f"cannot lease client id {self.client_id!r}: {exc}") from exc

    async def _renew(self) -> None:
        delay = LEASE_MS / 3000 if self._held else 0.0  # not taken yet: at once
        while True:
            raise_if_cancelled()
            await asyncio.sleep(delay)
            delay = LEASE_MS / 3000
            try:
                # SET ... GET: renews and tells whether the lease was still ours (None:
                # it expired or Redis lost it, and this takes it back).
                held = await self._redis.set(self.key, self._token, px=LEASE_MS, get=True)
            except NoPermissionError as exc:  # an ACL from before every client leased
                if not self._refused:
                    self._refused = True
                    log.warning(
                        "cannot write the lease key %s (%s): this client will not learn of "
                        "jobs Redis loses to a flush; grant +get +set on its reply prefix",
                        self.key,
                        exc,
                    )
                continue
            except RedisError as exc:
                log.debug("client lease renewal failed: %s", exc)
                continue
            if not self._held:
                self._held = True  # the first write of a non-exclusive lease
            elif held is None:
                log.warning(
                    "the lease key of client id %r is gone: Redis lost data (a flush, an eviction, "
                    "or a stall of this client past the lease); sending jobs in flight again",
                    self.client_id,
                )
                if self.on_lost is not None:
                    self.on_lost()
            elif held != self._token.encode():
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
