"""Request bodies of the HTTP routes, with TEI's and OpenAI's field names and defaults.

Unknown fields are ignored, as TEI does: real clients send extra keys such as
``parameters`` or ``encoding_format`` at the top level.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from embedq.common.errors import EmptyInputError, ValidationError
from embedq.common.wire import Input

# A string, a list of strings, a list of token ids (one input) or a list of id lists.
InputsField = Annotated[
    Any,
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer"}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            ],
            "example": "What is Deep Learning?",
        }
    ),
]


def as_inputs(value: Any, field: str = "inputs") -> tuple[list[Input], bool]:
    """(inputs, is_batch) from TEI's input forms; raises the typed error TEI would."""
    if isinstance(value, str):
        return [value], False
    if not isinstance(value, list):
        raise ValidationError(f"`{field}` must be a string, a list of strings or a list of token ids")
    if not value:
        raise EmptyInputError("Batch is empty")
    if all(_is_id(x) for x in value):
        return [list(value)], False
    out: list[Input] = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and all(_is_id(x) for x in item):
            out.append(list(item))
        else:
            raise ValidationError(f"`{field}` must be a string, a list of strings or a list of token ids")
    return out, True


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Direction = Literal["right", "left", "Right", "Left"]


class _Truncation(_Body):
    truncate: bool | None = Field(default=None, description="null: the worker's --auto-truncate")
    truncation_direction: Direction = "right"

    @field_validator("truncation_direction", mode="after")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class EmbedRequest(_Truncation):
    inputs: InputsField
    prompt_name: str | None = None
    normalize: bool = True
    dimensions: int | None = Field(default=None, description="Matryoshka: keep the first N dimensions")


class EmbedAllRequest(_Truncation):
    inputs: InputsField
    prompt_name: str | None = None


class EmbedSparseRequest(_Truncation):
    inputs: InputsField
    prompt_name: str | None = None
    top_k: int | None = Field(default=None, ge=1, description="embedq: keep the k largest weights")
    threshold: float | None = Field(default=None, ge=0, description="embedq: drop weights at or below it")


class PredictRequest(_Truncation):
    inputs: Any = Field(description="a text, a [text, text] pair, or a batch of those")
    raw_scores: bool = False


class RerankRequest(_Truncation):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False


class CohereRerankRequest(_Body):
    """Cohere/Jina-style rerank: ``documents``, ``top_n`` and ``return_documents``."""

    query: str
    documents: list[str | dict[str, Any]]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    truncate: bool | None = None


class SimilarityInputs(_Body):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(_Truncation):
    prompt_name: str | None = None


class SimilarityRequest(_Body):
    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


class TokenizeRequest(_Body):
    inputs: InputsField
    add_special_tokens: bool = True
    prompt_name: str | None = None


class DecodeRequest(_Body):
    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True


class OpenAIEmbeddingsRequest(_Body):
    input: InputsField
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    EmbedRequest,
    EmbedAllRequest,
    EmbedSparseRequest,
    PredictRequest,
    RerankRequest,
    CohereRerankRequest,
    SimilarityRequest,
    TokenizeRequest,
    DecodeRequest,
    OpenAIEmbeddingsRequest,
    ErrorResponse,
)
