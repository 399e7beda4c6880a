"""From a validated HTTP request to replies: admission, client-batch splitting, merging.

Admission is decided here, before anything is queued: an unknown model is 404, a model
with no live worker 503, a kind the model does not serve 424 (TEI's answer for the
wrong model type), and a full queue or gateway 429 at once, so callers never wait on a
queue that cannot drain in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedq.common.errors import (
    ModelNotServedError,
    ModelTypeError,
    OverloadedError,
    QueueUnavailableError,
    ValidationError,
)
from embedq.common.wire import Input, JobKind, Reply
from embedq.producer.async_client import AsyncClient, embeddings_of, raise_for_error, scores_of, sparse_of
from embedq.producer.gateway.config import GatewayConfig
from embedq.producer.gateway.directory import ModelDirectory, ModelView

_KIND_NAMES = {
    "rerank": "a re-ranker",
    "predict": "a classifier",
    "embed_sparse": "a SPLADE (sparse) model",
}


@dataclass(frozen=True)
class Outcome:
    """The replies of one HTTP request (one per job, in input order)."""

    view: ModelView
    replies: list[Reply]
    # Inputs of each job (the split of the request), in order.
    sizes: list[int]

    def vectors(self) -> np.ndarray:
        arrays = [embeddings_of(r) for r in self.replies]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    def scores(self) -> tuple[np.ndarray, list[str]]:
        """Raw logits of every input (inputs × labels) and the label names."""
        parts = [scores_of(r) for r in self.replies]
        logits = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts], axis=0)
        return logits, parts[0][1]

    def sparse(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [vec for r in self.replies for vec in sparse_of(r)]

    def token_counts(self) -> list[int]:
        """Tokens per input, for the kinds whose results carry them (embed, embed_all, scores)."""
        counts: list[int] = []
        for r in self.replies:
            result = r.embed or r.scores
            if result is not None:
                counts += result.token_counts
        return counts

    def mean_ms(self, field: str) -> float:
        """A timing averaged over the request's inputs (each job's figure covers its inputs)."""
        total = weight = 0.0
        for r, n in zip(self.replies, self.sizes, strict=True):
            if r.meta is not None:
                total += getattr(r.meta, field) * n
                weight += n
        return total / weight if weight else 0.0

    @property
    def tokens(self) -> int:
        return sum(r.meta.tokens for r in self.replies if r.meta is not None)

    @property
    def batch_size(self) -> int:
        return max((r.meta.batch_size for r in self.replies if r.meta is not None), default=0)


class Dispatcher:
    def __init__(self, client: AsyncClient, directory: ModelDirectory, config: GatewayConfig) -> None:
        self.client = client
        self.directory = directory
        self.config = config
        # Inputs this gateway has in flight (TEI's max_concurrent_requests semaphore).
        self.in_flight = 0

    async def resolve(self, name: str | None) -> ModelView:
        """The served model a request names (None: the gateway's default), after aliases."""
        name = self.config.served_name(name) if name else self.config.model
        view = await self.directory.lookup(name)
        if view is None and (name == self.config.model or not self.directory.redis_ok):
            # The gateway's own model before its first worker registers (or with Redis
            # unreachable): a 503 that clients retry, not a 404 they give up on.
            reason = (
                "the queue (Redis) cannot be reached"
                if not self.directory.redis_ok
                else f"no worker has registered model {name!r} yet"
            )
            raise QueueUnavailableError(reason)
        if view is None:
            served = ", ".join(sorted(self.directory.models)) or "none"
            raise ModelNotServedError(f"model {name!r} is not served here (served models: {served})")
        return view

    def admit(self, view: ModelView, kind: JobKind, n_inputs: int) -> None:
        if kind not in view.kinds:
            what = _KIND_NAMES.get(kind, f"a model serving {kind!r}")
            raise ModelTypeError(f"model {view.name!r} is {_article(view.model_type)} model, not {what}")
        if not self.directory.redis_ok:
            raise QueueUnavailableError("the queue (Redis) cannot be reached")
        if view.live_workers == 0:
            raise QueueUnavailableError(f"no live worker serves model {view.name!r}")
        if view.interactive_backlog >= self.config.max_queue_backlog:
            raise OverloadedError(
                f"Model is overloaded: {view.interactive_backlog} jobs queued for {view.name!r} "
                f"(limit {self.config.max_queue_backlog})"
            )
        # A request larger than the whole limit may run alone rather than never.
        if self.in_flight and self.in_flight + n_inputs > self.config.max_concurrent_requests:
            raise OverloadedError(
                f"Model is overloaded: {self.in_flight} inputs in flight in this gateway "
                f"(limit {self.config.max_concurrent_requests})"
            )

    def chunks(self, inputs: Sequence[Input]) -> list[list[Input]]:
        size = self.config.max_client_batch_size
        if len(inputs) <= size:
            return [list(inputs)]
        if self.config.client_batch_policy == "reject":
            raise ValidationError(f"batch size {len(inputs)} > maximum allowed batch size {size}")
        return [list(inputs[i : i + size]) for i in range(0, len(inputs), size)]

    async def run(
        self, kind: JobKind, inputs: Sequence[Input], params: dict[str, Any], *, model: str | None = None
    ) -> Outcome:
        view = await self.resolve(model)
        chunks = self.chunks(inputs)
        self.admit(view, kind, len(inputs))
        self.in_flight += len(inputs)
        try:
            replies = await self._gather(kind, view.name, chunks, params)
        finally:
            self.in_flight -= len(inputs)
        return Outcome(view=view, replies=replies, sizes=[len(c) for c in chunks])

    async def _gather(
        self, kind: JobKind, model: str, chunks: list[list[Input]], params: dict[str, Any]
    ) -> list[Reply]:
        timeout = self.config.request_timeout_s
        if len(chunks) == 1:
            return [
                raise_for_error(
                    await self.client.request(kind, chunks[0], params, model=model, timeout=timeout)
                )
            ]
        tasks = [
            asyncio.ensure_future(self.client.request(kind, c, params, model=model, timeout=timeout))
            for c in chunks
        ]
        try:
            replies = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        # The first failing chunk, in input order, decides the error.
        return [raise_for_error(r) for r in replies]


def _article(model_type: str) -> str:
    return f"an {model_type}" if model_type[:1] in "aeiou" else f"a {model_type}"
