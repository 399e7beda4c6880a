"""`embedq status`: the served models and their queues, as a table.

Throughput comes from the model's answered-jobs counters read twice, ``interval``
seconds apart (workers add to them with every heartbeat).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from embedq.common.settings import RedisSettings, connect
from embedq.producer.gateway.directory import ModelDirectory, ModelView

COLUMNS = (
    "model",
    "type",
    "dtype",
    "device",
    "workers",
    "backlog",
    "bulk",
    "pending",
    "dead letters",
    "jobs/s",
    "inputs/s",
)


@dataclass(frozen=True)
class ModelStatus:
    view: ModelView
    jobs_per_s: float | None = None
    inputs_per_s: float | None = None


def _rate(before: ModelView | None, after: ModelView, name: str, interval: float) -> float | None:
    if before is None or interval <= 0:
        return None
    return max(0, after.stats.get(name, 0) - before.stats.get(name, 0)) / interval


def _row(s: ModelStatus) -> tuple[str, ...]:
    v, i = s.view, s.view.info
    bulk = v.lanes.get("bulk")
    return (
        v.name,
        v.model_type,
        i.get("dtype", "?"),
        i.get("device", "?"),
        str(v.live_workers),
        str(v.interactive_backlog),
        str(bulk.backlog if bulk else 0),
        str(v.pending),
        str(v.dead_letters),
        "-" if s.jobs_per_s is None else f"{s.jobs_per_s:.1f}",
        "-" if s.inputs_per_s is None else f"{s.inputs_per_s:.1f}",
    )


async def read_status(redis_url: str, interval: float = 0.0) -> list[ModelStatus]:
    redis = connect(RedisSettings.from_env(redis_url, retries=0), name="embedq-status", max_connections=2)
    try:
        directory = ModelDirectory(redis)
        await directory.refresh()
        if not directory.redis_ok:
            raise ConnectionError(f"cannot reach Redis at {redis_url}")
        before = dict(directory.models)
        if interval > 0:
            await asyncio.sleep(interval)
            await directory.refresh()
        return [
            ModelStatus(
                view,
                _rate(before.get(name), view, "jobs_answered", interval),
                _rate(before.get(name), view, "inputs_answered", interval),
            )
            for name, view in sorted(directory.models.items())
        ]
    finally:
        await redis.aclose()


def format_table(rows: list[ModelStatus]) -> str:
    table = [COLUMNS, *(_row(s) for s in rows)]
    widths = [max(len(r[c]) for r in table) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    if not rows:
        lines.append("(no model has been served on this Redis)")
    return "\n".join(lines)


def status(redis_url: str, interval: float = 1.0) -> str:
    return format_table(asyncio.run(read_status(redis_url, interval)))
