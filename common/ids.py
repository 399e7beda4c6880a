"""Identifiers made on the client side."""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time


class _RequestIds:
    """40 random bits per process, then a counter: unique without a syscall per id
    (secrets.token_hex reads the OS's random source each time)."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(5)
        self.counter = itertools.count(secrets.randbelow(1 << 20))


_IDS = _RequestIds()
# A forked child must not repeat its parent's ids.
os.register_at_fork(after_in_child=_IDS.reseed)


def new_request_id() -> str:
    """A unique, time-ordered request id, 32 hex digits: a 48-bit ms timestamp, 40 random
    bits of this process, and a 40-bit counter."""
    return f"{time.time_ns() // 1_000_000:012x}{_IDS.prefix}{next(_IDS.counter) & 0xFFFFFFFFFF:010x}"


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
