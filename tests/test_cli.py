"""The `embedq` command as a user runs it."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from embedq import Client

from .helpers import MODEL

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


def test_up_starts_redis_and_worker_and_ctrl_c_stops_both(tmp_path: Path) -> None:
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
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = None
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline and url is None:
        line = proc.stdout.readline()
        m = re.search(r"embedq is up: model .* on (redis://\S+)", line)
        url = m.group(1) if m else None
    assert url, "embedq up did not report its Redis URL"
    with Client(url, model=MODEL, timeout=20) as c:
        assert c.embed(["hello", "world"]).shape == (2, 384)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "embedded Redis still running"
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
