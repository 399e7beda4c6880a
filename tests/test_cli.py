"""The `embedq` command as a user runs it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from embedq import Client
from embedq.common import keys
from embedq.common.ids import now_ms
from embedq.common.wire import Job, Reply, pack_job, unpack_reply
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
    def run(interval: float = 0.2) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embedq", "status", "--redis-url", redis_server.url,
             "--interval", str(interval)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    empty = run()
    assert empty.returncode == 0 and "no model has been served" in empty.stdout
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    with redis.Redis.from_url(redis_server.url) as r:
        r.xadd(keys.dead_letter_stream(MODEL), {"reason": "test"})
    out = run().stdout.splitlines()
    assert out[0].split()[:3] == ["model", "type", "dtype"]
    # workers, backlog, bulk backlog, pending, dead letters, jobs/s, inputs/s
    assert out[1].split() == [MODEL, "embedding", "float32", "cpu", "1", "0", "0", "0", "1", "0.0", "0.0"]

    # Throughput: workers add their answered counts to the model's stats with each
    # heartbeat (every 2 s), and status reads them twice, --interval apart.
    stop = threading.Event()

    def load() -> None:
        with Client(redis_server.url, model=MODEL) as client:
            while not stop.is_set():
                client.embed(["a", "b", "c"])

    loader = threading.Thread(target=load)
    loader.start()
    try:
        busy = run(interval=4.5).stdout.splitlines()[1].split()
    finally:
        stop.set()
        loader.join()
    jobs_per_s, inputs_per_s = float(busy[-2]), float(busy[-1])
    assert jobs_per_s > 0 and inputs_per_s == pytest.approx(3 * jobs_per_s, abs=0.2)
    worker.stop()
    assert run().stdout.splitlines()[1].split()[4] == "0"  # no live worker after a clean stop
    dead = subprocess.run(
        [sys.executable, "-m", "embedq", "status", "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dead.returncode == 1 and "cannot reach Redis" in dead.stderr


def test_dlq_list_show_replay_purge(redis_server: RedisServer, tmp_path: Path) -> None:
    stream = keys.jobs_stream(MODEL)
    r = redis.Redis.from_url(redis_server.url)
    r.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    job = Job(id="dlq-job-1", kind="embed", model=MODEL, inputs=["replay me"],
              reply_to="embedq:reply:dlq-test", created_ms=now_ms())  # fmt: skip
    entry_id = r.xadd(stream, {keys.JOB_FIELD: pack_job(job)})
    # Taken by a worker that died computing it (it had marked the job before its forward pass).
    r.xreadgroup(keys.WORKER_GROUP, "ghost", {stream: ">"}, count=1)
    r.hincrby(keys.suspects_key(MODEL), f"interactive:{entry_id.decode()}", 1)
    r.xadd(stream, {keys.JOB_FIELD: b"\xc1 not msgpack"})
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--max-deliveries", "1",
                          "--lease-ms", "1000")  # fmt: skip

    def dlq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embedq", "dlq", *args, "--model", MODEL, "--redis-url", redis_server.url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    deadline = time.monotonic() + 30
    while r.xlen(keys.dead_letter_stream(MODEL)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    listing = dlq("list")
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()[1:]
    assert len(rows) == 2
    reasons = "\n".join(rows)
    assert (
        "gave up after 1 deliveries" in reasons and "undecodable" in reasons.lower() or "msgpack" in reasons
    )
    job_row = next(row for row in rows if "gave up" in row)
    dlq_id = job_row.split()[0]
    shown = dlq("show", dlq_id)
    assert shown.returncode == 0 and '"id": "dlq-job-1"' in shown.stdout and "replay me" in shown.stdout

    # The caller already got a typed error; a replay computes the job and answers again.
    assert dlq("replay").returncode == 2  # nothing named
    replayed = dlq("replay", dlq_id)
    assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
    deadline = time.monotonic() + 30
    answers: list[Reply] = []
    while time.monotonic() < deadline and not any(a.ok for a in answers):
        answers = [unpack_reply(f[keys.REPLY_FIELD]) for _, f in r.xrange("embedq:reply:dlq-test")]
        time.sleep(0.1)
    assert [a.ok for a in answers] == [False, True] and all(a.id == "dlq-job-1" for a in answers)
    assert answers[0].error is not None and "deliveries" in answers[0].error.message

    assert dlq("replay", "0-1").returncode == 2  # unknown id
    purged = dlq("purge", "--all")
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert "empty" in dlq("list").stdout
    worker.stop()
    r.close()


def test_json_output_logs_one_line_per_batch(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake", "--json-output", "--log-batches")
    with Client(redis_server.url, model=MODEL, timeout=20) as c:
        c.embed(["one two three", "four"])
    worker.stop()
    records = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    batches = [r for r in records if r["logger"] == "embedq.worker.batches"]
    assert len(batches) == 1
    assert batches[0]["batch_size"] == 2 and batches[0]["tokens"] == 5 + 3
    assert batches[0]["padded_tokens"] == 10 and batches[0]["jobs"] == 1
    non_json = [line for line in worker.log().splitlines() if line.strip() and not line.startswith("{")]
    assert not [line for line in non_json if "embedq" in line], non_json[:3]
