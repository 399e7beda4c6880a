"""A job while a worker holds it: its sequences, partial results and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from embedq.common.codec import vectors_to_bytes
from embedq.common.errors import EmbedqError
from embedq.common.wire import (
    SCORE_KINDS,
    EmbedAllParams,
    EmbedParams,
    EmbedResult,
    EmbedSparseParams,
    ErrorBody,
    Job,
    KindParams,
    Reply,
    ReplyMeta,
    SparseVector,
    TokenList,
    pack_reply,
    pack_result_reply,
)
from embedq.worker.postprocess import finish_vectors
from embedq.worker.stream import Delivery

# The typed params of the kinds a worker runs (validated at admission).
JobParams: TypeAlias = KindParams


@dataclass(eq=False)
class ActiveJob:
    delivery: Delivery
    job: Job
    params: JobParams
    received: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    token_counts: list[int] = field(default_factory=list)
    # embed: pooled rows (inputs × dim); embed_all: one (tokens × dim) array per input.
    pooled: np.ndarray | None = None
    token_rows: list[np.ndarray | None] | None = None
    # embed_sparse: one (indices, weights) pair per input.
    sparse_rows: list[tuple[np.ndarray, np.ndarray] | None] | None = None
    # tokenize / decode results, computed in the tokenizer thread.
    tokens: list[TokenList] | None = None
    texts: list[str] | None = None
    remaining: int = 0
    error: EmbedqError | None = None
    # Set once the job is handed to the replier, so it is answered exactly once.
    finished: bool = False
    # Label names of a classification head (rerank / predict replies).
    labels: list[str] | None = None
    # OpenTelemetry span of this job (continues the caller's trace), when tracing is on.
    span: Any = None
    # Wall-clock (ns) tokenization window, for the job's trace.
    tokenize_window: tuple[int, int] = (0, 0)

    @property
    def per_token(self) -> bool:
        return self.job.kind == "embed_all"

    def start(self, token_counts: list[int], dim: int) -> None:
        self.token_counts = token_counts
        self.remaining = len(token_counts)
        if self.per_token:
            self.token_rows = [None] * len(token_counts)
        elif self.job.kind == "embed_sparse":
            self.sparse_rows = [None] * len(token_counts)
        else:
            self.pooled = np.empty((len(token_counts), dim), dtype=np.float32)

    def meta_fields(self, worker: str) -> dict[str, Any]:
        """ReplyMeta's fields, as the wire carries them."""
        return {
            "worker": worker,
            "queue_ms": round(self.queue_ms, 3),
            "tokenize_ms": round(self.tokenize_ms, 3),
            "infer_ms": round(self.infer_ms, 3),
            "batch_size": self.batch_size,
            "tokens": sum(self.token_counts),
            "deliveries": self.delivery.deliveries,
        }

    def meta(self, worker: str) -> ReplyMeta:
        return ReplyMeta(**self.meta_fields(worker))

    def packed_reply(self, worker: str) -> bytes:
        """The reply's wire bytes: pooled embeddings and scores, the bulk of all replies,
        are packed without building the models; other kinds go through ``reply``."""
        if self.error is not None or self.pooled is None or self.token_rows is not None:
            return pack_reply(self.reply(worker))
        if self.job.kind in SCORE_KINDS:
            return pack_result_reply(
                self.job.id,
                "scores",
                dtype="float32",
                shape=(int(self.pooled.shape[0]), int(self.pooled.shape[1])),
                data=vectors_to_bytes(self.pooled, "float32"),
                token_counts=self.token_counts,
                meta=self.meta_fields(worker),
                labels=self.labels,
            )
        if self.job.kind != "embed" or not isinstance(self.params, EmbedParams):
            return pack_reply(self.reply(worker))
        vectors = finish_vectors(
            self.pooled, dimensions=self.params.dimensions, normalize=self.params.normalize
        )
        return pack_result_reply(
            self.job.id,
            "embed",
            dtype=self.params.encoding,
            shape=(int(vectors.shape[0]), int(vectors.shape[1])),
            data=vectors_to_bytes(vectors, self.params.encoding),
            token_counts=self.token_counts,
            meta=self.meta_fields(worker),
        )

    def reply(self, worker: str) -> Reply:
        if self.error is not None:
            return error_reply(self.job.id, self.error, self.meta(worker))
        meta = self.meta(worker)
        if self.tokens is not None:
            return Reply(id=self.job.id, ok=True, tokens=self.tokens, meta=meta)
        if self.texts is not None:
            return Reply(id=self.job.id, ok=True, texts=self.texts, meta=meta)
        if self.sparse_rows is not None:
            assert isinstance(self.params, EmbedSparseParams)
            top_k = self.params.top_k
            sparse: list[SparseVector] = []
            for row in self.sparse_rows:
                assert row is not None
                indices, values = row
                if self.params.threshold is not None:
                    above = values > self.params.threshold
                    indices, values = indices[above], values[above]
                if top_k is not None and len(values) > top_k:
                    keep = np.sort(np.argsort(-values, kind="stable")[:top_k])
                    indices, values = indices[keep], values[keep]
                sparse.append(
                    SparseVector(
                        indices=np.ascontiguousarray(indices, dtype="<i4").tobytes(),
                        values=np.ascontiguousarray(values, dtype="<f4").tobytes(),
                    )
                )
            return Reply(id=self.job.id, ok=True, sparse=sparse, meta=meta)
        if self.job.kind in SCORE_KINDS:
            assert self.pooled is not None
            scores = EmbedResult(
                dtype="float32",
                shape=(int(self.pooled.shape[0]), int(self.pooled.shape[1])),
                data=vectors_to_bytes(self.pooled, "float32"),
                token_counts=self.token_counts,
            )
            return Reply(id=self.job.id, ok=True, scores=scores, labels=self.labels, meta=meta)
        if self.token_rows is not None:
            assert isinstance(self.params, EmbedAllParams)
            rows = [r for r in self.token_rows if r is not None]
            vectors = np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float32)
            encoding = self.params.encoding
        else:
            assert self.pooled is not None and isinstance(self.params, EmbedParams)
            vectors = finish_vectors(
                self.pooled, dimensions=self.params.dimensions, normalize=self.params.normalize
            )
            encoding = self.params.encoding
        result = EmbedResult(
            dtype=encoding,
            shape=(int(vectors.shape[0]), int(vectors.shape[1])),
            data=vectors_to_bytes(vectors, encoding),
            token_counts=self.token_counts,
        )
        return Reply(id=self.job.id, ok=True, embed=result, meta=meta)


def error_reply(request_id: str, error: EmbedqError, meta: ReplyMeta | None) -> Reply:
    return Reply(id=request_id, ok=False, error=ErrorBody(code=error.code, message=error.message), meta=meta)
