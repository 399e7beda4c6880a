"""`embedq up`: Redis (embedded when no URL is given) plus one worker, as child processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from embedq.common import keys
from embedq.common.settings import DEFAULT_MODEL_NAME
from embedq.redis_server import RedisServer

log = logging.getLogger(__name__)


class StackError(Exception):
    pass


@dataclass(kw_only=True)
class Stack:
    """Redis + one worker. Use as a context manager; leaving it stops both."""

    redis_url: str | None = None
    data_dir: Path = Path(".embedq")
    served_model_name: str | None = None
    worker_args: list[str] = field(default_factory=list)
    start_timeout: float = 180.0
    _redis: RedisServer | None = None
    _worker: subprocess.Popen[bytes] | None = None

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
        return self

    def _wait_for_worker(self, started_ms: int) -> None:
        assert self.redis_url is not None and self._worker is not None
        client = redis.Redis.from_url(self.redis_url)
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
        assert self._worker is not None
        return self._worker.wait()

    def stop(self) -> None:
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
