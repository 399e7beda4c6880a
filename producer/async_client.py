"""The asyncio SDK: submit jobs to a model's stream and await typed results."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, Literal, cast

import numpy as np
import redis.asyncio as aioredis
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from embedq.common import keys
from embedq.common.aio import cancel_tasks
from embedq.common.codec import vectors_from_bytes
from embedq.common.errors import (
    EmbedqError,
    EmptyInputError,
    ModelNotServedError,
    ProtocolError,
    QueueUnavailableError,
    RequestTimeoutError,
    ValidationError,
    error_from_wire,
)
from embedq.common.ids import new_client_id, new_request_id, now_ms
from embedq.common.scores import Prediction, Ranked, predictions, rank
from embedq.common.settings import (
    DEFAULT_MODEL_NAME,
    DEFAULT_REDIS_URL,
    RedisSettings,
    connect,
    redis_username,
)
from embedq.common.tracing import inject_current
from embedq.common.wire import (
    EmbedParams,
    EmbedSparseParams,
    Job,
    JobKind,
    PredictParams,
    Reply,
    RerankParams,
    pack_job,
)
from embedq.producer.cache import EmbeddingCache, cacheable
from embedq.producer.lease import ClientLease
from embedq.producer.replies import ReplyReader
from embedq.producer.submitter import Submitter

log = logging.getLogger(__name__)

Texts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]

# How long a request stream that existed may be missing (a Redis restarted without
# persistence, until a worker re-creates it) before its model counts as not served.
STREAM_GONE_GRACE_S = 5.0
# How long a resubmission after an outage keeps trying before the next reconnect retries.
RESUBMIT_WINDOW_S = 10.0


def _as_inputs(texts: Texts) -> list[Any]:
    """TEI's input forms: a string, a list of strings, one id list, or a list of id lists."""
    if isinstance(texts, str):
        return [texts]
    # Bytes iterate as ints and would pass as token ids; None and numbers do not iterate.
    if isinstance(texts, bytes | bytearray) or not isinstance(texts, Iterable):
        raise ValidationError(
            f"`inputs` must be a text or a list of texts or token ids (found {type(texts).__name__!r})"
        )
    items: list[str | int | Sequence[int]] = list(texts)
    if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return [items]
    out: list[Any] = []
    for x in items:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list | tuple):  # token ids (their values are checked by the worker)
            out.append(list(cast("Sequence[int]", x)))
        else:  # a stray id among texts, bytes, None...: say so rather than guess
            raise ValidationError(
                f"`inputs` must be texts or lists of token ids (found {type(x).__name__!r})"
            )
    return out


def _check_timeout(seconds: float) -> float:
    """A timeout in seconds, 0 for none. A negative or NaN one is refused: it reads as a
    mistake, and silently waiting forever would hide it."""
    if not seconds >= 0:
        raise ValidationError(f"timeout must be a number of seconds >= 0 (0: no deadline), not {seconds!r}")
    return seconds


