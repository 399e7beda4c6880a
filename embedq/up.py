"""`embedq up`: Redis (embedded when no URL is given), one worker and the HTTP gateway,
as child processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from embedq.common import keys
from embedq.common.settings import DEFAULT_MODEL_NAME, RedisSettings, connect_sync
from embedq.redis_server import RedisServer

log = logging.getLogger(__name__)


class StackError(Exception):
    pass


@dataclass(kw_only=True)
class Stack:
    """Redis + one worker + the gateway. Use as a context manager; leaving it stops them."""

    redis_url: str | None = None
    data_dir: Path = Path(".embedq")
    served_model_name: str | None = None
    worker_args: list[str] = field(default_factory=list)
    # None: no gateway (`embedq up` passes --port, 8080 by default).
    gateway_port: int | None = None
    gateway_hostname: str = "127.0.0.1"
    start_timeout: float = 180.0
    _redis: RedisServer | None = None
    _worker: subprocess.Popen[bytes] | None = None
    _gateway: subprocess.Popen[bytes] | None = None

    @property
    def model(self) -> str:
        return self.served_model_name or DEFAULT_MODEL_NAME

    def start(self) -> Stack:
        if self.redis_url is None:
            self._redis = RedisServer(self.data_dir / "redis", appendonly=True).start()
            self.redis_url = self._redis.url
            log.info("embedded Redis at %s (data in %s)", self.redis_url, self._redis.data_dir)
        cmd = [sys.executable, "-m", "embedq", "worker", "--redis-url", self.redis_url, *self.worker_args]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        started_ms = int(time.time() * 1000)
        self._worker = subprocess.Popen(cmd)
        self._wait_for_worker(started_ms)
        if self.gateway_port is not None:
            self._start_gateway()
        return self

    def _start_gateway(self) -> None:
        assert self.redis_url is not None
        cmd = [
            sys.executable, "-m", "embedq", "gateway",
            "--redis-url", self.redis_url,
            "--model", self.model,
            "--port", str(self.gateway_port),
            "--hostname", self.gateway_hostname,
        ]  # fmt: skip
        self._gateway = subprocess.Popen(cmd)
        host = "127.0.0.1" if self.gateway_hostname in ("0.0.0.0", "::") else self.gateway_hostname
        url = f"http://{host}:{self.gateway_port}/health"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._gateway.poll() is not None:
                raise StackError(f"the gateway exited at start (code {self._gateway.returncode})")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise StackError(f"the gateway did not answer {url} in time")

    def _wait_for_worker(self, started_ms: int) -> None:
        assert self.redis_url is not None and self._worker is not None
        client = connect_sync(RedisSettings.from_env(self.redis_url), name="embedq-up")
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if self._worker.poll() is not None:
                    raise StackError(f"the worker exited at start (code {self._worker.returncode})")
                # A heartbeat newer than our start: an old one may survive in the AOF.
                if client.zcount(keys.workers_key(self.model), started_ms, "+inf") > 0:
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise StackError("the worker did not come up in time")

    def wait(self) -> int:
        """Until a child exits; its exit code."""
        assert self._worker is not None
        children = [p for p in (self._worker, self._gateway) if p is not None]
        while True:
            for proc in children:
                code = proc.poll()
                if code is not None:
                    return code
            time.sleep(0.5)

    def stop(self) -> None:
        if self._gateway is not None and self._gateway.poll() is None:
            self._gateway.terminate()
            try:
                self._gateway.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self._gateway.kill()
        if self._worker is not None and self._worker.poll() is None:
            self._worker.terminate()
            try:
                self._worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._worker.kill()
        if self._redis is not None:
            self._redis.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
