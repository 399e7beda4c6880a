"""The `embedq` command as a user runs it."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from embedq import Client
from embedq.common import keys
from embedq.redis_server import RedisServer

from .helpers import MODEL, free_port, start_worker

ROOT = Path(__file__).resolve().parents[1]


def test_worker_refuses_a_missing_model_folder(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "embedq", "worker", "--model-id", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "is not a local folder" in res.stderr


def test_worker_refuses_a_bad_served_name() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "embedq", "worker", "--backend", "fake", "--served-model-name", "bad{name}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "invalid model name" in res.stderr


def test_up_starts_redis_worker_and_gateway_and_ctrl_c_stops_them(tmp_path: Path) -> None:
    http_port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedq",
            "up",
            "--data-dir",
            str(tmp_path),
            "--backend",
            "fake",
            "--served-model-name",
            MODEL,
            "--port",
            str(http_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As a background job in a script: SIGINT ignored unless `up` takes it back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        url = http_url = None
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            m = re.search(r"embedq is up: model .* on (redis://\S+); HTTP on (http://\S+) ", line)
            url, http_url = (m.group(1), m.group(2)) if m else (None, None)
        assert url and http_url, "embedq up did not report its Redis and HTTP URLs"
        with Client(url, model=MODEL, timeout=20) as c:
            sdk = c.embed(["hello", "world"])
            assert sdk.shape == (2, 384)
        resp = httpx.post(f"{http_url}/embed", json={"inputs": ["hello", "world"]}, timeout=20)
        np.testing.assert_allclose(np.array(resp.json(), dtype=np.float32), sdk, atol=1e-6)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for p, what in ((port, "embedded Redis"), (http_port, "gateway")):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"{what} still running"
    aof = [p.name for p in (tmp_path / "redis").iterdir() if p.name.startswith("appendonly")]
    assert aof, "the embedded Redis keeps an append-only file"


def test_rag_quickstart_example() -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "rag_quickstart.py"),
            "How can several workers read one queue?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ranked = [line for line in res.stdout.splitlines() if re.match(r"\s+\d\. ", line)]
    assert len(ranked) == 3
    assert "consumer group" in ranked[0].lower()
    scores = [float(line.split()[1]) for line in ranked]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()


def test_status_lists_models_and_queues(redis_server: RedisServer, tmp_path: Path) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embedq", "status", "--redis-url", redis_server.url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    empty = run()
    assert empty.returncode == 0 and "no model has been served" in empty.stdout
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    with redis.Redis.from_url(redis_server.url) as r:
        r.xadd(keys.dead_letter_stream(MODEL), {"reason": "test"})
    out = run().stdout.splitlines()
    assert out[0].split()[:3] == ["model", "type", "dtype"]
    assert out[1].split() == [MODEL, "embedding", "float32", "cpu", "1", "0", "0", "1"]
    worker.stop()
    assert run().stdout.splitlines()[1].split()[4] == "0"  # no live worker after a clean stop
    dead = subprocess.run(
        [sys.executable, "-m", "embedq", "status", "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dead.returncode == 1 and "cannot reach Redis" in dead.stderr