class AsyncClient:
    """Async client for one Redis and (by default) one served model.

    ``async with AsyncClient("redis://...", model="name") as client:`` starts one reply
    reader and one submitter; every request shares them, so the number of Redis
    connections stays small (at most ``max_connections`` + 1) however many requests
    are in flight.
    """

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        *,
        model: str = DEFAULT_MODEL_NAME,
        timeout: float = 60.0,
        max_connections: int = 4,
        client_id: str | None = None,
        redis_settings: RedisSettings | None = None,
        cache_ttl_s: int = 0,
        max_in_flight: int = 4096,
        lease_client_id: bool | None = None,
    ) -> None:
        self.model = keys.check_model_name(model)
        self.timeout = _check_timeout(timeout)
        self._settings = redis_settings or RedisSettings.from_env(redis_url, max_connections=max_connections)
        user = redis_username(self._settings.url)
        self.client_id = keys.check_client_id(client_id or new_client_id("sdk", user=user))
        # Every id is leased: the lease key's loss tells of Redis data lost under live
        # connections (lease.py). An explicit id is held exclusively, so a second client
        # cannot share its reply stream. (None: exclusive for an id the caller chose;
        # False for one that is random already, as the gateway's is.)
        self._exclusive = client_id is not None if lease_client_id is None else lease_client_id
        self._lease: ClientLease | None = None
        self._start_lock = asyncio.Lock()
        self._redis: aioredis.Redis | None = None
        self._reader_redis: aioredis.Redis | None = None
        self._reader: ReplyReader | None = None
        self._submitter: Submitter | None = None
        # Jobs awaiting their reply: request id -> (stream, packed job), resubmitted with
        # the same id after an outage (the second answer, if any, is dropped).
        self._in_flight: dict[str, tuple[str, bytes]] = {}
        # Request streams this client has queued to (see _enqueue).
        self._known_streams: set[str] = set()
        # Resubmissions under way (a reference keeps each task alive until it ends).
        self._background: set[asyncio.Task[None]] = set()
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        # Requests beyond this many wait for a slot: the client's memory stays bounded
        # however many callers there are.
        self._slots = asyncio.Semaphore(max_in_flight)
        # Cache `embed` results in Redis for this many seconds (0: no cache).
        self.cache_ttl_s = cache_ttl_s
        self.cache: EmbeddingCache | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._reader is not None:
            return
        async with self._start_lock:  # concurrent first requests: one start
            if self._reader is None:
                await self._start()

    async def _start(self) -> None:
        self._redis = connect(self._settings, name=f"embedq-sdk:{self.client_id}")
        # The blocking XREAD gets a connection of its own, always open: each time it is
        # made again, Redis was down, restarted or failed over, and queued jobs may be gone.
        self._reader_redis = connect(
            self._settings,
            name=f"embedq-sdk-replies:{self.client_id}",
            max_connections=1,
            on_connect=self._reader_connected,
        )
        lease = ClientLease(self._redis, self.client_id)
        lease.on_lost = self._resubmit_in_flight
        try:
            await lease.acquire(exclusive=self._exclusive)
        except BaseException:
            await self._redis.aclose()
            await self._reader_redis.aclose()
            self._redis = self._reader_redis = None
            raise
        self._lease = lease
        self._reader = ReplyReader(self._reader_redis, keys.reply_stream(self.client_id))
        self._submitter = Submitter(self._redis)
        if self.cache_ttl_s:
            self.cache = EmbeddingCache(self._redis, ttl_s=self.cache_ttl_s)
        self._reader.on_reconnect = self._resubmit_in_flight
        self._reader.start()
        self._submitter.start()

    async def close(self) -> None:
        await cancel_tasks(list(self._background))
        if self._submitter is not None:
            await self._submitter.close()
        if self._reader is not None:
            await self._reader.close()
        if self._lease is not None:
            await self._lease.release()
            self._lease = None
        for r in (self._redis, self._reader_redis):
            if r is not None:
                await r.aclose()
        self._reader = self._submitter = self._redis = self._reader_redis = None

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start_within(self, seconds: float) -> float:
        """Start on a first request within its timeout (a leased id may wait up to a lease
        period for a crashed holder's lease); returns the time left (0: no deadline)."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(seconds if seconds > 0 else None):
                await self.start()
        except TimeoutError:
            lease = f", or client id {self.client_id!r} is still leased" if self._exclusive else ""
            raise RequestTimeoutError(
                f"the client could not start within {seconds:g}s (Redis unreachable{lease})"
            ) from None
        return max(seconds - (time.monotonic() - started), 0.001) if seconds > 0 else 0

    @property
    def reply_stream(self) -> str:
        return keys.reply_stream(self.client_id)

    # ---------------------------------------------------------------- low level
    async def request(
        self,
        kind: JobKind,
        inputs: list[Any],
        params: dict[str, Any],
        *,
        model: str | None = None,
        timeout: float | None = None,
        lane: keys.Lane = "interactive",
    ) -> Reply:
        """Submit one job and wait for its reply (ok or not). Raises on transport errors.

        ``lane="bulk"`` queues it behind interactive work (ingestion, backfills). With
        the cache on, an ``embed`` job sends only the inputs the cache does not hold.
        """
        if timeout is not None:
            _check_timeout(timeout)
        if self._reader is None:
            timeout = await self._start_within(self.timeout if timeout is None else timeout)
        try:
            model = keys.check_model_name(model or self.model)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        if self.cache is not None and cacheable(kind, inputs):
            # One deadline over the cache's reads and writes and the fetch of what it
            # lacks: a stalled Redis must not hold a caller past its timeout, and the
            # job carries what is left of it (so a worker never computes it too late).
            seconds = self.timeout if timeout is None else timeout
            ends = time.monotonic() + seconds

            async def fetch(missing: list[Any]) -> Reply:
                left = max(ends - time.monotonic(), 0.001) if seconds > 0 else 0
                return await self._request(kind, missing, params, model, left, lane)

            try:
                async with asyncio.timeout(seconds if seconds > 0 else None):
                    return await self.cache.embed(model, inputs, params, fetch)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"no reply from model {model!r} within {seconds:g}s (cache lookup included)"
                ) from None
        return await self._request(kind, inputs, params, model, timeout, lane)

    async def _request(
        self,
        kind: JobKind,
        inputs: list[Any],
        params: dict[str, Any],
        model: str,
        timeout: float | None,
        lane: keys.Lane,
    ) -> Reply:
        assert self._reader is not None and self._submitter is not None
        timeout = self.timeout if timeout is None else timeout
        created = now_ms()
        try:
            job = Job(
                id=new_request_id(),
                kind=kind,
                model=model,
                inputs=inputs,
                params=params,
                reply_to=self._reader.stream,
                created_ms=created,
                deadline_ms=created + int(timeout * 1000) if timeout > 0 else 0,
                trace=inject_current(),
            )
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValidationError(f"invalid request: {where}: {first['msg']}") from None
        try:
            stream = keys.jobs_stream(model, lane)
            payload = pack_job(job)
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") has no UTF-8 form
            raise ValidationError(f"`inputs` must be valid Unicode: {exc.reason} at {exc.start}") from None
        except ValueError as exc:  # an unknown lane
            raise ValidationError(str(exc)) from None
        reader = self._reader
        waiter = reader.expect(job.id)
        # One coroutine from slot to reply, under one deadline that covers the wait for a
        # slot and the enqueue too (a stalled Redis cannot hang a caller). Nested helper
        # coroutines cost a frame, a closure and GC work per request on this hot path.
        try:
            async with asyncio.timeout(timeout if timeout > 0 else None), self._slots:
                if not await self._enqueue(stream, payload):
                    raise ModelNotServedError(
                        f"model {model!r} is not served: no worker has registered its stream "
                        f"{stream!r} on this Redis"
                    )
                self._in_flight[job.id] = (stream, payload)
                return await waiter
        except TimeoutError:
            raise RequestTimeoutError(
                f"no reply for request {job.id} to model {model!r} within {timeout:g}s"
            ) from None
        finally:
            reader.forget(job.id)
            self._in_flight.pop(job.id, None)

    async def _enqueue(self, stream: str, payload: bytes) -> bool:
        """XADD the job; True once queued, False if the stream does not exist.

        A connection that fails or times out leaves it unknown whether the entry landed:
        the same job (same request id) is sent again until the caller's deadline ends
        the wait, so at worst it runs twice and the second answer is dropped.
        """
        assert self._submitter is not None
        backoff = 0.05
        gone_since: float | None = None
        while True:
            try:
                if await self._submitter.submit(stream, payload):
                    self._known_streams.add(stream)
                    return True
                # A stream this client used before and that is gone now: Redis restarted
                # without its data. Its workers re-create it within a read, so wait a
                # little rather than call a served model "not served".
                if stream not in self._known_streams:
                    return False
                now = time.monotonic()
                gone_since = gone_since or now
                if now - gone_since > STREAM_GONE_GRACE_S:
                    self._known_streams.discard(stream)
                    return False
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("enqueue failed (%s); sending again in %.2fs", exc, backoff)
            except RedisError as exc:  # refused (ACL, out of memory...): retrying cannot help
                raise QueueUnavailableError(f"cannot enqueue to Redis: {exc}") from exc
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _reader_connected(self) -> None:
        # A restart without persistence can take a fraction of a second, which redis-py's
        # own retries hide from the reads: the reader's new connection is the one sign
        # of it (ReplyReader.connected), and leads to _resubmit_in_flight.
        if self._reader is not None:
            self._reader.connected()

    def _resubmit_in_flight(self) -> None:
        """After Redis came back or lost data, send every job still awaiting its reply
        again (same ids): a restart without persistence, the last second of an AOF or a
        FLUSHALL may have lost it. A job that survived runs twice at worst; its second
        answer is dropped."""
        if self._in_flight:
            log.warning("resubmitting %d jobs still awaiting replies", len(self._in_flight))
            task = asyncio.get_running_loop().create_task(self._resubmit(dict(self._in_flight)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _resubmit(self, jobs: dict[str, tuple[str, bytes]]) -> None:
        async def again(request_id: str, stream: str, payload: bytes) -> None:
            if request_id in self._in_flight:  # not answered meanwhile
                await self._enqueue(stream, payload)

        try:
            resend = asyncio.gather(*(again(i, stream, payload) for i, (stream, payload) in jobs.items()))
            await asyncio.wait_for(resend, RESUBMIT_WINDOW_S)
        except (TimeoutError, EmbedqError) as exc:
            log.warning("resubmission incomplete (%r); the next reconnect tries again", exc)

    # ---------------------------------------------------------------- embeddings
    async def embed(
        self,
        texts: Texts,
        *,
        normalize: bool = True,
        truncate: bool | None = None,
        truncation_direction: Literal["right", "left"] = "right",
        prompt_name: str | None = None,
        dimensions: int | None = None,
        model: str | None = None,
        timeout: float | None = None,
        lane: keys.Lane = "interactive",
    ) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array of shape (n, d), in input order.

        A single string gives a (1, d) array, as TEI's /embed does. ``lane="bulk"``
        yields to interactive requests at the workers (see ``embed_many``).
        """
        inputs = _as_inputs(texts)
        if not inputs:
            raise EmptyInputError("Batch is empty")
        params = _params(
            EmbedParams,
            normalize=normalize,
            truncate=truncate,
            truncation_direction=truncation_direction,
            prompt_name=prompt_name,
            dimensions=dimensions,
        )
        reply = await self.request("embed", inputs, params, model=model, timeout=timeout, lane=lane)
        return embeddings_of(reply)

    async def embed_sparse(
        self,
        texts: Texts,
        *,
        truncate: bool | None = None,
        truncation_direction: Literal["right", "left"] = "right",
        prompt_name: str | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        model: str | None = None,
        timeout: float | None = None,
        lane: keys.Lane = "interactive",
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """SPLADE vectors of a sparse model: per input, (vocabulary indices, weights),
        indices ascending; ``threshold`` drops weights at or below it, then ``top_k``
        keeps the k largest."""
        inputs = _as_inputs(texts)
        if not inputs:
            raise EmptyInputError("Batch is empty")
        params = _params(
            EmbedSparseParams,
            truncate=truncate,
            truncation_direction=truncation_direction,
            prompt_name=prompt_name,
            top_k=top_k,
            threshold=threshold,
        )
        reply = await self.request("embed_sparse", inputs, params, model=model, timeout=timeout, lane=lane)
        return sparse_of(reply)

    async def rerank(
        self,
        query: str,
        texts: Sequence[str],
        *,
        raw_scores: bool = False,
        top_n: int | None = None,
        truncate: bool | None = None,
        truncation_direction: Literal["right", "left"] = "right",
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[Ranked]:
        """Texts ranked by a cross-encoder's relevance to ``query``, highest first.

        Scores are the sigmoid of the model's logit unless ``raw_scores``; ``top_n``
        keeps the best n. Each hit's ``index`` points into ``texts``.
        """
        if isinstance(texts, str):
            raise ValidationError("`texts` must be a list of strings")
        if not texts:
            raise EmptyInputError("`texts` cannot be empty")
        params = _params(
            RerankParams, query=query, truncate=truncate, truncation_direction=truncation_direction
        )
        reply = await self.request("rerank", list(texts), params, model=model, timeout=timeout)
        logits, _ = scores_of(reply)
        return rank(logits, raw_scores=raw_scores, top_n=top_n)

    async def predict(
        self,
        inputs: str | Sequence[str | Sequence[str]],
        *,
        raw_scores: bool = False,
        truncate: bool | None = None,
        truncation_direction: Literal["right", "left"] = "right",
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[list[Prediction]]:
        """Classify texts or (text, text) pairs: per input, every label with its score
        (softmax over labels, sigmoid for one label, unless ``raw_scores``), best first.

        A single string or a single pair is one input.
        """
        items = predict_inputs(inputs)
        params = _params(PredictParams, truncate=truncate, truncation_direction=truncation_direction)
        reply = await self.request("predict", items, params, model=model, timeout=timeout)
        logits, labels = scores_of(reply)
        return predictions(logits, labels, raw_scores=raw_scores)

    async def embed_many(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        chunk_size: int = 64,
        max_in_flight: int = 16,
        lane: keys.Lane = "bulk",
        **params: Any,
    ) -> AsyncGenerator[np.ndarray, None]:
        """Embed a long stream of texts for ingestion.

        Texts are sent in chunks of ``chunk_size``; at most ``max_in_flight`` chunks are
        outstanding, so memory stays bounded whatever the input's size. Yields one
        (len(chunk), d) array per chunk, in input order. Chunks go to the bulk lane by
        default: workers serve interactive requests first, so a backfill never delays
        queries.
        """
        if chunk_size < 1 or max_in_flight < 1:
            raise ValueError("chunk_size and max_in_flight must be positive")
        pending: deque[asyncio.Task[np.ndarray]] = deque()
        try:
            async for chunk in _chunks(texts, chunk_size):
                pending.append(asyncio.create_task(self.embed(chunk, lane=lane, **params)))
                if len(pending) >= max_in_flight:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def predict_inputs(inputs: Any) -> list[Any]:
    """TEI's predict forms: a text, a [text, text] pair, or a list of texts and pairs.

    A list of exactly two strings is one pair, as in TEI.
    """
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    if not items:
        raise EmptyInputError("Batch is empty")
    if len(items) == 2 and all(isinstance(x, str) for x in items):
        return [list(items)]
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append(list(item))
        else:
            raise ValidationError("`inputs` must be texts or [text, text] pairs")
    return out


def _params(model: type[BaseModel], **values: Any) -> dict[str, Any]:
    """Validated job parameters, without the defaults (smaller jobs)."""
    try:
        # A copy: callers may add to it, and the cached dict is shared.
        return dict(_validated_params(model, tuple(sorted(values.items()))))
    except TypeError:  # an unhashable value: validate it uncached
        return _validate_params(model, values)


@functools.lru_cache(maxsize=256)
def _validated_params(model: type[BaseModel], values: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    # Programs send the same few parameter sets over and over: validate each once.
    return _validate_params(model, dict(values))


def _validate_params(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    try:
        return model(**values).model_dump(exclude_defaults=True)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        raise ValidationError(f"invalid parameter {first['loc'][0]}: {first['msg']}") from None


def raise_for_error(reply: Reply) -> Reply:
    """The reply itself when ok; otherwise its error, raised as the typed exception."""
    if not reply.ok:
        err = reply.error
        raise error_from_wire(err.code, err.message) if err else EmbedqError("request failed")
    return reply


def embeddings_of(reply: Reply) -> np.ndarray:
    """The vectors of an ``embed`` reply, or its error raised as the typed exception.

    For an ``embed_all`` reply: every token's vector, (total tokens × d); split them
    with ``reply.embed.token_counts``.
    """
    raise_for_error(reply)
    if reply.embed is None:
        raise ProtocolError("reply carries no embeddings")
    res = reply.embed
    return vectors_from_bytes(res.data, res.dtype, res.shape)


def sparse_of(reply: Reply) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per input of an embed_sparse reply: (int32 vocabulary indices, float32 weights)."""
    raise_for_error(reply)
    if reply.sparse is None:
        raise ProtocolError("reply carries no sparse vectors")
    out = []
    for vec in reply.sparse:
        indices = np.frombuffer(vec.indices, dtype="<i4").astype(np.int32)
        values = np.frombuffer(vec.values, dtype="<f4").astype(np.float32)
        if len(indices) != len(values):
            raise ProtocolError("sparse vector with mismatched indices and values")
        out.append((indices, values))
    return out


def scores_of(reply: Reply) -> tuple[np.ndarray, list[str]]:
    """Raw logits (inputs × labels) of a rerank or predict reply, with the label names."""
    raise_for_error(reply)
    if reply.scores is None:
        raise ProtocolError("reply carries no scores")
    res = reply.scores
    return vectors_from_bytes(res.data, res.dtype, res.shape), list(reply.labels or [])


async def _chunks(texts: Iterable[str] | AsyncIterable[str], size: int) -> AsyncIterator[list[str]]:
    chunk: list[str] = []
    if isinstance(texts, AsyncIterable):
        async for t in texts:
            chunk.append(t)
            if len(chunk) == size:
                yield chunk
                chunk = []
    else:
        for t in texts:
            chunk.append(t)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
