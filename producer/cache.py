"""An optional embedding cache in Redis, so repeated chunks are never recomputed.

An entry is keyed by a digest of: the served model's identity as its workers publish
it (revision fingerprint, model id, pooling, dtype, default prompt, truncation
default), the request's parameters, and the input itself. A new model revision, or a
worker flag that changes results, therefore never serves stale vectors. Each value is
the input's token count (4 bytes, little endian) followed by its row of the vector
payload, so a cached answer carries what the gateway needs for usage and headers.

Entries expire after a TTL; hits and misses are added to the model's stats hash, which
the gateway and `embedq exporter` export as embedq_cache_{hits,misses}_total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from embedq.common import keys
from embedq.common.codec import VectorDType
from embedq.common.wire import EmbedResult, Input, Reply, ReplyMeta

log = logging.getLogger(__name__)

# Fields of the model's info hash that change what a vector is.
IDENTITY_FIELDS = (
    "revision",
    "model_id",
    "pooling",
    "dtype",
    "dim",
    "default_prompt",
    "auto_truncate",
    "max_input_length",
)
_IDENTITY_TTL_S = 5.0
_COUNT = struct.Struct("<I")
_ITEMSIZE = {"float32": 4, "float16": 2}

Fetch = Callable[[list[Input]], Awaitable[Reply]]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class EmbeddingCache:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError("the cache TTL must be at least one second")
        self.redis = redis
        self.ttl_s = ttl_s
        self.stats = CacheStats()
        self._identity: dict[str, tuple[float, str | None]] = {}
        self._warned = False

    async def identity(self, model: str) -> str | None:
        """The served model's identity string (None while no worker has described it)."""
        now = time.monotonic()
        cached = self._identity.get(model)
        if cached is not None and now - cached[0] < _IDENTITY_TTL_S:
            return cached[1]
        values = await self.redis.hmget(keys.model_info_key(model), list(IDENTITY_FIELDS))
        if values[0] is None:
            ident = None
        else:
            ident = "\x1f".join(
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v or "") for v in values
            )
        self._identity[model] = (now, ident)
        return ident

    @staticmethod
    def digest(identity: str, params: dict[str, Any], item: Input) -> str:
        h = hashlib.sha256()
        h.update(identity.encode())
        h.update(b"\x00")
        h.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\x00")
        if isinstance(item, str):
            h.update(b"s")
            h.update(item.encode("utf-8", "surrogatepass"))
        else:
            h.update(b"i")
            h.update(json.dumps(item, separators=(",", ":")).encode())
        return h.hexdigest()

    async def embed(self, model: str, inputs: list[Input], params: dict[str, Any], fetch: Fetch) -> Reply:
        """The reply of an ``embed`` job, with only the cache misses sent to ``fetch``."""
        try:
            identity = await self.identity(model)
            if identity is None:
                return await fetch(inputs)  # not served: let the request report it
            cache_keys = [keys.cache_key(model, self.digest(identity, params, x)) for x in inputs]
            # bytes: responses are not decoded (redis-py's annotation also allows str).
            found = cast("list[bytes | None]", await self.redis.mget(cache_keys))
        except RedisError as exc:  # a cache that cannot be read is skipped, not fatal
            self._warn(exc)
            return await fetch(inputs)
        missing = [i for i, v in enumerate(found) if v is None]
        encoding: VectorDType = params.get("encoding", "float32")
        itemsize = _ITEMSIZE[encoding]
        computed: Reply | None = None
        if missing:
            computed = await fetch([inputs[i] for i in missing])
            if not computed.ok or computed.embed is None:
                return computed
        rows: list[bytes] = []
        counts: list[int] = []
        width: int | None = None
        fresh = iter(range(len(missing)))
        writes: dict[str, bytes] = {}
        for i, value in enumerate(found):
            if value is None:
                assert computed is not None and computed.embed is not None
                j = next(fresh)
                width = computed.embed.shape[1]
                row = computed.embed.data[j * width * itemsize : (j + 1) * width * itemsize]
                count = computed.embed.token_counts[j]
                writes[cache_keys[i]] = _COUNT.pack(count) + row
            else:
                (count,) = _COUNT.unpack_from(value)
                row = value[_COUNT.size :]
                width = len(row) // itemsize
            rows.append(row)
            counts.append(count)
        if len({len(r) for r in rows}) > 1:  # a cached entry of another width: recompute all
            return await fetch(inputs)
        try:
            if writes:
                pipe = self.redis.pipeline(transaction=False)
                for key, value in writes.items():
                    pipe.set(key, value, ex=self.ttl_s)
                await pipe.execute()
            await self._count(model, len(inputs) - len(missing), len(missing))
        except RedisError as exc:
            self._warn(exc)
        assert width is not None
        meta = computed.meta if computed is not None else ReplyMeta(worker="cache")
        return Reply(
            id=computed.id if computed is not None else "cache",
            ok=True,
            embed=EmbedResult(
                dtype=encoding, shape=(len(inputs), width), data=b"".join(rows), token_counts=counts
            ),
            meta=meta,
        )

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("embedding cache unavailable, requests go to the workers: %s", exc)
            self._warned = True

    async def _count(self, model: str, hits: int, misses: int) -> None:
        self.stats.hits += hits
        self.stats.misses += misses
        pipe = self.redis.pipeline(transaction=False)
        if hits:
            pipe.hincrby(keys.stats_key(model), "cache_hits", hits)
        if misses:
            pipe.hincrby(keys.stats_key(model), "cache_misses", misses)
        await pipe.execute()


def cacheable(kind: str, inputs: Sequence[Input]) -> bool:
    return kind == "embed" and bool(inputs)
