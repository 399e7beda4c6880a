"""Queue capacity: SDK → Redis → worker with the fake backend (no model), one client.

Measures what the queue itself can carry: single-input requests per second at a given
concurrency, and embeddings per second in multi-input requests (384-d float32 on the
wire). Run: python bench/queue_capacity.py [--requests 20000] [--concurrency 256] [--max-batch-requests 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from embedq import AsyncClient
from embedq.common import keys
from embedq.redis_server import RedisServer

MODEL = "fake-capacity"


async def closed_loop(
    client: AsyncClient, total: int, concurrency: int, inputs: int
) -> tuple[float, list[float]]:
    """`concurrency` callers each sending requests back to back; returns (seconds, latencies)."""
    latencies: list[float] = []
    texts = [f"capacity probe {i}" for i in range(inputs)]
    remaining = total

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await client.embed(texts)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, args: argparse.Namespace, pids: dict[str, int]) -> None:
    async with AsyncClient(url, model=MODEL, timeout=120) as client:
        await closed_loop(client, 500, 32, 1)  # warm-up
        for inputs in args.inputs:
            total = max(args.requests // inputs * 4, 200) if inputs > 1 else args.requests
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            seconds, lat = await closed_loop(client, total, args.concurrency, inputs)
            # CPU per request of each process: steadier than req/s on a shared machine.
            cpu_us = {name: (cpu_seconds(pid) - cpu_before[name]) / total * 1e6 for name, pid in pids.items()}
            lat.sort()
            p50 = statistics.median(lat) * 1000
            p99 = lat[int(len(lat) * 0.99) - 1] * 1000
            print(
                f"{inputs:>3}-input requests: {total / seconds:9.0f} req/s  "
                f"{total * inputs / seconds:9.0f} embeddings/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms "
                f"(concurrency {args.concurrency})\n"
                f"      CPU µs per request: " + "  ".join(f"{name} {us:.0f}" for name, us in cpu_us.items()),
                flush=True,
            )


def start_worker(url: str, max_batch_requests: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedq",
            "--log-level",
            "warning",
            "worker",
            "--backend",
            "fake",
            "--served-model-name",
            MODEL,
            "--redis-url",
            url,
            "--max-batch-requests",
            str(max_batch_requests),
        ],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument(
        "--inputs",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 32],
        help="inputs per request, one measurement each (comma-separated)",
    )
    p.add_argument("--workers", type=int, default=1, help="fake worker processes sharing the stream")
    # The fake model has no cost per pass, so the batch size sets how many jobs share the
    # worker's per-pass work (a Redis round trip, a thread hand-off, a reply pipeline).
    # 256 is what every recorded run used; 512 is a GPU worker's default.
    p.add_argument("--max-batch-requests", type=int, default=256, help="the fake worker's batch size")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="embedq-cap-") as tmp, RedisServer(Path(tmp)) as server:
        workers = [start_worker(server.url, args.max_batch_requests) for _ in range(args.workers)]
        try:
            r = redis.Redis.from_url(server.url)
            while r.zcard(keys.workers_key(MODEL)) < len(workers):
                if any(w.poll() is not None for w in workers):
                    raise SystemExit("a worker exited at start")
                time.sleep(0.1)
            pids = {"client": os.getpid(), "redis": server.proc.pid}
            pids.update(
                {f"worker{i}" if len(workers) > 1 else "worker": w.pid for i, w in enumerate(workers)}
            )
            asyncio.run(measure(server.url, args, pids))
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
