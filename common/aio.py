"""asyncio helpers shared by producers and workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def cancel_tasks(tasks: Iterable[asyncio.Task[object]], timeout: float = 5.0) -> None:
    """Cancel tasks and wait for them, cancelling again if one swallows the first cancel.

    A task blocked in a Redis call can turn a cancellation into a connection error and
    retry; loops also check a closing flag, and this bounds the wait either way.
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=0.25)
    for task in pending:
        log.warning("task %s did not stop within %.1fs", task.get_name(), timeout)


def raise_if_cancelled() -> None:
    """End a background loop whose task was cancelled even if the CancelledError was lost.

    On Python 3.11, ``asyncio.wait_for`` drops a cancel that lands as the future it waits
    on finishes (CPython gh-86296, fixed in 3.12), and redis-py wraps each socket write in
    one. A loop that lost its cancel that way runs on, and ``asyncio.run`` or a test's
    teardown, which cancels each leftover task once, waits for it forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """``await aw`` with a deadline (None: none); raises TimeoutError when it passes.

    ``aw`` runs in the caller's task (asyncio.wait_for would wrap it in a task of its
    own, a cost paid per call).
    """
    async with asyncio.timeout(seconds):
        return await aw
