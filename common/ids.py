"""Identifiers made on the client side."""

from __future__ import annotations

import os
import secrets
import socket
import time


def new_request_id() -> str:
    """A unique, time-ordered request id (48-bit ms timestamp + 80 random bits, hex)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def new_client_id(role: str = "sdk", *, user: str | None = None) -> str:
    """A reply-stream id for one client process.

    With a Redis ACL user the id starts with ``<user>.``: the ACL file grants each user
    the reply streams under its own name only, so one client cannot read another's.
    """
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    prefix = f"{user}." if user and user != "default" else ""
    return f"{prefix}{role}-{host or 'host'}-{os.getpid()}-{secrets.token_hex(4)}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000
