"""Entry point of one worker process: logging, signals, backend, run."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from embedq.common import tracing
from embedq.common.heap import freeze_startup_heap
from embedq.worker.backends import load_backend
from embedq.worker.config import WorkerConfig
from embedq.worker.service import Worker

log = logging.getLogger(__name__)


async def serve(config: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, load_backend, config)
    await loop.run_in_executor(None, backend.warmup)
    log.debug("%d start-up objects frozen out of the garbage collector", freeze_startup_heap())
    worker = Worker(config, backend)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await worker.redis.aclose()


def set_openmp_waits() -> None:
    """How long idle OpenMP threads spin before they sleep; before torch loads, and an
    explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.

    libgomp's default spin (~300,000 rounds, a few ms) after every parallel op starves
    the Redis server, gateway and clients that share a worker's cores (measured: +1 ms
    per HTTP request, 17% less throughput). Never spinning costs a wake-up between the
    many small ops of a forward pass instead (int8 + compile: 5–8% end to end). A short
    spin, ~0.1 ms, keeps the threads awake inside a pass and asleep between batches.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def run_worker(config: WorkerConfig) -> None:
    set_openmp_waits()
    tracing.configure_from_env("embedq-worker")
    try:
        asyncio.run(serve(config))
    finally:
        tracing.shutdown()
