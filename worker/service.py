"""The worker process's main loop.

Tasks on one asyncio loop, two threads for the heavy work:

    reader ──► tokenize (thread) ──► batcher ──► engine: infer (thread) ──► replier
    lease renewer · reclaimer (XAUTOCLAIM) · heartbeat

Tokenizing what was just read overlaps the inference of the current batch; the reader
stops reading while enough tokens wait, so one worker never hoards a backlog that
others could serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from embedq.common import keys, tracing
from embedq.common.aio import cancel_tasks
from embedq.common.codec import DecodeLimits, decode
from embedq.common.errors import (
    BackendError,
    EmbedqError,
    EmptyInputError,
    ProtocolError,
    RequestTimeoutError,
    ValidationError,
)
from embedq.common.ids import now_ms
from embedq.common.settings import connect
from embedq.common.wire import (
    SCORE_KINDS,
    DecodeParams,
    EmbedAllParams,
    EmbedParams,
    EmbedSparseParams,
    Input,
    PredictParams,
    RerankParams,
    TokenizeParams,
    TruncationParams,
    pack_reply,
    unpack_job,
)
from embedq.worker.backends.base import Backend
from embedq.worker.batcher import Batcher, BatchLimits
from embedq.worker.buckets import bucket_length
from embedq.worker.config import WorkerConfig
from embedq.worker.jobs import ActiveJob, error_reply
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.postprocess import check_dimensions
from embedq.worker.redis_io import refusal_passes
from embedq.worker.stream import Delivery, JobStream, OutgoingReply
from embedq.worker.tokenization import EncodeOptions, encode_inputs, encode_scoring_inputs

log = logging.getLogger(__name__)
# One line per forward pass with its figures: info with --log-batches, else debug.
batch_log = logging.getLogger("embedq.worker.batches")


class WorkerFault(Exception):
    """The worker cannot go on safely; the process should exit and let others reclaim."""


class RegistrationConflict(Exception):
    """Live workers already serve a different model under this worker's served name."""


READ_COUNT = 64
# Deliveries (each a crash or hang of the worker holding the job) after which a job is
# dead-lettered even if it never reached a forward pass: max_deliveries × this.
HELD_DELIVERIES_FACTOR = 4
READ_BLOCK_MS = 1000
# On a CPU, computed tokens may exceed real ones by at most this factor in a batch (see
# BatchLimits.max_padding_ratio): with few requests waiting, lengths vary widely.
CPU_MAX_PADDING_RATIO = 1.25
FULL_READ_BLOCK_MS = 50
# A job's params until its own are validated at admission (frozen, so one is shared).
_NO_PARAMS = EmbedParams()


@dataclass(eq=False, slots=True)
class _Seq:
    """One input of a job in the batcher (not frozen: one is made per input, and a
    frozen dataclass's __init__ costs several times more)."""

    job: ActiveJob
    index: int
    ids: list[int]
    # Token type ids of pair inputs (rerank, predict); None for embedding kinds.
    types: list[int] | None = None


def _isolate_redelivered(seqs: list[_Seq]) -> list[list[_Seq]]:
    """Split a batch so every job that was in an unfinished forward pass runs alone.

    Such a job may be what killed its last worker; run with others, a crash would count
    against them too and dead-letter innocent jobs.
    """
    if not any(s.job.delivery.suspicion for s in seqs):
        return [seqs] if seqs else []  # the common case, decided in one pass
    fresh = [s for s in seqs if not s.job.delivery.suspicion]
    alone: dict[int, list[_Seq]] = {}
    for s in seqs:
        if s.job.delivery.suspicion:
            alone.setdefault(id(s.job), []).append(s)
    return [g for g in (fresh, *alone.values()) if g]


def _texts_only(inputs: Sequence[Input]) -> list[str]:
    texts = [x for x in inputs if isinstance(x, str)]
    if len(texts) != len(inputs):
        raise ValidationError("`inputs` of a tokenize request must be strings")
    if any(not t for t in texts):
        raise ValidationError("`inputs` cannot be empty")
    return texts


