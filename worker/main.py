"""Entry point of one worker process: logging, signals, backend, run."""

from __future__ import annotations

import asyncio
import logging
import signal

from embedq.worker.backends import load_backend
from embedq.worker.config import WorkerConfig
from embedq.worker.service import Worker

log = logging.getLogger(__name__)


async def serve(config: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, load_backend, config)
    await loop.run_in_executor(None, backend.warmup)
    worker = Worker(config, backend)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await worker.redis.aclose()


def run_worker(config: WorkerConfig) -> None:
    asyncio.run(serve(config))
