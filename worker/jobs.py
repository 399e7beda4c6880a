"""A job while a worker holds it: its sequences, partial results and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from embedq.common.codec import vectors_to_bytes
from embedq.common.errors import EmbedqError
from embedq.common.wire import EmbedParams, EmbedResult, ErrorBody, Job, Reply, ReplyMeta
from embedq.worker.postprocess import finish_vectors
from embedq.worker.stream import Delivery


@dataclass(eq=False)
class ActiveJob:
    delivery: Delivery
    job: Job
    params: EmbedParams
    received: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    token_counts: list[int] = field(default_factory=list)
    pooled: np.ndarray | None = None
    remaining: int = 0
    error: EmbedqError | None = None
    # Set once the job is handed to the replier, so it is answered exactly once.
    finished: bool = False

    def start(self, token_counts: list[int], dim: int) -> None:
        self.token_counts = token_counts
        self.remaining = len(token_counts)
        self.pooled = np.empty((len(token_counts), dim), dtype=np.float32)

    def meta(self, worker: str) -> ReplyMeta:
        return ReplyMeta(
            worker=worker,
            queue_ms=round(self.queue_ms, 3),
            tokenize_ms=round(self.tokenize_ms, 3),
            infer_ms=round(self.infer_ms, 3),
            batch_size=self.batch_size,
            tokens=sum(self.token_counts),
            deliveries=self.delivery.deliveries,
        )

    def reply(self, worker: str) -> Reply:
        if self.error is not None:
            return error_reply(self.job.id, self.error, self.meta(worker))
        assert self.pooled is not None
        vectors = finish_vectors(
            self.pooled, dimensions=self.params.dimensions, normalize=self.params.normalize
        )
        result = EmbedResult(
            dtype=self.params.encoding,
            shape=(int(vectors.shape[0]), int(vectors.shape[1])),
            data=vectors_to_bytes(vectors, self.params.encoding),
            token_counts=self.token_counts,
        )
        return Reply(id=self.job.id, ok=True, embed=result, meta=self.meta(worker))


def error_reply(request_id: str, error: EmbedqError, meta: ReplyMeta | None) -> Reply:
    return Reply(id=request_id, ok=False, error=ErrorBody(code=error.code, message=error.message), meta=meta)