def _ids_only(inputs: Sequence[Input]) -> list[list[int]]:
    ids = [x for x in inputs if isinstance(x, list)]
    if len(ids) != len(inputs) or not all(
        isinstance(t, int) and not isinstance(t, bool) for seq in ids for t in seq
    ):
        raise ValidationError("`ids` of a decode request must be lists of token ids")
    return cast("list[list[int]]", ids)  # every item was checked to be an int just above


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        backend: Backend,
        redis: aioredis.Redis | None = None,
        model_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.dim = backend.description.dim
        self.name = config.make_consumer_name()
        self.redis = redis or connect(config.redis, name=f"embedq-worker:{self.name}")
        self.stream = JobStream(
            self.redis,
            config.served_model_name,
            self.name,
            reply_ttl_s=config.reply_ttl_s,
            dlq_max_len=config.dlq_max_len,
        )
        self.limits = DecodeLimits()
        self.batcher: Batcher[_Seq] = Batcher(
            BatchLimits(
                max_batch_tokens=config.max_batch_tokens,
                max_batch_size=config.max_batch_requests,
                padded=not backend.description.packed,
                max_padding_ratio=CPU_MAX_PADDING_RATIO if backend.description.device == "cpu" else None,
            )
        )
        if config.max_batch_tokens < backend.description.max_input_length:
            raise ValueError(
                f"--max-batch-tokens ({config.max_batch_tokens}) must be at least the model's "
                f"max input length ({backend.description.max_input_length})"
            )
        # Jobs held, by (stream, entry id): admitted and not yet answered.
        self.active: dict[tuple[str, bytes], ActiveJob] = {}
        # Counters added to the model's stats hash with the next heartbeat.
        self._unsent_stats: dict[str, int] = {}
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._replies: asyncio.Queue[ActiveJob] = asyncio.Queue()
        self._stopping = asyncio.Event()
        # Set after the drain: housekeeping loops end even if a cancel is swallowed.
        self._closing = False
        self._reader_done = asyncio.Event()
        self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="embedq-tokenize")
        # Forward passes run here; serve() passes the thread that loaded the model.
        self._infer_pool = model_thread or ThreadPoolExecutor(1, thread_name_prefix="embedq-infer")
        self.batches_run = 0
        # monotonic start of the batch in the inference thread (the hang watchdog).
        self._batch_started: float | None = None
        # An OpenTelemetry tracer when a tracer provider is installed (set in run()).
        self._tracer: Any = None
        self.metrics = WorkerMetrics(config.served_model_name, self.name)
        # Padding efficiency = real tokens / computed (padded) tokens.
        self.real_tokens = 0
        self.padded_tokens = 0

    # ----------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Stop reading; what was read is finished and answered before run() returns."""
        self._stopping.set()
        self._work.set()
        self._room.set()

    async def run(self) -> None:
        self._tracer = tracing.tracer("embedq.worker")
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port)
            log.info("worker metrics on :%d/metrics", self.config.metrics_port)
        await self._check_registration()
        await self.stream.ensure_group()
        await self.stream.register(self._info())
        await self.stream.heartbeat(self.name, stale_after_ms=self._stale_ms())
        log.info("worker %s serving %s", self.name, self.config.served_model_name)
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
        ]
        replier = asyncio.create_task(self._replier_loop(), name="replier")
        work: asyncio.Task[None] | None = None
        faulted = False
        try:
            if self.config.consumer_name:
                await self._admit_all(await self.stream.read_own_pending())
            work = asyncio.create_task(self._work_then_drain(), name="work")
            await self._supervise(work, [*background, replier])
        except WorkerFault:
            faulted = True
            raise
        finally:
            self._closing = True
            await cancel_tasks([t for t in (work, *background, replier) if t is not None])
            try:
                if faulted and self.active:
                    # This process is about to exit with jobs in hand (a hung model, a
                    # failed task): let other workers take them now, not after a lease.
                    held = [job.delivery for job in self.active.values()]
                    await self.stream.release(held, idle_ms=self.config.lease_ms)
                    log.warning("released %d held jobs to other workers", len(held))
                await self.stream.leave(self.name)
            except RedisError:
                pass
            self._tok_pool.shutdown(wait=False)
            self._infer_pool.shutdown(wait=False)
            log.info(
                "worker %s stopped after %d batches (padding efficiency %.3f)",
                self.name,
                self.batches_run,
                self.real_tokens / max(self.padded_tokens, 1),
            )

    async def _work_then_drain(self) -> None:
        await asyncio.gather(self._reader_loop(), self._engine_loop())
        await self._replies.join()

    async def _supervise(self, work: asyncio.Task[None], helpers: list[asyncio.Task[None]]) -> None:
        """Return when the work is done. A helper that ends first is a fault: raising ends
        the process, its leases lapse and other workers take its jobs over (a live but
        stuck worker would keep renewing them forever)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.create_task(self._stopping.wait(), name="stop-signal")
        watched: set[asyncio.Task[Any]] = {work, stop, *helpers}
        deadline: float | None = None
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if work in done:
                    exc = work.exception() if not work.cancelled() else None
                    if exc is not None:
                        # A fault like any other: held jobs are released, not left to a lease.
                        raise WorkerFault(f"the work task failed: {exc!r}") from exc
                    work.result()
                    return
                if stop in done:
                    watched.discard(stop)
                    deadline = loop.time() + self.config.shutdown_grace_s
                    continue
                if not done:
                    raise WorkerFault(
                        f"jobs still unanswered {self.config.shutdown_grace_s:g}s after the stop "
                        "signal; leaving them to be reclaimed by other workers"
                    )
                failed = done.pop()
                exc = failed.exception() if not failed.cancelled() else None
                raise WorkerFault(f"the {failed.get_name()} task ended unexpectedly: {exc!r}") from exc
        finally:
            stop.cancel()

    async def _check_registration(self) -> None:
        """Refuse to join live workers of this name that serve a different model: their
        callers would get answers from two models under one name."""
        info, live = await self.stream.registered(self._stale_ms())
        if not live or not info:
            return  # nobody serves it now: this worker (re)defines the name
        mine = self._info()
        for field in ("model_type", "model_id", "dim", "revision"):
            theirs = info.get(field)
            if theirs is not None and theirs != mine[field]:
                raise RegistrationConflict(
                    f"{live} live worker(s) already serve {self.config.served_model_name!r} with "
                    f"{field} {theirs!r}; this worker has {mine[field]!r}. Stop them first, or "
                    "pick another --served-model-name"
                )

    def _stale_ms(self) -> int:
        return int(self.config.heartbeat_s * 5 * 1000)

    def _info(self) -> dict[str, str]:
        d = self.backend.description
        return {
            "model_id": d.model_id,
            "model_type": d.model_type,
            "revision": d.revision,
            "labels": json.dumps(d.labels),
            "dim": str(d.dim),
            "max_input_length": str(d.max_input_length),
            "pooling": d.pooling,
            "dtype": d.dtype,
            "max_batch_tokens": str(self.config.max_batch_tokens),
            "max_job_inputs": str(self.config.max_job_inputs),
            "prompts": ",".join(sorted(d.prompts)),
            "device": d.device,
            "max_batch_requests": str(self.config.max_batch_requests),
            "auto_truncate": "true" if self.config.auto_truncate else "false",
            "kinds": ",".join(d.kinds),
            # The prompt a request without prompt_name gets (part of the cache's key).
            "default_prompt": self._default_prompt_text(),
            # Heartbeats older than this mean the worker is gone (the gateway's /health).
            "liveness_ms": str(self._stale_ms()),
        }

    # ---------------------------------------------------------------- reading
    async def _reader_loop(self) -> None:
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                read_ahead = self.config.read_ahead_tokens
                if self.batcher.urgent_pending_tokens >= read_ahead:
                    # Interactive work alone fills the read-ahead: leave the rest to
                    # other workers until some of it is computed.
                    self._room.clear()
                    await self._room.wait()
                    continue
                # With the read-ahead full (a bulk backfill, however large its reads
                # overshot), keep taking interactive jobs only, with short blocks so bulk
                # reading resumes as soon as there is room.
                full = self.batcher.pending_tokens >= read_ahead
                try:
                    deliveries = await self.stream.read_new(
                        READ_COUNT,
                        FULL_READ_BLOCK_MS if full else READ_BLOCK_MS,
                        ("interactive",) if full else keys.LANES,
                    )
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    # Unreachable, or refusing for now (a replica after a failover, out of
                    # memory, loading): keep trying; other refusals are logged louder.
                    level = logging.WARNING if refusal_passes(exc) else logging.ERROR
                    log.log(level, "reading jobs failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if deliveries:
                    # Even when a stop came during the read: these are ours now, and
                    # answering them beats leaving them pending for a whole lease.
                    await self._admit_all(deliveries)
        finally:
            self._reader_done.set()
            self._work.set()

    async def _admit_all(self, deliveries: Sequence[Delivery]) -> None:
        """Decode and check jobs, tokenize the good ones in a thread, queue their sequences."""
        ready: list[ActiveJob] = []
        deliveries = [d for d in deliveries if d.key not in self.active]
        redelivered = [d for d in deliveries if d.deliveries > 1]
        if redelivered:
            try:
                counts = await self.stream.suspicion(redelivered)
            except RedisError:
                counts = [d.deliveries - 1 for d in redelivered]  # assume the worst
            found = {d.key: n for d, n in zip(redelivered, counts, strict=True)}
            deliveries = [replace(d, suspicion=found.get(d.key, 0)) for d in deliveries]
        for d in deliveries:
            if d.key in self.active:
                continue  # already ours (own-PEL read racing a claim)
            job = await self._check(d)
            if job is not None:
                self.active[d.key] = job
                ready.append(job)
        if not ready:
            return
        loop = asyncio.get_running_loop()
        tokenized = await loop.run_in_executor(self._tok_pool, self._tokenize, ready)
        self.metrics.tokenized(sum(job.tokenize_ms for job in ready) / 1000)
        for job in ready:
            tracing.record_span(self._tracer, "embedq.tokenize", job.span, *job.tokenize_window)
        for job, seqs in zip(ready, tokenized, strict=True):
            if job.error is not None or seqs is None:
                await self._finish(job)
                continue
            width = len(self.backend.description.id2label) if job.job.kind in SCORE_KINDS else self.dim
            lengths = [len(ids) for ids, _ in seqs]
            job.start(lengths, width)
            self.batcher.add_many(
                [_Seq(job, i, ids, types) for i, (ids, types) in enumerate(seqs)],
                lengths,
                urgent=keys.lane_of(job.delivery.stream) == "interactive",
            )
        self._work.set()

    async def _check(self, d: Delivery) -> ActiveJob | None:
        """A job ready to tokenize, or None after answering/dead-lettering it."""
        raw = d.fields.get(keys.JOB_FIELD)
        # Checked before decoding: the entry may be what crashes workers. A job counts
        # against its limit only for forward passes it was in that never finished; jobs
        # merely held by a dying worker are not blamed, up to a backstop for crashes
        # outside the forward pass (decoding, tokenization).
        limit = self.config.max_deliveries
        if d.suspicion >= limit or d.deliveries > limit * HELD_DELIVERIES_FACTOR:
            reason = (
                f"gave up after {d.deliveries - 1} deliveries, {d.suspicion} of them in a forward pass "
                "that never finished (the job may crash or hang workers)"
            )
            await self._reject(d, raw, BackendError(reason), "deliveries")
            return None
        try:
            if raw is None:
                raise ProtocolError("stream entry has no job field")
            job = unpack_job(raw, self.limits)
            if not keys.is_reply_stream(job.reply_to):
                raise ProtocolError(f"reply_to {job.reply_to!r} is not a reply stream")
        except ProtocolError as exc:
            await self._reject(d, raw, exc, "undecodable")
            return None

        active = ActiveJob(delivery=d, job=job, params=_NO_PARAMS)
        active.queue_ms = max(0.0, now_ms() - job.created_ms)
        self.metrics.admitted(active.queue_ms / 1000, d.deliveries)
        if self._tracer is not None:
            active.span = self._start_job_span(active)
        try:
            if job.deadline_ms and now_ms() > job.deadline_ms:
                raise RequestTimeoutError("the request's deadline passed while it waited in the queue")
            desc = self.backend.description
            if job.kind not in desc.kinds:
                raise BackendError(
                    f"model {self.config.served_model_name} is a {desc.model_type} model and does not "
                    f"serve {job.kind!r}"
                )
            active.params = job.typed_params()
            if job.kind in SCORE_KINDS:
                active.labels = desc.labels
            if isinstance(active.params, EmbedParams):
                check_dimensions(active.params.dimensions, self.dim)
            if len(job.inputs) > self.config.max_job_inputs:
                raise ValidationError(
                    f"batch size {len(job.inputs)} > maximum allowed batch size {self.config.max_job_inputs}"
                )
        except EmbedqError as exc:
            active.error = exc
        except Exception as exc:  # pydantic errors from params
            active.error = ValidationError(f"invalid parameters: {exc}")
        if active.error is not None:
            self.active[d.key] = active
            await self._finish(active)
            return None
        return active

    def _start_job_span(self, active: ActiveJob) -> Any:
        """The job's span, a child of the caller's (from Job.trace), starting when the job
        was created so the queue wait is part of it."""
        job = active.job
        created_ns = job.created_ms * 1_000_000
        span = self._tracer.start_span(
            f"embedq.{job.kind}",
            context=tracing.extract(job.trace),
            start_time=created_ns,
            attributes={
                "embedq.model": job.model,
                "embedq.request_id": job.id,
                "embedq.inputs": len(job.inputs),
                "embedq.worker": self.name,
                "embedq.deliveries": active.delivery.deliveries,
            },
        )
        tracing.record_span(self._tracer, "embedq.queue", span, created_ns, time.time_ns())
        return span

    async def _reject(self, d: Delivery, raw: bytes | None, error: EmbedqError, reason: str) -> None:
        """Dead-letter an entry; tell its caller too when it can be identified."""
        log.warning("dead-lettering entry %s: %s", d.entry_id, error.message)
        self.metrics.dead_lettered(reason)
        await self._safe(self.stream.dead_letter(d, error.message))
        try:
            obj = decode(raw, self.limits) if raw is not None else {}
        except ProtocolError:
            return
        req_id, reply_to = obj.get("id"), obj.get("reply_to")
        if (
            isinstance(req_id, str)
            and 0 < len(req_id) <= 64
            and isinstance(reply_to, str)
            and keys.is_reply_stream(reply_to)
        ):
            payload = pack_reply(error_reply(req_id, error, None))
            await self._safe(self.stream.send_reply(reply_to, payload))

    def _tokenize(self, jobs: Sequence[ActiveJob]) -> list[list[tuple[list[int], list[int] | None]] | None]:
        """Token ids of embed jobs; tokenize and decode jobs are answered right here."""
        out: list[list[tuple[list[int], list[int] | None]] | None] = []
        tokenizer = self.backend.tokenizer
        for job in jobs:
            start = time.perf_counter()
            wall_start = time.time_ns()
            params = job.params
            seqs: list[tuple[list[int], list[int] | None]] | None = None
            try:
                if not job.job.inputs:
                    raise EmptyInputError("Batch is empty")
                if isinstance(params, TokenizeParams):
                    job.tokens = tokenizer.tokenize(
                        _texts_only(job.job.inputs),
                        add_special_tokens=params.add_special_tokens,
                        prompt=self._prompt(params.prompt_name),
                    )
                elif isinstance(params, DecodeParams):
                    job.texts = [
                        tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
                        for ids in _ids_only(job.job.inputs)
                    ]
                elif isinstance(params, RerankParams | PredictParams):
                    query = params.query if isinstance(params, RerankParams) else None
                    options = self._truncation(params, prompt=None)
                    seqs = list(encode_scoring_inputs(tokenizer, job.job.inputs, query, options))
                else:
                    assert isinstance(params, EmbedParams | EmbedAllParams | EmbedSparseParams)
                    options = self._truncation(params, prompt=self._prompt(params.prompt_name))
                    seqs = [(ids, None) for ids in encode_inputs(tokenizer, job.job.inputs, options)]
                if seqs is not None and any(not ids for ids, _ in seqs):
                    raise ValidationError("an input produced no tokens")
            except EmbedqError as exc:
                job.error = exc
            except Exception as exc:  # a tokenizer bug must not kill the worker
                log.exception("tokenization failed")
                job.error = BackendError(f"tokenization failed: {exc}")
            out.append(seqs if job.error is None else None)
            job.tokenize_ms = (time.perf_counter() - start) * 1000
            job.tokenize_window = (wall_start, time.time_ns())
        return out

    def _default_prompt_text(self) -> str:
        try:
            return self._prompt(None) or ""
        except ValidationError:
            return ""

    def _prompt(self, prompt_name: str | None) -> str | None:
        """The prompt text for a request: its prompt_name, else the worker's default."""
        desc = self.backend.description
        if prompt_name is None and self.config.default_prompt:
            return self.config.default_prompt
        name = prompt_name or self.config.default_prompt_name or desc.default_prompt_name
        if name is None:
            return None
        if name not in desc.prompts:
            known = ", ".join(sorted(desc.prompts)) or "none"
            raise ValidationError(f"prompt_name {name!r} is not a known prompt (known: {known})")
        return desc.prompts[name]

    def _truncation(self, params: TruncationParams, *, prompt: str | None) -> EncodeOptions:
        truncate = self.config.auto_truncate if params.truncate is None else params.truncate
        return EncodeOptions(truncate=truncate, direction=params.truncation_direction, prompt=prompt)

    # ---------------------------------------------------------------- inference
    async def _engine_loop(self) -> None:
        while True:
            batch = self.batcher.next_batch()
            if self.batcher.urgent_pending_tokens < self.config.read_ahead_tokens:
                self._room.set()
            if batch is None:
                if self._reader_done.is_set():
                    return
                self._work.clear()
                await self._work.wait()
                continue
            await self._expire(batch.items)
            seqs = [s for s in batch.items if s.job.error is None]
            for group in _isolate_redelivered(seqs):
                await self._run_batch(group)

    async def _run_batch(self, seqs: list[_Seq]) -> None:
        loop = asyncio.get_running_loop()
        # Recorded before the pass starts: if this process dies in it, whoever takes
        # these jobs over knows they were being computed, not just held.
        await self._mark_suspects(seqs)
        start = time.perf_counter()
        self._batch_started = time.monotonic()
        wall_start = time.time_ns()
        try:
            failures = await loop.run_in_executor(self._infer_pool, self._infer, seqs)
        finally:
            self._batch_started = None
        wall_end = time.time_ns()
        elapsed_ms = (time.perf_counter() - start) * 1000
        real = sum(len(s.ids) for s in seqs)
        padded = real if self.backend.description.packed else self._computed_tokens(seqs)
        if self._tracer is not None:
            self._trace_batch(seqs, wall_start, wall_end, padded)
        self.batches_run += 1
        self.real_tokens += real
        self.padded_tokens += padded
        self.metrics.batch(len(seqs), real, elapsed_ms / 1000, self.real_tokens / self.padded_tokens)
        batch_log.log(
            logging.INFO if self.config.log_batches else logging.DEBUG,
            "batch of %d seqs, %d tokens (%d padded) in %.1f ms",
            len(seqs),
            real,
            padded,
            elapsed_ms,
            extra={
                "batch_size": len(seqs),
                "tokens": real,
                "padded_tokens": padded,
                "inference_ms": round(elapsed_ms, 3),
                "jobs": len({id(s.job) for s in seqs}),
                "worker": self.name,
            },
        )
        for job, error in failures.items():
            if job.error is None:
                job.error = error
        touched: dict[int, ActiveJob] = {}
        for s in seqs:
            touched[id(s.job)] = s.job
            s.job.remaining -= 1
        for job in touched.values():
            job.infer_ms += elapsed_ms
            job.batch_size = max(job.batch_size, len(seqs))
            if job.remaining == 0 or job.error is not None:
                await self._finish(job)

    def _computed_tokens(self, seqs: list[_Seq]) -> int:
        """Tokens a padded pass computes: every row as wide as the longest (or its bucket)."""
        width = max(len(s.ids) for s in seqs)
        desc = self.backend.description
        if desc.length_step:  # the backend pads to a length bucket: those tokens are computed too
            width = bucket_length(width, desc.max_input_length, desc.length_step)
        return width * len(seqs)

    async def _mark_suspects(self, seqs: list[_Seq]) -> None:
        deliveries = {id(s.job): s.job.delivery for s in seqs}.values()
        backoff = 0.05
        while True:
            try:
                await self.stream.mark_suspects(deliveries)
                return
            except (RedisError, OSError) as exc:
                if not refusal_passes(exc) or isinstance(exc, NoPermissionError):
                    # Refused for good (the suspects key is not a hash, an ACL without
                    # it...): computing unmarked beats holding the jobs (their leases are
                    # renewed) for ever; a crash in it blames no one.
                    log.error("cannot record the batch before computing (%s); computing unmarked", exc)
                    return
                # Unreachable or out of memory: computing unmarked would blame no one for
                # a crash, so wait for Redis.
                log.warning("cannot record the batch before computing (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _trace_batch(self, seqs: list[_Seq], start_ns: int, end_ns: int, padded: int) -> None:
        """One span per batch, linked to every job it served; an inference span per job."""
        jobs = {id(s.job): s.job for s in seqs}.values()
        links = [tracing.link_to(j.span) for j in jobs if j.span is not None]
        attrs = {
            "embedq.batch_size": len(seqs),
            "embedq.tokens": sum(len(s.ids) for s in seqs),
            "embedq.padded_tokens": padded,
            "embedq.worker": self.name,
        }
        batch = self._tracer.start_span("embedq.batch", start_time=start_ns, links=links, attributes=attrs)
        batch.end(end_time=end_ns)
        for job in jobs:
            tracing.record_span(self._tracer, "embedq.inference", job.span, start_ns, end_ns, attrs)

    async def _expire(self, seqs: Sequence[_Seq]) -> None:
        """Answer jobs whose deadline passed while they waited: their callers gave up."""
        now = now_ms()
        for job in {id(s.job): s.job for s in seqs}.values():
            if job.error is None and job.job.deadline_ms and now > job.job.deadline_ms:
                job.error = RequestTimeoutError("the request's deadline passed before it was computed")
                await self._finish(job)

    def _infer(self, seqs: list[_Seq]) -> dict[ActiveJob, EmbedqError]:
        """Run a batch; on failure, bisect so one bad input fails only its own job."""
        try:
            sparse_seqs = [s for s in seqs if s.job.sparse_rows is not None]
            pooled_seqs = [s for s in seqs if not s.job.per_token and s.job.sparse_rows is None]
            token_seqs = [s for s in seqs if s.job.per_token]
            sparse = self.backend.embed_sparse([s.ids for s in sparse_seqs]) if sparse_seqs else []
            if any(not np.all(np.isfinite(v)) for _, v in sparse):
                raise FloatingPointError("non-finite values in the model output")
            pooled = None
            if pooled_seqs and pooled_seqs[0].types is not None:  # a model serves one task
                pooled = self.backend.predict(
                    [s.ids for s in pooled_seqs], [s.types or [] for s in pooled_seqs]
                )
            elif pooled_seqs:
                pooled = self.backend.embed([s.ids for s in pooled_seqs])
            # A batch mixing embed and embed_all costs two forward passes; the mix is rare.
            rows = self.backend.embed_all([s.ids for s in token_seqs]) if token_seqs else []
            if pooled is not None and not np.all(np.isfinite(pooled)):
                raise FloatingPointError("non-finite values in the model output")
            if any(not np.all(np.isfinite(r)) for r in rows):
                raise FloatingPointError("non-finite values in the model output")
        except Exception as exc:
            if len(seqs) == 1:
                log.warning("inference failed for one input of job %s: %s", seqs[0].job.job.id, exc)
                return {seqs[0].job: BackendError(f"inference failed: {exc}")}
            mid = len(seqs) // 2
            failures = self._infer(seqs[:mid])
            failures.update(self._infer(seqs[mid:]))
            return failures
        if pooled is not None:
            for row, s in enumerate(pooled_seqs):
                assert s.job.pooled is not None
                s.job.pooled[s.index] = pooled[row]
        for s, r in zip(token_seqs, rows, strict=True):
            assert s.job.token_rows is not None
            s.job.token_rows[s.index] = r
        for s, vec in zip(sparse_seqs, sparse, strict=True):
            assert s.job.sparse_rows is not None
            s.job.sparse_rows[s.index] = vec
        return {}

    # ---------------------------------------------------------------- replies
    async def _finish(self, job: ActiveJob) -> None:
        if not job.finished:
            job.finished = True
            await self._replies.put(job)

    async def _replier_loop(self) -> None:
        while not self._closing:
            jobs = [await self._replies.get()]
            while not self._replies.empty() and len(jobs) < 256:
                jobs.append(self._replies.get_nowait())
            outgoing = [OutgoingReply(j.delivery, j.job.reply_to, j.packed_reply(self.name)) for j in jobs]
            await self._deliver(outgoing)
            self._count("jobs_answered", len(jobs))
            self._count("inputs_answered", sum(len(j.job.inputs) for j in jobs))
            self._count("tokens_answered", sum(sum(j.token_counts) for j in jobs))
            for j in jobs:
                self.active.pop(j.delivery.key, None)
                self.metrics.answered(j.job.kind, "ok" if j.error is None else j.error.code)
                if j.span is not None:
                    if j.error is not None:
                        tracing.mark_error(j.span, j.error.message)
                    j.span.set_attribute("embedq.tokens", sum(j.token_counts))
                    j.span.end()
                self._replies.task_done()

    async def _deliver(self, outgoing: list[OutgoingReply]) -> None:
        """Write replies and ack their requests; a reply that can never be written (its
        reply_to is not a stream) is dead-lettered; transient failures are retried."""
        backoff = 0.1
        while outgoing and not self._closing:
            try:
                failed = await self.stream.reply_and_ack(outgoing)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("Redis write failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            outgoing = []
            for reply, error in failed:
                if not refusal_passes(error):
                    # Refused for good (reply_to is not a stream, or one past its last
                    # possible id): retrying would hold up every reply after this one.
                    reason = f"cannot reply to {reply.reply_to!r}: {error}"
                    log.warning("dead-lettering entry %s: %s", reply.delivery.entry_id, reason)
                    await self._safe(self.stream.dead_letter(reply.delivery, reason))
                    self.metrics.dead_lettered("reply_to")
                else:  # out of memory, read-only replica, loading...: try again later
                    outgoing.append(reply)
            if outgoing:
                log.warning(
                    "%d replies not written (%s); retrying in %.1fs", len(outgoing), failed[0][1], backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _count(self, name: str, value: int) -> None:
        self._unsent_stats[name] = self._unsent_stats.get(name, 0) + value

    async def _safe(self, coro: Awaitable[object]) -> None:
        try:
            await coro
        except RedisError as exc:
            log.warning("Redis call failed: %s", exc)

    # ---------------------------------------------------------------- housekeeping
    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.heartbeat_s)
            stats, self._unsent_stats = self._unsent_stats, {}
            try:
                await self.stream.heartbeat(self.name, stale_after_ms=self._stale_ms(), stats=stats)
                self.metrics.heartbeat_ok()
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
                for name, value in stats.items():  # sent with the next one instead
                    self._count(name, value)

    async def _lease_loop(self) -> None:
        """Renew the leases of held jobs while the model makes progress.

        A batch running past --max-batch-seconds is taken as hung: leases stop being
        renewed and the task fails, which ends the process (a thread stuck in native code
        cannot be stopped any other way). Its jobs are then reclaimed by other workers,
        run alone as redeliveries, and dead-lettered if they hang every worker they reach.
        """
        while not self._closing:
            await asyncio.sleep(min(self.config.lease_ms / 3000, self.config.max_batch_seconds / 2))
            started = self._batch_started
            if started is not None and time.monotonic() - started > self.config.max_batch_seconds:
                raise WorkerFault(
                    f"a batch has been running for {time.monotonic() - started:.0f}s "
                    f"(--max-batch-seconds {self.config.max_batch_seconds:g}): the model looks hung"
                )
            if self.active:
                await self._safe(self.stream.renew([job.delivery for job in self.active.values()]))

    async def _reclaim_loop(self) -> None:
        page = 64
        while not self._closing:
            if not self._stopping.is_set():
                try:
                    # Keep taking full pages while there is room: a dead worker may have
                    # held thousands of jobs.
                    while self.batcher.pending_tokens < self.config.read_ahead_tokens:
                        claimed = await self.stream.claim_idle(self.config.lease_ms, count=page)
                        if claimed:
                            log.warning("reclaimed %d entries whose lease lapsed", len(claimed))
                            self.metrics.reclaim(len(claimed))
                            await self._admit_all(claimed)
                        if len(claimed) < page:
                            break
                except RedisError as exc:
                    log.warning("reclaim failed: %s", exc)
            await asyncio.sleep(self.config.lease_ms / 2000)
