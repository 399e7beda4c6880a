"""Versioned wire schema of jobs and replies (validated with pydantic).

A job is one msgpack map in the field ``j`` of an entry of the model's request stream;
a reply is one msgpack map in the field ``r`` of the caller's reply stream.
Every kind of work shares the Job envelope; its ``params`` are validated per kind
with the model in ``PARAMS_BY_KIND``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from embedq.common.codec import DEFAULT_LIMITS, DecodeLimits, decode, encode
from embedq.common.errors import ProtocolError

WIRE_VERSION: Literal[1] = 1
# Protocol ceiling on inputs per job, checked before any element is validated (a worker
# may set a lower limit). Keeps a hostile entry from costing seconds and gigabytes.
MAX_JOB_INPUTS = 16_384

JobKind = Literal["embed", "embed_all", "embed_sparse", "rerank", "predict", "tokenize", "decode"]
ModelType = Literal["embedding", "classifier", "reranker", "splade"]
# The kinds a worker runs for each type of model; other kinds get a BackendError (TEI's
# 424 for a route of the wrong model type).
KINDS_BY_MODEL_TYPE: dict[str, tuple[JobKind, ...]] = {
    "embedding": ("embed", "embed_all", "tokenize", "decode"),
    "reranker": ("rerank", "predict", "tokenize", "decode"),
    "classifier": ("predict", "tokenize", "decode"),
    "splade": ("embed_sparse", "tokenize", "decode"),
}
# Kinds whose reply carries one row of raw logits per input (Reply.scores).
SCORE_KINDS: tuple[JobKind, ...] = ("rerank", "predict")
TruncationDirection = Literal["right", "left"]

# An input is a text or, as TEI allows, a list of token ids; for `predict`, also a
# [text, text] pair.
Input = str | list[int] | list[str]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TruncationParams(_Wire):
    """How inputs over the model's limit are handled; defaults are TEI's."""

    # None: the worker's auto-truncate setting decides.
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _lower_direction(cls, value: Any) -> Any:
        # TEI also accepts "Right"/"Left".
        return value.lower() if isinstance(value, str) else value


class EmbedAllParams(TruncationParams):
    """Parameters of an ``embed_all`` job (one vector per token, no pooling), and the
    encoding parameters every embedding kind shares."""

    prompt_name: str | None = Field(default=None, max_length=200)
    # Precision of the vectors on the wire (the model always pools in float32).
    encoding: Literal["float32", "float16"] = "float32"


class EmbedSparseParams(TruncationParams):
    """Parameters of an ``embed_sparse`` job (SPLADE)."""

    prompt_name: str | None = Field(default=None, max_length=200)
    # Keep only the k largest weights of each vector (None: every non-zero weight).
    top_k: int | None = Field(default=None, ge=1)
    # Drop weights at or below this value (None: keep every non-zero weight).
    threshold: float | None = Field(default=None, ge=0)


class EmbedParams(EmbedAllParams):
    """Parameters of an ``embed`` job: pooled vectors."""

    normalize: bool = True
    dimensions: int | None = Field(default=None, ge=1)


class RerankParams(TruncationParams):
    """A ``rerank`` job scores each input against ``query`` (one pair per input)."""

    # May be empty, as in TEI: only a pair with both texts empty is refused.
    query: str


class PredictParams(TruncationParams):
    """A ``predict`` job classifies each input: a text or a [text, text] pair."""


class TokenizeParams(_Wire):
    add_special_tokens: bool = True
    prompt_name: str | None = Field(default=None, max_length=200)


class DecodeParams(_Wire):
    skip_special_tokens: bool = True


# The params model of some job kind.
KindParams: TypeAlias = (
    EmbedParams
    | EmbedAllParams
    | EmbedSparseParams
    | RerankParams
    | PredictParams
    | TokenizeParams
    | DecodeParams
)

PARAMS_BY_KIND: dict[str, type[KindParams]] = {
    "embed": EmbedParams,
    "embed_all": EmbedAllParams,
    "embed_sparse": EmbedSparseParams,
    "rerank": RerankParams,
    "predict": PredictParams,
    "tokenize": TokenizeParams,
    "decode": DecodeParams,
}


class Job(_Wire):
    v: Literal[1] = WIRE_VERSION
    id: str = Field(min_length=1, max_length=64)
    kind: JobKind
    model: str = Field(min_length=1, max_length=200)
    inputs: list[Input]
    params: dict[str, Any] = Field(default_factory=dict)
    # The caller's reply stream key.
    reply_to: str = Field(min_length=1, max_length=256)
    created_ms: int = Field(ge=0)
    # Absolute unix-ms deadline; 0 means none.
    deadline_ms: int = Field(default=0, ge=0)
    # W3C trace-context carrier (traceparent, tracestate).
    trace: dict[str, str] = Field(default_factory=dict, max_length=8)

    @field_validator("inputs", mode="before")
    @classmethod
    def _bounded_inputs(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_JOB_INPUTS:
            raise ValueError(f"at most {MAX_JOB_INPUTS} inputs per job, got {len(value)}")
        return value

    def embed_params(self) -> EmbedParams:
        return EmbedParams.model_validate(self.params)

    def typed_params(self) -> KindParams:
        """The params validated with the model of this job's kind (KeyError if it has none)."""
        return PARAMS_BY_KIND[self.kind].model_validate(self.params)


