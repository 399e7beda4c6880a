"""The worker's side of a model's request stream: every Redis command it sends.

Delivery contract: at least once. A reply is written to the caller's stream and the
request acknowledged and deleted (XACK + XDEL, never trimming) in one atomic step (a
script, or a MULTI/EXEC for large replies), so Redis applies both or, when the reply
cannot be written, neither: the request is never lost, and it leaves the stream by the
time its caller can read the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

from embedq.common import keys
from embedq.common.ids import now_ms
from embedq.worker.redis_io import Command, exchange

log = logging.getLogger(__name__)

# XREADGROUP's reply as this client gets it (responses not decoded): bytes throughout, and
# no fields for a pending entry deleted meanwhile. redis-py's annotations also allow str
# and the RESP3 dict shape.
_Entry: TypeAlias = tuple[bytes, dict[bytes, bytes] | None]
_ReadReply: TypeAlias = list[tuple[bytes, list[_Entry]]]

# Renew only entries still owned by this consumer, so a lease that lapsed and was
# taken by another worker is not stolen back.
_RENEW_SCRIPT = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
"""


# A reply, then the request's acknowledgement, atomically. A failing XADD (the reply key
# is not a stream, Redis out of memory) aborts the script before the XACK: the request
# stays pending for a retry or the dead-letter stream. Acknowledging in a second round
# trip instead left an answered request in the stream until then, so a caller could
# already be sending its next one.
# KEYS: reply stream, request stream, suspects hash.
# ARGV: reply field, payload, reply TTL (ms), group, entry id, suspects field.
_REPLY_AND_ACK_SCRIPT = """
redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('XACK', KEYS[2], ARGV[4], ARGV[5])
redis.call('XDEL', KEYS[2], ARGV[5])
redis.call('HDEL', KEYS[3], ARGV[6])
return 1
"""

# Larger replies skip Lua: a payload passed to a script is copied into Lua and out again,
# which for a 49 KB reply (32 vectors of 384 floats) cost Redis 135 µs against 50 µs for
# MULTI, XADD, this script, EXEC; for a 1.7 KB reply both cost ~30 µs, and the script
# is one command for the worker to send instead of four.
SCRIPT_REPLY_MAX_BYTES = 8192

# The acknowledgement half, run in the same MULTI/EXEC right after the reply's XADD. A
# transaction does not stop at a failing command, so this checks what the XADD needed:
# if the reply key does not hold a stream, the XADD failed and the request stays pending.
# (Out of memory, EXEC refuses the whole transaction.)
# KEYS: reply stream, request stream, suspects hash.
# ARGV: reply TTL (ms), group, entry id, suspects field.
_ACK_AFTER_REPLY_SCRIPT = """
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then
  return redis.error_reply('WRONGTYPE the reply key does not hold a stream; the request stays pending')
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[4])
return 1
"""

# One more unfinished forward pass for each field (one command for a whole batch).
# A consumer that holds nothing is removed from the group (each stream in KEYS), so that
# workers started under new names (an autoscaler's) do not pile up in XINFO CONSUMERS.
# One script: nothing can be delivered to it between the check and the removal.
_FORGET_CONSUMER_SCRIPT = """
local removed = 0
for i = 1, #KEYS do
  -- pcall: a stream or group that is gone (a flushed Redis) has nothing to clean.
  local held = redis.pcall('XPENDING', KEYS[i], ARGV[1], '-', '+', 1, ARGV[2])
  if type(held) == 'table' and held.err == nil and #held == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], ARGV[2])
    removed = removed + 1
  end
end
return removed
"""

_MARK_SUSPECTS_SCRIPT = """
for i = 1, #ARGV do
  redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
end
return #ARGV
"""


@dataclass(frozen=True)
class Delivery:
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1
    # The request stream it came from: the model's interactive or bulk lane.
    stream: str = ""
    # Forward passes it was in that never finished (see JobStream.mark_suspects).
    suspicion: int = 0

    @property
    def key(self) -> tuple[str, bytes]:
        """Unique among both lanes (the two streams can hand out the same entry id)."""
        return (self.stream, self.entry_id)


@dataclass(frozen=True)
class OutgoingReply:
    delivery: Delivery
    reply_to: str
    payload: bytes


