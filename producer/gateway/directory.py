"""What the gateway knows of the served models, re-read from Redis in the background.

Workers publish a description hash, heartbeats and running counters per model; each
lane's stream length is its backlog (workers delete what they acknowledge, so XLEN
counts jobs waiting or running) and XINFO GROUPS gives pending and lag without reading
a payload. Request handlers read this snapshot and never wait on Redis for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from embedq.common import keys
from embedq.common.aio import raise_if_cancelled
from embedq.common.ids import now_ms

log = logging.getLogger(__name__)

# Used when a worker of an older release did not publish its liveness window.
DEFAULT_LIVENESS_MS = 10_000


@dataclass(frozen=True)
class LaneView:
    # Jobs in the stream: waiting or running (workers XDEL what they acknowledge).
    backlog: int = 0
    # Jobs delivered to a worker and not yet acknowledged.
    pending: int = 0
    # Entries not yet delivered to the group (None when Redis cannot tell, after deletions).
    lag: int | None = None


@dataclass(frozen=True)
class ModelView:
    name: str
    info: dict[str, str]
    live_workers: int
    lanes: dict[keys.Lane, LaneView] = field(default_factory=dict)
    dead_letters: int = 0
    # The model's running counters (jobs/inputs/tokens answered, cache hits/misses).
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def backlog(self) -> int:
        """Jobs waiting or running, both lanes."""
        return sum(lane.backlog for lane in self.lanes.values())

    @property
    def interactive_backlog(self) -> int:
        lane = self.lanes.get("interactive")
        return lane.backlog if lane else 0

    @property
    def pending(self) -> int:
        return sum(lane.pending for lane in self.lanes.values())

    @property
    def queued_tokens_estimate(self) -> float:
        """Backlog × the mean tokens per job answered so far (payloads are never read)."""
        jobs = self.stats.get("jobs_answered", 0)
        return self.backlog * self.stats.get("tokens_answered", 0) / jobs if jobs else 0.0

    @property
    def model_id(self) -> str:
        return self.info.get("model_id", self.name)

    @property
    def model_type(self) -> str:
        return self.info.get("model_type", "embedding")

    @property
    def kinds(self) -> frozenset[str]:
        published = self.info.get("kinds")
        return frozenset(published.split(",")) if published else frozenset({"embed"})

    @property
    def labels(self) -> list[str]:
        """Label names of a classification head, by logit index."""
        try:
            labels = json.loads(self.info.get("labels", "[]"))
        except ValueError:
            return []
        return [str(x) for x in labels] if isinstance(labels, list) else []

    def int_field(self, name: str, default: int = 0) -> int:
        try:
            return int(self.info.get(name, default))
        except ValueError:
            return default


@dataclass
class ModelDirectory:
    redis: aioredis.Redis
    refresh_s: float = 0.25
    models: dict[str, ModelView] = field(default_factory=dict)
    # True after the last refresh reached Redis.
    redis_ok: bool = False
    _task: asyncio.Task[None] | None = None
    _refreshed_at: float = 0.0

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="embedq-model-directory")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def lookup(self, name: str) -> ModelView | None:
        """Like get(), but a miss re-reads Redis first (at most every 50 ms): a model whose
        first worker just registered is found before the next background refresh."""
        view = self.get(name)
        if view is None and time.monotonic() - self._refreshed_at > 0.05:
            await self.refresh()
            view = self.get(name)
        return view

    def get(self, name: str) -> ModelView | None:
        """A served model by its served name, or else by its model id."""
        view = self.models.get(name)
        if view is not None:
            return view
        for view in self.models.values():
            if view.model_id == name:
                return view
        return None

    async def _loop(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        self._refreshed_at = time.monotonic()
        try:
            self.models = await self._read()
            self.redis_ok = True
        except RedisError as exc:
            if self.redis_ok:
                log.warning("cannot refresh the served models from Redis: %s", exc)
            self.redis_ok = False

    async def live_workers(self, name: str) -> int:
        """A fresh count of the model's live workers (for /health)."""
        view = self.models.get(name)
        window = view.int_field("liveness_ms", DEFAULT_LIVENESS_MS) if view else DEFAULT_LIVENESS_MS
        return int(await self.redis.zcount(keys.workers_key(name), now_ms() - window, "+inf"))

    async def _read(self) -> dict[str, ModelView]:
        names = sorted(
            n.decode() if isinstance(n, bytes) else str(n) for n in await self.redis.smembers(keys.MODELS_SET)
        )
        names = [n for n in names if _valid(n)]
        if not names:
            return {}
        per_model = 3 + 2 * len(keys.LANES)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.model_info_key(name))
            pipe.hgetall(keys.stats_key(name))
            pipe.xlen(keys.dead_letter_stream(name))
            for lane in keys.LANES:
                pipe.xlen(keys.jobs_stream(name, lane))
                pipe.xinfo_groups(keys.jobs_stream(name, lane))
        # A stream or group that is gone (a flush) reads as empty, not as an outage.
        first = await pipe.execute(raise_on_error=False)
        infos = [_decode_map(_ok(first[per_model * i], {})) for i in range(len(names))]
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for name, info in zip(names, infos, strict=True):
            window = _int(info.get("liveness_ms"), DEFAULT_LIVENESS_MS)
            pipe.zcount(keys.workers_key(name), now - window, "+inf")
        counts = await pipe.execute()
        views = {}
        for i, (name, info, count) in enumerate(zip(names, infos, counts, strict=True)):
            row = first[per_model * i : per_model * (i + 1)]
            lanes = {
                lane: _lane(_ok(row[3 + 2 * j], 0), _ok(row[4 + 2 * j], []))
                for j, lane in enumerate(keys.LANES)
            }
            stats = {k: _int(v, 0) for k, v in _decode_map(_ok(row[1], {})).items()}
            views[name] = ModelView(
                name=name,
                info=info,
                live_workers=int(count),
                lanes=lanes,
                dead_letters=int(_ok(row[2], 0)),
                stats=stats,
            )
        return views


def _lane(length: int, groups: list[dict[Any, Any]]) -> LaneView:
    """A lane's figures from XLEN and XINFO GROUPS (the workers' group only)."""
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == keys.WORKER_GROUP:
            lag = g.get("lag")
            return LaneView(int(length), int(g.get("pending") or 0), None if lag is None else int(lag))
    return LaneView(int(length))


def _ok(value: Any, default: Any) -> Any:
    return default if isinstance(value, Exception) else value


def _valid(name: str) -> bool:
    try:
        keys.check_model_name(name)
    except ValueError:
        return False
    return True


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _decode_map(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
