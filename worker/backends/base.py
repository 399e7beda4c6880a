"""The contract between the worker's queue logic and a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from embedq.common.wire import KINDS_BY_MODEL_TYPE, JobKind, ModelType
from embedq.worker.tokenization import TextTokenizer


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """What a worker publishes about the model it serves (also feeds /info)."""

    model_id: str
    dim: int
    max_input_length: int
    pooling: str
    dtype: str
    device: str
    model_type: ModelType = "embedding"
    # Classification heads: label names by logit index.
    id2label: dict[int, str] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # True when the backend runs sequences without padding (token budget = sum).
    packed: bool = False
    # Batches are padded up to length buckets with this min_step (worker/buckets.py);
    # 0: to the batch's longest sequence.
    length_step: int = 0
    # Identity of the weights (model_files.fingerprint): two workers serving one name
    # must serve the same model.
    revision: str = ""

    @property
    def kinds(self) -> tuple[JobKind, ...]:
        return KINDS_BY_MODEL_TYPE[self.model_type]

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]


class Backend(Protocol):
    # Read-only members: a backend may hold a more specific tokenizer (FakeTokenizer,
    # HFTokenizer), which a settable `tokenizer: TextTokenizer` would not accept.
    @property
    def description(self) -> ModelDescription: ...

    @property
    def tokenizer(self) -> TextTokenizer: ...

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled, un-normalised float32 vectors (len(batch) × dim) for token-id sequences."""
        ...

    def embed_all(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One float32 (len(seq) × dim) array of token vectors per sequence, no pooling."""
        ...

    def predict(self, batch: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Raw float32 logits (len(batch) × labels) of a classification head."""
        ...

    def embed_sparse(self, batch: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """SPLADE vectors: per sequence, (int32 vocabulary indices, float32 weights > 0)."""
        ...

    def warmup(self) -> None:
        """Run the model once so the first request is not slow."""
        ...