def _by_stream(deliveries: Iterable[Delivery]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for d in deliveries:
        out.setdefault(d.stream, []).append(d.entry_id)
    return out


class JobStream:
    """Both lanes of one served model, read with one consumer group."""

    def __init__(
        self,
        redis: aioredis.Redis,
        model: str,
        consumer: str,
        *,
        reply_ttl_s: int,
        dlq_max_len: int = 100_000,
    ) -> None:
        self.redis = redis
        # The dead-letter stream keeps about this many newest entries (trimmed on write).
        self.dlq_max_len = dlq_max_len
        self.model = model
        self.consumer = consumer
        self.lanes: dict[keys.Lane, str] = {lane: keys.jobs_stream(model, lane) for lane in keys.LANES}
        self.key = self.lanes["interactive"]
        self.dlq = keys.dead_letter_stream(model)
        self.suspects = keys.suspects_key(model)
        self.group = keys.WORKER_GROUP
        self._reply_ttl_ms = reply_ttl_s * 1000
        self._renew = redis.register_script(_RENEW_SCRIPT)
        self._mark_suspects = redis.register_script(_MARK_SUSPECTS_SCRIPT)
        self._forget_consumer = redis.register_script(_FORGET_CONSUMER_SCRIPT)
        self._reply_and_ack = redis.register_script(_REPLY_AND_ACK_SCRIPT)
        self._info: dict[str, str] | None = None

    async def ensure_group(self) -> None:
        """Create the group on both lanes at id 0 (so jobs queued before any worker are served)."""
        for stream in self.lanes.values():
            try:
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
                log.info("created consumer group %s on %s", self.group, stream)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def registered(self, live_window_ms: int) -> tuple[dict[str, str], int]:
        """The model description already published under this name, and how many of
        its workers have a heartbeat within ``live_window_ms``."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.model_info_key(self.model))
        pipe.zcount(keys.workers_key(self.model), now_ms() - live_window_ms, "+inf")
        raw, live = await pipe.execute()
        info = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
        return info, int(live)

    async def register(self, info: dict[str, str]) -> None:
        self._info = info
        pipe = self.redis.pipeline(transaction=False)
        # Mapping is invariant in its key type: redis-py wants its own unions.
        pipe.hset(keys.model_info_key(self.model), mapping=cast("dict[FieldT, EncodableT]", info))
        pipe.sadd(keys.MODELS_SET, self.model)
        await pipe.execute()

    async def heartbeat(
        self, worker_id: str, *, stale_after_ms: int, stats: dict[str, int] | None = None
    ) -> None:
        """Refresh this worker's heartbeat; ``stats`` are added to the model's counters."""
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.workers_key(self.model), {worker_id: now})
        pipe.zremrangebyscore(keys.workers_key(self.model), "-inf", now - stale_after_ms)
        for name, value in (stats or {}).items():
            if value:
                pipe.hincrby(keys.stats_key(self.model), name, value)
        await pipe.execute()

    async def leave(self, worker_id: str) -> None:
        """Drop this worker's heartbeat, and its consumer from the group if it holds
        nothing (one with pending entries stays, so that they can be claimed)."""
        await self.redis.zrem(keys.workers_key(self.model), worker_id)
        await self._forget_consumer(keys=list(self.lanes.values()), args=[self.group, self.consumer])

    async def _read(self, streams: dict[KeyT, StreamIdT], count: int, block_ms: int | None) -> list[Delivery]:
        try:
            resp = cast(
                "_ReadReply | None",
                await self.redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block_ms),
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "no longer exists" in str(exc):
                log.warning("consumer group missing (Redis flushed or restarted): recreating")
                await self.ensure_group()
                if self._info is not None:
                    await self.register(self._info)
                return []
            raise
        out: list[Delivery] = []
        gone: list[Delivery] = []
        for stream, entries in resp or []:
            name = stream.decode() if isinstance(stream, bytes) else str(stream)
            for entry_id, fields in entries:
                # A pending entry deleted meanwhile (an operator's XDEL or XTRIM) comes
                # back from the history with no fields: nothing to answer, but it stays
                # pending until acknowledged. (XADD never writes an entry without fields.)
                (out if fields else gone).append(Delivery(entry_id, fields or {}, stream=name))
        if gone:
            log.info("acknowledging %d held entries that were deleted from the stream", len(gone))
            await self.ack(gone)
        return out

    async def read_new(
        self, count: int, block_ms: int, lanes: Sequence[keys.Lane] = keys.LANES
    ) -> list[Delivery]:
        """New entries of the given lanes (interactive first in the result)."""
        return await self._read({self.lanes[lane]: ">" for lane in lanes}, count, block_ms)

    async def read_own_pending(self, count: int = 256) -> list[Delivery]:
        """Entries this consumer name already holds (a restarted worker with a stable name)."""
        deliveries = await self._read({s: "0" for s in self.lanes.values()}, count, None)
        return await self._with_counts(deliveries)

    async def claim_idle(self, min_idle_ms: int, count: int = 64) -> list[Delivery]:
        """Take over entries whose lease lapsed (their worker died or hung), both lanes."""
        claimed: list[Delivery] = []
        for stream in self.lanes.values():
            cursor = "0-0"
            while len(claimed) < count:
                resp = await self.redis.xautoclaim(
                    stream, self.group, self.consumer, min_idle_ms, start_id=cursor, count=count
                )
                cursor = resp[0].decode() if isinstance(resp[0], bytes) else str(resp[0])
                for entry_id, fields in resp[1]:
                    if fields is not None:
                        claimed.append(Delivery(entry_id, fields, stream=stream))
                if cursor == "0-0":
                    break
        return await self._with_counts(claimed)

    async def _with_counts(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Attach each entry's delivery counter (one XPENDING per id, pipelined)."""
        if not deliveries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for d in deliveries:
            pipe.xpending_range(d.stream, self.group, min=d.entry_id, max=d.entry_id, count=1)
        rows = await pipe.execute()
        out = []
        for d, row in zip(deliveries, rows, strict=True):
            count = int(row[0]["times_delivered"]) if row else 1
            out.append(Delivery(d.entry_id, d.fields, count, d.stream))
        return out

    async def renew(self, held: Iterable[Delivery]) -> set[tuple[str, bytes]]:
        """Reset the idle time of entries we still own; returns the keys of those we own."""
        owned_keys: set[tuple[str, bytes]] = set()
        for stream, ids in _by_stream(held).items():
            owned = await self._renew(keys=[stream], args=[self.group, self.consumer, *ids])
            owned_keys.update((stream, x if isinstance(x, bytes) else str(x).encode()) for x in owned)
        return owned_keys

    async def release(self, held: Iterable[Delivery], *, idle_ms: int) -> None:
        """Mark held entries idle for ``idle_ms`` (no delivery counted), so that other
        workers' XAUTOCLAIM takes them at once instead of after a whole lease."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in _by_stream(held).items():
            # list is invariant: redis-py wants a list of its id union.
            ids_arg = cast("list[StreamIdT]", ids)
            pipe.xclaim(stream, self.group, self.consumer, 0, ids_arg, idle=idle_ms + 1, justid=True)
        await pipe.execute()

    async def reply_and_ack(self, replies: Sequence[OutgoingReply]) -> list[tuple[OutgoingReply, Exception]]:
        """Write each reply and acknowledge and delete its request, atomically per reply
        (one round trip for all). Returns the replies Redis refused, with its error;
        their requests stay pending. Connection errors raise."""
        results = await self._reply_and_ack_once(replies)
        if any(isinstance(res, NoScriptError) for res in results):
            # A restarted (or flushed) Redis lost its script cache: load it, send those
            # again. Only the small replies' script can answer NOSCRIPT, before it wrote
            # anything (the transaction path sends its script's body).
            await self.redis.script_load(_REPLY_AND_ACK_SCRIPT)
            again = [r for r, res in zip(replies, results, strict=True) if isinstance(res, NoScriptError)]
            retried = iter(await self._reply_and_ack_once(again))
            results = [next(retried) if isinstance(res, NoScriptError) else res for res in results]
        return [(r, res) for r, res in zip(replies, results, strict=True) if isinstance(res, Exception)]

    async def _reply_and_ack_once(self, replies: Sequence[OutgoingReply]) -> list[object]:
        """One result per reply: 1, or the exception Redis answered."""
        if not replies:
            return []
        commands: list[Command] = []
        shapes: list[int] = []  # how many replies each reply's commands get from Redis
        for r in replies:
            d = r.delivery
            ack_args = (self._reply_ttl_ms, self.group, d.entry_id, self._suspect_field(d))
            ack_keys = (r.reply_to, d.stream, self.suspects)
            if len(r.payload) > SCRIPT_REPLY_MAX_BYTES:
                commands.append(("MULTI",))
                commands.append(("XADD", r.reply_to, "*", keys.REPLY_FIELD, r.payload))
                # EVAL, not EVALSHA: a NOSCRIPT here would come after the XADD had run,
                # leaving a written reply unacknowledged (Redis caches the compiled body).
                commands.append(("EVAL", _ACK_AFTER_REPLY_SCRIPT, 3, *ack_keys, *ack_args))
                commands.append(("EXEC",))
                shapes.append(4)
            else:
                commands.append(
                    ("EVALSHA", self._reply_and_ack.sha, 3, *ack_keys, keys.REPLY_FIELD, r.payload, *ack_args)
                )
                shapes.append(1)
        raw = iter(await exchange(self.redis, commands))
        results: list[object] = []
        for n in shapes:
            if n == 1:
                results.append(next(raw))
                continue
            multi, *queued, executed = (next(raw) for _ in range(n))
            # A refused MULTI (an ACL without it) leaves the commands after it to run one
            # by one: the script's own answer says whether the request was acknowledged.
            if isinstance(multi, Exception):
                results.append(queued[1])
                continue
            # A command refused when queued (out of memory) makes EXEC abort; the error
            # that explains it is the refused command's.
            refused = [q for q in queued if isinstance(q, Exception)]
            if isinstance(executed, Exception):
                results.append(refused[-1] if refused else executed)
            else:  # [XADD's result, the ack's]: the ack knows whether the XADD ran
                results.append(cast("list[object]", executed)[1])
        return results

    @staticmethod
    def _suspect_field(d: Delivery) -> str:
        return f"{keys.lane_of(d.stream)}:{d.entry_id.decode()}"

    async def mark_suspects(self, deliveries: Iterable[Delivery]) -> None:
        """Count one more forward pass for these jobs, before it starts: if the process
        dies in it, their next worker knows they were in the batch, not just held."""
        fields = {self._suspect_field(d) for d in deliveries}
        if fields:
            await self._mark_suspects(keys=[self.suspects], args=sorted(fields))

    async def suspicion(self, deliveries: Sequence[Delivery]) -> list[int]:
        """Unfinished forward passes of each job (0 for a job never in one)."""
        if not deliveries:
            return []
        values = await self.redis.hmget(self.suspects, [self._suspect_field(d) for d in deliveries])
        return [int(v) if v is not None else 0 for v in values]

    async def send_reply(self, reply_to: str, payload: bytes) -> None:
        """A reply with no request to acknowledge (the request was dead-lettered)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(reply_to, {keys.REPLY_FIELD: payload})
        pipe.pexpire(reply_to, self._reply_ttl_ms)
        await pipe.execute()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in _by_stream(deliveries).items():
            pipe.xack(stream, self.group, *ids)
            pipe.xdel(stream, *ids)
        pipe.hdel(self.suspects, *{self._suspect_field(d) for d in deliveries})
        await pipe.execute()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move an entry to the dead-letter stream with why, then remove it."""
        fields: dict[FieldT, EncodableT] = {
            b"entry_id": delivery.entry_id,
            b"lane": keys.lane_of(delivery.stream).encode(),
            b"reason": reason.encode("utf-8", "replace")[:4096],
            b"deliveries": str(delivery.deliveries).encode(),
            b"consumer": self.consumer.encode(),
            b"at_ms": str(now_ms()).encode(),
        }
        for name, value in delivery.fields.items():
            fields[b"f:" + (name if isinstance(name, bytes) else str(name).encode())] = value
        await self.redis.xadd(self.dlq, fields, maxlen=self.dlq_max_len, approximate=True)
        await self.ack([delivery])
