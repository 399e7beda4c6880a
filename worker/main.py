"""Entry point of one worker process: logging, signals, backend, run."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import platform
import signal
from concurrent.futures import ThreadPoolExecutor

from embedq.common import tracing
from embedq.common.heap import freeze_startup_heap
from embedq.worker.backends import load_backend
from embedq.worker.config import WorkerConfig
from embedq.worker.service import Worker

log = logging.getLogger(__name__)


async def serve(config: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    # The model is loaded, warmed and run on this one thread: see model_thread_pool().
    model_thread = model_thread_pool()
    backend = await loop.run_in_executor(model_thread, load_backend, config)
    await loop.run_in_executor(model_thread, backend.warmup)
    log.info("%d start-up objects frozen out of the garbage collector", freeze_startup_heap())
    worker = Worker(config, backend, model_thread=model_thread)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await worker.redis.aclose()


def model_thread_pool() -> ThreadPoolExecutor:
    """The one thread that ever runs torch in a worker.

    libgomp keeps an OpenMP thread team per thread that calls into torch. Once its
    threads outnumber the cores (the team of a loading thread, the team of the
    inference thread), it cuts its spin-wait to at most 1,000 rounds (none under our
    PASSIVE policy), and every parallel op of a forward pass then wakes sleeping
    threads: 3× the context switches and 10–12% fewer passages/s on a 2-core AMX Xeon
    (docs/benchmarks.md §1, machine H). Loading, warming and inference on one thread
    keep one team.
    """
    return ThreadPoolExecutor(1, thread_name_prefix="embedq-infer")


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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# Set by an operator who tunes or replaces the allocator: then leave it alone.
_MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def keep_freed_memory() -> bool:
    """Have glibc keep freed activation memory for the next forward pass; True if set.

    A forward pass allocates and frees tens of MB of activations. By default glibc
    serves blocks above a moving threshold (from 128 KiB) with mmap and returns freed
    heap tops to the kernel, so the next batch faults every page in again, zeroed:
    1.7–1.8 M page faults and 3.2–3.6 s of system time per 2,000 passages, in a thread
    as in the worker. Serving blocks up to 32 MiB from the heap and trimming it only
    past 1 GiB: 0.3 M faults, 1.2 s, 5–8% more passages/s (docs/benchmarks.md §1). The
    heap then stays at its peak, which a worker reaches on every large batch anyway.
    """
    if any(name in os.environ for name in _MALLOC_ENV) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def run_worker(config: WorkerConfig) -> None:
    set_openmp_waits()
    log.info("glibc keeps freed memory between batches: %s", keep_freed_memory())
    tracing.configure_from_env("embedq-worker")
    try:
        asyncio.run(serve(config))
    finally:
        tracing.shutdown()
