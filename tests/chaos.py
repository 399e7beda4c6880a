"""The chaos harness: real redis-server and worker processes, loopback only, faults
injected while an SDK load runs, and the figures of each run.

Every scenario sends ``n`` embed requests at a steady rate through one AsyncClient and
classifies each:

- acknowledged: its XADD returned an entry id (the submission was accepted);
- answered: it got the right vector, or a typed error from a worker (a poison input);
- lost: acknowledged, and no right answer before its deadline (must be 0);
- redelivered: answered by a run that was not the job's first delivery (duplicate
  execution, which the contract allows);
- duplicate answers surfaced: a caller that saw two answers (must be 0; the SDK drops
  the second copy of a reply, counted as ``duplicates_dropped``).

Recovery time is from the fault to the first answer of a request sent after it. Used
by tests/test_chaos.py (small runs, asserting the contract) and scripts/chaos_report.py
(the table in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from embedq import AsyncClient
from embedq.common import keys
from embedq.common.errors import EmbedqError, RequestTimeoutError
from embedq.common.wire import Reply, unpack_job
from embedq.producer.async_client import embeddings_of
from embedq.redis_server import RedisServer
from embedq.worker.backends.fake import CRASH_WORD, HANG_WORD, RAISE_WORD

from .helpers import MODEL, WorkerProcess, start_worker, wait_for_workers

LEASE_MS = 3000
# 0.2 ms per token keeps a few batches in flight at any moment of a fault.
WORKER_ARGS = ("--backend", "fake", "--fake-delay-us-per-token", "200", "--lease-ms", str(LEASE_MS),
               "--heartbeat-s", "0.5", "--max-batch-seconds", "3")  # fmt: skip
POOL = [f"chaos text {i} " + "word " * (i % 17) for i in range(64)]
POISON = {RAISE_WORD: "raise", CRASH_WORD: "crash", HANG_WORD: "hang"}


@dataclass
class Figures:
    scenario: str
    sent: int = 0
    acknowledged: int = 0
    answered: int = 0
    typed_errors: int = 0
    lost: int = 0
    redelivered: int = 0
    duplicates_dropped: int = 0
    duplicate_answers: int = 0
    recovery_s: float | None = None
    p99_ms: float = 0.0
    max_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        return [
            self.scenario, str(self.sent), str(self.acknowledged), str(self.answered), str(self.typed_errors),
            str(self.lost), str(self.redelivered), str(self.duplicates_dropped), str(self.duplicate_answers),
            rec, f"{self.p99_ms:.0f}", f"{self.max_ms:.0f}",
        ]  # fmt: skip


HEADER = ["scenario", "sent", "acknowledged", "answered", "typed errors", "lost", "redelivered",
          "duplicate replies dropped", "duplicate answers surfaced", "recovery (s)", "p99 (ms)",
          "max (ms)"]  # fmt: skip


class Cluster:
    """One Redis on a fixed port (so it can be restarted) and supervised workers."""

    def __init__(self, tmp: Path, *, appendonly: bool = True, appendfsync: str = "everysec") -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis", appendonly=appendonly, appendfsync=appendfsync)
        self.workers: list[WorkerProcess] = []

    @property
    def url(self) -> str:
        return self.redis.url

    def start(self, workers: int = 1) -> Cluster:
        self.redis.start()
        for _ in range(workers):
            self.add_worker()
        wait_for_workers(self.url, MODEL, workers)
        return self

    def add_worker(self, *extra: str) -> WorkerProcess:
        w = start_worker(self.url, self.tmp, *WORKER_ARGS, *extra, wait=False)
        self.workers.append(w)
        return w

    def restart_dead_workers(self) -> int:
        """What a supervisor (systemd, Kubernetes) does: start a new worker per dead one."""
        dead = [w for w in self.workers if w.proc.poll() is not None]
        for w in dead:
            self.workers.remove(w)
            self.add_worker()
        return len(dead)

    def stop(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop(timeout=20)
        self.redis.stop()


async def reference_vectors(url: str) -> dict[str, np.ndarray]:
    async with AsyncClient(url, model=MODEL, timeout=30) as client:
        vectors = await client.embed(POOL)
    return {t: v for t, v in zip(POOL, vectors, strict=True)}


Fault = Callable[[Cluster], Awaitable[None]]


async def run_scenario(
    name: str,
    cluster: Cluster,
    fault: Fault,
    *,
    n: int = 400,
    rate: float = 100.0,
    fault_after_s: float = 1.0,
    timeout_s: float = 60.0,
    poison_every: int = 0,
    supervise: bool = True,
) -> Figures:
    """Send ``n`` requests at ``rate``/s, inject ``fault`` after ``fault_after_s``."""
    ref = await reference_vectors(cluster.url)
    fig = Figures(name)
    acked: set[str] = set()
    latencies: list[float] = []
    fault_at: list[float] = []
    first_after: list[float] = []
    answers: dict[int, int] = {}
    supervisor_stop = asyncio.Event()

    async def supervisor() -> None:
        while not supervisor_stop.is_set():
            cluster.restart_dead_workers()
            await asyncio.sleep(0.2)

    async with AsyncClient(cluster.url, model=MODEL, timeout=timeout_s) as client:
        enqueue = client._enqueue

        async def recording_enqueue(stream: str, payload: bytes) -> bool:
            ok = await enqueue(stream, payload)
            if ok:
                acked.add(unpack_job(payload).id)
            return ok

        client._enqueue = recording_enqueue  # type: ignore[method-assign]

        async def one(i: int) -> None:
            text = POOL[i % len(POOL)]
            poison = None
            if poison_every and i % poison_every == poison_every - 1:
                poison = list(POISON)[(i // poison_every) % len(POISON)]
                text = f"{poison} {i}"
            sent_at = time.monotonic()
            try:
                reply: Reply = await client.request("embed", [text], {})
            except RequestTimeoutError:
                return  # counted as lost below if it had been acknowledged
            except EmbedqError:
                return  # not acknowledged (refused before queuing)
            answers[i] = answers.get(i, 0) + 1
            done = time.monotonic()
            if reply.meta is not None and reply.meta.deliveries > 1:
                fig.redelivered += 1
            if not reply.ok:
                fig.typed_errors += 1
                fig.answered += 1
                return
            vec = embeddings_of(reply)[0]
            if poison is None and np.allclose(vec, ref[text], atol=1e-6):
                fig.answered += 1
                latencies.append(done - sent_at)
                if fault_at and sent_at > fault_at[0]:
                    first_after.append(done)
            else:
                fig.notes.append(f"request {i}: wrong vector")

        async def inject() -> None:
            await asyncio.sleep(fault_after_s)
            fault_at.append(time.monotonic())
            await fault(cluster)

        sup = asyncio.create_task(supervisor()) if supervise else None
        injector = asyncio.create_task(inject())
        tasks = []
        start = time.monotonic()
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        await injector
        supervisor_stop.set()
        if sup is not None:
            await sup
        fig.duplicates_dropped = client._reader.duplicates_dropped if client._reader else 0
        fig.sent = n
    fig.acknowledged = len(acked)
    fig.lost = fig.acknowledged - fig.answered
    fig.duplicate_answers = sum(1 for c in answers.values() if c > 1)
    if latencies:
        fig.p99_ms = float(np.percentile(latencies, 99) * 1000)
        fig.max_ms = max(latencies) * 1000
    if fault_at and first_after:
        fig.recovery_s = max(0.0, min(first_after) - fault_at[0])
    return fig


# ------------------------------------------------------------------------- faults
async def kill_worker_restart(c: Cluster) -> None:
    c.workers[0].kill()  # the supervisor starts a new one (a new consumer name)


async def kill_one_of_two_workers(c: Cluster) -> None:
    """Kill a worker at a moment it holds jobs; it is not restarted, so the survivor
    must reclaim them once their lease lapses."""
    r = redis.Redis.from_url(c.url)
    victim = c.workers[0]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        summary = r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)
        held = {row["name"].decode(): int(row["pending"]) for row in summary.get("consumers") or []}
        # Consumer names are <host>-<pid>-<random>.
        busy = [w for w in c.workers if any(f"-{w.proc.pid}-" in n and p > 0 for n, p in held.items())]
        if busy:
            victim = busy[0]
            break
        await asyncio.sleep(0.005)
    victim.kill()
    c.workers.remove(victim)


def kill_redis(down_s: float) -> Fault:
    async def fault(c: Cluster) -> None:
        c.redis.kill()
        await asyncio.sleep(down_s)
        c.redis.start()

    return fault


def pause_redis(paused_s: float) -> Fault:
    async def fault(c: Cluster) -> None:
        c.redis.signal(signal.SIGSTOP)
        await asyncio.sleep(paused_s)
        c.redis.signal(signal.SIGCONT)

    return fault


async def no_fault(c: Cluster) -> None:
    return None


async def duplicate_entries(c: Cluster) -> None:
    """Let a backlog build (workers paused), then copy every entry of the stream once
    more: the same jobs, same request ids, delivered twice."""
    r = redis.Redis.from_url(c.url)
    for w in c.workers:
        w.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(0.5)
    for _, fields in r.xrange(keys.jobs_stream(MODEL), count=1000):
        r.xadd(keys.jobs_stream(MODEL), fields)
    for w in c.workers:
        w.proc.send_signal(signal.SIGCONT)


async def malformed_entries(c: Cluster) -> None:
    r = redis.Redis.from_url(c.url)
    for blob in (b"\xc1", b"\x81\xa1j\xc1", os.urandom(512), b"\xdf\xff\xff\xff\xff", b"\x91" * 10_000):
        r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: blob})
    r.xadd(keys.jobs_stream(MODEL), {b"not-the-job-field": b"x"})


# ------------------------------------------------------------------------- producer killed
PRODUCER = """
import asyncio, sys
from embedq import AsyncClient
async def main():
    async with AsyncClient(sys.argv[1], model=sys.argv[2], timeout=float(sys.argv[3])) as c:
        print(c.reply_stream, flush=True)
        await asyncio.gather(*(c.embed(f"orphan {i} " + "w " * 20) for i in range(int(sys.argv[4]))),
                             return_exceptions=True)
