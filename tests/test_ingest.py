"""`embedq embed-file`: formats in and out, ids kept, resuming after a kill, clear errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from embedq import Client
from embedq.common import keys
from embedq.ingest import IngestOptions
from embedq.redis_server import RedisServer

from .helpers import MODEL, start_worker


def _texts(n: int) -> list[str]:
    return [f"chunk {i} about {'queues' if i % 3 else 'vectors'} and {i * 7 % 11} things" for i in range(n)]


def _embed_file(url: str, *args: str | Path, model: str = MODEL) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "embedq",
        "embed-file",
        *map(str, args),
        "--redis-url",
        url,
        "--model",
        model,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _reference(url: str, texts: list[str], model: str = MODEL) -> np.ndarray:
    """What the SDK returns for the same requests as embed-file's (chunks of 64, its
    default), so a worker cuts the same batches: a real model's bf16 vectors depend on a
    text's batch by up to ~1e-3 (docs/benchmarks.md §3, machine H, session 11)."""
    size = IngestOptions.chunk_size
    with Client(url, model=model) as client:
        return np.concatenate([client.embed(texts[i : i + size]) for i in range(0, len(texts), size)])


def _read_parquet(path: Path, id_name: str = "id") -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    return [str(x) for x in table.column(id_name).to_pylist()], vectors


@pytest.fixture
def fake_worker(redis_server: RedisServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    yield worker
    worker.stop()


def test_jsonl_to_parquet_keeps_ids_and_order(redis_server: RedisServer, tmp_path: Path, fake_worker) -> None:  # type: ignore[no-untyped-def]
    texts = _texts(300)
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"doc-{i}", "text": t, "extra": i}) + "\n" for i, t in enumerate(texts))
    )
    out = tmp_path / "out" / "vectors.parquet"
    res = _embed_file(redis_server.url, src, "--out", out, "--part-rows", "64")
    assert res.returncode == 0, res.stderr
    ids, vectors = _read_parquet(out)
    assert ids == [f"doc-{i}" for i in range(300)]
    np.testing.assert_array_equal(vectors, _reference(redis_server.url, texts))
    assert "300/300 rows (100.0%)" in res.stderr and "rows/s" in res.stderr
    assert not out.with_name("vectors.parquet.parts").exists()


def test_csv_to_npy_with_custom_fields(redis_server: RedisServer, tmp_path: Path, fake_worker) -> None:  # type: ignore[no-untyped-def]
    texts = _texts(70) + ['a "quoted", comma, text\nover two lines']
    src = tmp_path / "in.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "body"])
        w.writerows([[f"k{i}", t] for i, t in enumerate(texts)])
    out = tmp_path / "vectors.npy"
    res = _embed_file(redis_server.url, src, "--out", out, "--id-field", "key", "--text-field", "body")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(out), _reference(redis_server.url, texts))
    ids = [json.loads(line) for line in out.with_name("vectors.npy.ids.jsonl").read_text().splitlines()]
    assert ids == [f"k{i}" for i in range(len(texts))]


def test_parquet_in_numbered_rows(redis_server: RedisServer, tmp_path: Path, fake_worker) -> None:  # type: ignore[no-untyped-def]
    texts = _texts(50)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"passage": texts}), src)
    out = tmp_path / "out.parquet"
    res = _embed_file(redis_server.url, src, "--out", out, "--id-field", "", "--text-field", "passage")
    assert res.returncode == 0, res.stderr
    ids, vectors = _read_parquet(out, "row")
    assert ids == [str(i) for i in range(50)]
    np.testing.assert_array_equal(vectors, _reference(redis_server.url, texts))


def test_resumes_after_a_kill_without_redoing_finished_parts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Slow fake model (2 ms/token, ~30 ms per 16-row batch) so the run can be killed midway.
    worker = start_worker(
        redis_server.url, tmp_path, "--backend", "fake", "--fake-delay-us-per-token", "2000",
        "--heartbeat-s", "0.2",
    )  # fmt: skip
    texts = _texts(400)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    cmd = [sys.executable, "-m", "embedq", "embed-file", str(src), "--out", str(out), "--redis-url",
           redis_server.url, "--model", MODEL, "--part-rows", "50", "--chunk-size", "10",
           "--max-in-flight", "2"]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.npz"))) < 3:
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    written = len(list(parts.glob("part-*.npz")))
    assert 3 <= written < 8 and not out.exists()

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{written * 50} of 400 rows already embedded" in res.stderr
    ids, vectors = _read_parquet(out)
    assert ids == [str(i) for i in range(400)]
    time.sleep(0.5)
    answered = int(redis.Redis.from_url(redis_server.url).hget(keys.stats_key(MODEL), "inputs_answered") or 0)
    reference = _reference(redis_server.url, texts)
    worker.stop()
    # Only the unfinished part and the jobs in flight at the kill were computed twice.
    assert 400 <= answered <= 400 + 50 + 2 * 10
    np.testing.assert_array_equal(vectors, reference)


def test_clear_errors(redis_server: RedisServer, tmp_path: Path, fake_worker) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "body": "no text field"}\n')
    res = _embed_file(redis_server.url, src, "--out", tmp_path / "o.parquet")
    assert res.returncode == 2 and "row 1: no text field 'text'" in res.stderr

    src.write_text('{"id": 1, "text": "fine"}\nnot json\n')
    res = _embed_file(redis_server.url, src, "--out", tmp_path / "o.parquet")
    assert res.returncode == 2 and "line 2: not JSON" in res.stderr

    res = _embed_file(redis_server.url, tmp_path / "missing.jsonl", "--out", tmp_path / "o.parquet")
    assert res.returncode == 2 and "no such input file" in res.stderr

    src.write_text("".join(json.dumps({"id": i, "text": f"t {i}"}) + "\n" for i in range(5)))
    res = _embed_file(redis_server.url, src, "--out", tmp_path / "o.parquet", model="not/served")
    assert res.returncode == 2 and "not served" in res.stderr

    # An unfinished run with other settings is refused, not mixed in.
    parts = tmp_path / "p.parquet.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"model": "another"}))
    np.savez(parts / "part-0000000.npz", ids=np.array(["0"]), vectors=np.zeros((1, 384), np.float32))
    res = _embed_file(redis_server.url, src, "--out", tmp_path / "p.parquet")
    assert res.returncode == 2 and "unfinished run with other settings" in res.stderr


def test_real_model_file(redis_server: RedisServer, tmp_path: Path, model_path: Path) -> None:
    worker = start_worker(
        redis_server.url, tmp_path, "--model-id", str(model_path), "--served-model-name", MODEL
    )
    texts = _texts(40)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.parquet"
    res = _embed_file(redis_server.url, src, "--out", out, "--cache-ttl", "60")
    assert res.returncode == 0, res.stderr
    again = _embed_file(redis_server.url, src, "--out", tmp_path / "again.parquet", "--cache-ttl", "60")
    assert "cache hit ratio 1.000" in again.stderr
    _, vectors = _read_parquet(out)
    _, cached = _read_parquet(tmp_path / "again.parquet")
    reference = _reference(redis_server.url, texts)
    worker.stop()
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    np.testing.assert_array_equal(cached, vectors)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
