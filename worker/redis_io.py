"""Many commands on one connection in one write, for the worker's reply round.

redis-py's pipeline spends ~15 µs of Python on every reply it reads (a deadline per
read, response callbacks, observability hooks) and ~10 µs packing each command; a
worker's reply round sends up to four commands per answered job. This packs them with
hiredis, sends them in one write and reads the replies with the connection's own calls
under one deadline for them all.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ExecAbortError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from embedq.common.aio import within

Command = tuple[str | int | float | bytes, ...]

# Error prefixes of refusals that describe the server's state, which passes, not the
# command (redis-py strips the prefixes it maps to classes, so those go by class).
_PASSING_STATES = ("BUSY", "MISCONF", "NOREPLICAS", "UNBLOCKED", "MASTERDOWN")
# The same states as an EXEC refused whole names them ("... because of: OOM ...").
_PASSING_PREFIXES = (*_PASSING_STATES, "OOM", "READONLY", "LOADING", "TRYAGAIN", "CLUSTERDOWN", "NOPERM")
_PASSING_CLASSES = (
    OutOfMemoryError,  # maxmemory with noeviction: until memory is freed
    ReadOnlyError,  # demoted to a replica: until a failover completes
    BusyLoadingError,  # loading its data after a restart
    TryAgainError,
    ClusterDownError,
    NoPermissionError,  # an ACL being fixed: retrying is the only way to notice
    RedisConnectionError,
    RedisTimeoutError,
    OSError,  # the socket itself
)


def refusal_passes(exc: BaseException) -> bool:
    """Whether Redis refused for a state of its own that passes (out of memory, a
    read-only replica, loading, a failing background save...), so that sending the same
    command later can succeed. False for a refusal of the command itself (WRONGTYPE, a
    stream past its last possible id), which no retry cures. Connection errors pass."""
    if isinstance(exc, _PASSING_CLASSES):
        return True
    if isinstance(exc, ExecAbortError):  # EXEC refused for a state that arose after MULTI
        _, _, why = str(exc).partition("because of: ")
        return why.split(" ", 1)[0].lstrip("-") in _PASSING_PREFIXES
    return isinstance(exc, RedisError) and str(exc).split(" ", 1)[0] in _PASSING_STATES


async def exchange(redis: aioredis.Redis, commands: Sequence[Command]) -> list[object]:
    """The replies to ``commands``, in order, as the parser gives them (bytes are not
    decoded); an error reply is returned in its place, not raised.

    No retries: the callers retry with backoff, and a blind retry could run commands
    twice. Connection errors and the deadline (the pool's socket timeout) raise.
    """
    if not commands:
        return []
    pool = redis.connection_pool
    conn = cast("Connection", await pool.get_connection())  # type: ignore[no-untyped-call]
    try:
        return await within(_send_and_read(conn, commands), conn.socket_timeout)
    except BaseException as exc:
        # Replies left unread would be taken for the next command's.
        await conn.disconnect(nowait=True)
        if isinstance(exc, TimeoutError):
            raise RedisTimeoutError("Timeout reading from Redis") from exc
        raise
    finally:
        # Shielded: a second cancellation must not lose the pool's slot (the pool blocks
        # callers, with no timeout, once its slots are gone).
        await asyncio.shield(pool.release(conn))


async def _send_and_read(conn: Connection, commands: Sequence[Command]) -> list[object]:
    # hiredis packs in C (~1.7 µs for a reply's EVALSHA against ~10 in redis-py).
    # (hiredis's stub types its argument as a 1-tuple.)
    await conn.send_packed_command([hiredis.pack_command(c) for c in commands])  # type: ignore[arg-type]
    out: list[object] = []
    for _ in commands:
        try:
            # No deadline per read: exchange() holds one for all of them.
            out.append(await conn.read_response(timeout=math.inf))
        except ResponseError as exc:
            out.append(exc)
    return out