class ErrorBody(_Wire):
    code: str
    message: str


class ReplyMeta(_Wire):
    """Tracing figures of one job, the numbers TEI returns as x-*-time headers."""

    worker: str
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    tokens: int = 0
    deliveries: int = 1


class EmbedResult(_Wire):
    dtype: Literal["float32", "float16"]
    shape: tuple[int, int]
    data: bytes
    # Real tokens per input (after truncation, special tokens included).
    token_counts: list[int]


class TokenList(_Wire):
    """The tokens of one input, as parallel arrays (cheap to pack for long inputs).

    ``starts``/``stops`` are UTF-8 byte offsets into the (prompted) text, -1 for tokens
    that do not come from the text (special tokens).
    """

    ids: list[int]
    texts: list[str]
    special: list[bool]
    starts: list[int]
    stops: list[int]


class SparseVector(_Wire):
    """The non-zero weights of one input: little-endian int32 indices, float32 values."""

    indices: bytes
    values: bytes


class Reply(_Wire):
    v: Literal[1] = WIRE_VERSION
    id: str
    ok: bool
    error: ErrorBody | None = None
    # embed: (inputs × dim); embed_all: (all tokens × dim), split by token_counts.
    embed: EmbedResult | None = None
    # rerank / predict: raw logits, (inputs × labels), with the labels' names.
    scores: EmbedResult | None = None
    labels: list[str] | None = None
    sparse: list[SparseVector] | None = None
    tokens: list[TokenList] | None = None
    texts: list[str] | None = None
    meta: ReplyMeta | None = None


def pack_job(job: Job) -> bytes:
    return encode(job.model_dump(mode="python"))


def pack_reply(reply: Reply) -> bytes:
    return encode(reply.model_dump(mode="python", exclude_none=True))


def pack_result_reply(
    request_id: str,
    field: Literal["embed", "scores"],
    *,
    dtype: Literal["float32", "float16"],
    shape: tuple[int, int],
    data: bytes,
    token_counts: list[int],
    meta: dict[str, Any],
    labels: list[str] | None = None,
) -> bytes:
    """The bytes of ``pack_reply(Reply(ok=True, <field>=EmbedResult(...), ...))``, built
    without the models: a worker's own values need no validation, and this is its hot
    path (~2 µs a reply against ~9). ``meta`` holds ReplyMeta's fields."""
    result = {"dtype": dtype, "shape": shape, "data": data, "token_counts": token_counts}
    reply: dict[str, Any] = {"v": WIRE_VERSION, "id": request_id, "ok": True, field: result}
    if labels is not None:
        reply["labels"] = labels
    reply["meta"] = meta
    return encode(reply)


def unpack_job(raw: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Job:
    """Decode and validate a job; raises ProtocolError with a readable reason."""
    obj = decode(raw, limits)
    try:
        return Job.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError(f"invalid job: {_first_error(exc)}") from exc


def unpack_reply(raw: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Reply:
    obj = decode(raw, limits)
    try:
        return Reply.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError(f"invalid reply: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "message"
    return f"{where}: {err.get('msg', 'invalid')}"
