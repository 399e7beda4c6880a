"""`embedq status`: the served models and their queues, as a table."""

from __future__ import annotations

import asyncio

from embedq.common.settings import RedisSettings, connect
from embedq.producer.gateway.directory import ModelDirectory, ModelView

COLUMNS = ("model", "type", "dtype", "device", "workers", "backlog", "pending", "dead letters")


def _row(view: ModelView) -> tuple[str, ...]:
    i = view.info
    return (
        view.name,
        view.model_type,
        i.get("dtype", "?"),
        i.get("device", "?"),
        str(view.live_workers),
        str(view.backlog),
        str(view.pending),
        str(view.dead_letters),
    )


async def read_status(redis_url: str) -> list[ModelView]:
    redis = connect(RedisSettings(url=redis_url, retries=0), name="embedq-status", max_connections=2)
    try:
        directory = ModelDirectory(redis)
        await directory.refresh()
        if not directory.redis_ok:
            raise ConnectionError(f"cannot reach Redis at {redis_url}")
        return [directory.models[n] for n in sorted(directory.models)]
    finally:
        await redis.aclose()


def format_table(views: list[ModelView]) -> str:
    rows = [COLUMNS, *(_row(v) for v in views)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not views:
        lines.append("(no model has been served on this Redis)")
    return "\n".join(lines)


def status(redis_url: str) -> str:
    return format_table(asyncio.run(read_status(redis_url)))
