"""HTTP gateway cost: /embed with one short sentence vs the same request through the SDK.

For each backend (fake: the queue and gateway alone; torch: the real model), in one run:
  - p50 / p99 latency at concurrency 1, SDK vs HTTP /embed (the difference is the
    gateway's own cost: HTTP parsing, JSON, a second hop through its SDK client);
  - throughput at concurrency 64, SDK vs HTTP.

HTTP is driven by a minimal keep-alive HTTP/1.1 client (raw asyncio streams) so the
figure is the gateway's cost rather than an HTTP library's; httpx is measured beside it
for reference. Run: python bench/gateway_latency.py [--requests 2000] [--backends fake,torch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import redis

from embedq import AsyncClient
from embedq.common import keys
from embedq.redis_server import RedisServer

SENTENCE = "What is the capital city of France?"
MODEL = "bench-model"


class RawHttp:
    """One keep-alive HTTP/1.1 connection; just enough protocol for this benchmark."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(status_and_headers.split(b" ", 2)[1])
        length = 0
        for line in status_and_headers.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        payload = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def latencies(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def throughput(
    make_call: Callable[[], Callable[[], Awaitable[object]]], total: int, conc: int
) -> float:
    remaining = total

    async def caller() -> None:
        nonlocal remaining
        call = make_call()
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(conc)))
    return total / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def measure(redis_url: str, port: int, n: int, conc_total: int) -> dict[str, float]:
    body = json.dumps({"inputs": SENTENCE}).encode()
    res: dict[str, float] = {}
    async with AsyncClient(redis_url, model=MODEL, timeout=120) as sdk:
        raw = RawHttp("127.0.0.1", port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as hx:
            sdk_call = lambda: sdk.embed(SENTENCE)  # noqa: E731
            raw_call = lambda: raw.post("/embed", body)  # noqa: E731
            hx_call = lambda: hx.post("/embed", content=body, headers={"content-type": "application/json"})  # noqa: E731
            # Same answer both ways.
            a = (await sdk_call())[0]
            b = np.array(json.loads(await raw_call()), dtype=np.float32)[0]
            res["cosine_http_vs_sdk"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            for call in (sdk_call, raw_call, hx_call):  # warm-up
                await latencies(call, 50)
            # Interleave rounds so drift hits every path alike.
            lat: dict[str, list[float]] = {"sdk": [], "http": [], "httpx": []}
            for _ in range(4):
                lat["sdk"] += await latencies(sdk_call, n // 4)
                lat["http"] += await latencies(raw_call, n // 4)
                lat["httpx"] += await latencies(hx_call, n // 4)
            for name, values in lat.items():
                res[f"{name}_p50_ms"] = statistics.median(values)
                res[f"{name}_p99_ms"] = pct(values, 0.99)
            res["sdk_c64_rps"] = await throughput(lambda: sdk_call, conc_total, 64)

            def raw_factory() -> Callable[[], Awaitable[object]]:
                conn = RawHttp("127.0.0.1", port)
                return lambda: conn.post("/embed", body)

            res["http_c64_rps"] = await throughput(raw_factory, conc_total, 64)
            res["httpx_c64_rps"] = await throughput(lambda: hx_call, conc_total, 64)
        await raw.close()
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="embedq-gwbench-") as tmp, RedisServer(Path(tmp)) as server:
        cmd = [sys.executable, "-m", "embedq", "--log-level", "warning"]
        worker = subprocess.Popen(
            [*cmd, "worker", "--redis-url", server.url, "--backend", backend, "--served-model-name", MODEL]
        )
        port = free_port()
        gateway = subprocess.Popen(
            [*cmd, "gateway", "--redis-url", server.url, "--model", MODEL, "--port", str(port),
             "--hostname", "127.0.0.1"]
        )  # fmt: skip
        try:
            r = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 180
            while r.zcard(keys.workers_key(MODEL)) == 0:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError("worker did not start")
                time.sleep(0.2)
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            dtype = r.hget(keys.model_info_key(MODEL), "dtype")
            print(f"\n== backend {backend} (dtype {dtype.decode() if dtype else '?'})", flush=True)
            res = asyncio.run(measure(server.url, port, args.requests, args.throughput_requests))
            return res
        finally:
            for proc in (gateway, worker):
                proc.terminate()
                proc.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per path (concurrency 1)")
    p.add_argument(
        "--throughput-requests", type=int, default=4000, help="requests per path at concurrency 64"
    )
    p.add_argument("--backends", default="fake,torch")
    p.add_argument("--json-out")
    args = p.parse_args()
    results = {}
    for backend in args.backends.split(","):
        res = run_backend(backend, args)
        results[backend] = res
        print(f"cosine HTTP vs SDK           {res['cosine_http_vs_sdk']:.6f}")
        print(f"{'path':<28}{'p50 ms':>9}{'p99 ms':>9}{'c=64 req/s':>12}")
        for name, label in (("sdk", "SDK (AsyncClient.embed)"), ("http", "HTTP /embed (raw client)"),
                            ("httpx", "HTTP /embed (httpx)")):  # fmt: skip
            print(
                f"{label:<28}{res[f'{name}_p50_ms']:>9.2f}{res[f'{name}_p99_ms']:>9.2f}"
                f"{res[f'{name}_c64_rps']:>12.0f}"
            )
        print(
            f"gateway adds at p50 (c=1)    {res['http_p50_ms'] - res['sdk_p50_ms']:+.2f} ms (target <= 1 ms)"
        )
        print(f"HTTP / SDK throughput (c=64) {res['http_c64_rps'] / res['sdk_c64_rps']:.2f}")
    cpu = platform.processor() or platform.machine()
    print(f"\ncpu {cpu} x{os.cpu_count()}, python {platform.python_version()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