asyncio.run(main())
"""


def _worker_outcomes(metrics_port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("embedq_worker_jobs_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def producer_killed(tmp: Path, *, jobs: int = 200, timeout_s: float = 2.0) -> dict[str, float]:
    """A producer dies with ``jobs`` in flight. Its jobs are answered into a reply stream
    that expires, and jobs whose deadline passed while queued are never computed."""
    import subprocess
    import sys

    from .helpers import free_port

    cluster = Cluster(tmp)
    cluster.redis.start()
    port = free_port()
    # ~22 tokens × 1 ms: ~350 ms per 16-job batch, so most of the backlog outlives its deadline.
    slow = ("--backend", "fake", "--fake-delay-us-per-token", "1000")
    cluster.workers.append(
        start_worker(cluster.url, tmp, *slow, "--reply-ttl-s", "3", "--metrics-port", str(port))
    )
    try:
        r = redis.Redis.from_url(cluster.url)
        args = [cluster.url, MODEL, str(timeout_s), str(jobs)]
        proc = subprocess.Popen([sys.executable, "-c", PRODUCER, *args], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        reply_stream = proc.stdout.readline().decode().strip()
        stream = keys.jobs_stream(MODEL)
        deadline = time.monotonic() + 30
        while r.xlen(stream) < jobs // 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        proc.kill()
        proc.wait()
        killed_at = time.monotonic()
        while (
            r.xlen(stream) or r.xpending(stream, keys.WORKER_GROUP)["pending"]
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained_s = time.monotonic() - killed_at
        ttl_ms = r.pttl(reply_stream)
        outcomes = _worker_outcomes(port)
        await asyncio.sleep(3.5)
        return {
            "jobs": jobs,
            "computed": outcomes.get("ok", 0.0),
            "expired_uncomputed": outcomes.get("timeout", 0.0),
            "left_in_stream": float(r.xlen(stream)),
            "drained_s": drained_s,
            "reply_ttl_ms_after_drain": float(ttl_ms),
            "reply_stream_exists_after_ttl": float(r.exists(reply_stream)),
        }
    finally:
        cluster.stop()


# ------------------------------------------------------------------------- overload
def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def overload(tmp: Path, *, seconds: float = 4.0, factor: float = 3.0) -> dict[str, float]:
    """HTTP load at ``factor`` × a worker's capacity through the gateway: accepted
    requests meet their deadline, the rest get 429 at once, memory stays bounded."""
    import httpx

    from .helpers import start_gateway

    cluster = Cluster(tmp)
    cluster.redis.start()
    # ~5 tokens × 6 ms: a 16-request batch takes ~0.5 s, so capacity is ~30 requests/s
    # (low, so that this machine's client can offer three times as much without queueing).
    slow = ("--backend", "fake", "--fake-delay-us-per-token", "6000")
    cluster.workers.append(start_worker(cluster.url, tmp, *slow))
    gateway = start_gateway(cluster.url, tmp, "--max-queue-backlog", "24", "--request-timeout", "5")
    try:
        # No client-side pool limit: a request waiting for a connection would count its
        # wait as the gateway's latency.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits) as http:
            capacity_start = time.monotonic()
            done = 0
            while time.monotonic() - capacity_start < 1.5:
                await asyncio.gather(
                    *(http.post("/embed", json={"inputs": f"cap {done + k}"}) for k in range(16))
                )
                done += 16
            capacity = done / (time.monotonic() - capacity_start)
            rate = capacity * factor
            rss_before = {n: _rss_mb(p) for n, p in (("gateway", gateway.proc.pid),
                                                     ("worker", cluster.workers[0].proc.pid))}  # fmt: skip
            accepted: list[float] = []
            rejected: list[float] = []
            other = 0

            async def one(i: int) -> None:
                nonlocal other
                t0 = time.monotonic()
                resp = await http.post("/embed", json={"inputs": f"load {i} a b"})
                took = time.monotonic() - t0
                if resp.status_code == 200:
                    accepted.append(took)
                elif resp.status_code == 429:
                    rejected.append(took)
                else:
                    other += 1

            tasks = []
            start = time.monotonic()
            n = int(rate * seconds)
            for i in range(n):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            peak = dict(rss_before)
            while not all(t.done() for t in tasks):
                for name, pid in (("gateway", gateway.proc.pid), ("worker", cluster.workers[0].proc.pid)):
                    peak[name] = max(peak[name], _rss_mb(pid))
                await asyncio.sleep(0.1)
            await asyncio.gather(*tasks)
        return {
            "capacity_rps": capacity,
            "offered_rps": rate,
            "sent": float(n),
            "accepted": float(len(accepted)),
            "rejected_429": float(len(rejected)),
            "other_status": float(other),
            "accepted_p99_s": float(np.percentile(accepted, 99)) if accepted else 0.0,
            "accepted_max_s": max(accepted, default=0.0),
            "rejected_p50_ms": float(np.percentile(rejected, 50) * 1000) if rejected else 0.0,
            "rejected_p99_ms": float(np.percentile(rejected, 99) * 1000) if rejected else 0.0,
            "gateway_rss_growth_mb": peak["gateway"] - rss_before["gateway"],
            "worker_rss_growth_mb": peak["worker"] - rss_before["worker"],
        }
    finally:
        gateway.stop()
        cluster.stop()
