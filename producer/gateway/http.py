"""HTTP plumbing shared by the routes: bodies, JSON responses, errors, auth, headers."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedq.common.errors import AuthenticationError, EmbedqError, PayloadTooLargeError, ValidationError
from embedq.producer.gateway.dispatch import Outcome

M = TypeVar("M", bound=BaseModel)

# Routes that answer errors in OpenAI's shape.
OPENAI_PATHS = frozenset({"/v1/embeddings", "/embeddings", "/v1/models"})
# Routes that stay open when an API key is set (probes and scrapers).
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/ping"})


class JSONBytes(Response):
    media_type = "application/json"


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    # OPT_SERIALIZE_NUMPY writes float32 arrays straight from their buffer.
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return JSONBytes(body, status_code=status, headers=headers)


def error_body(path: str, message: str, error_type: str, code: str) -> dict[str, Any]:
    """TEI's error shape, or OpenAI's on the OpenAI routes."""
    if path in OPENAI_PATHS:
        return {"error": {"message": message, "type": error_type, "code": code}}
    return {"error": message, "error_type": error_type}


def error_response(exc: EmbedqError, path: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
    return json_response(error_body(path, exc.message, exc.tei_type, exc.code), exc.http_status, headers)


# Routing refusals (no such path, wrong method) by status: a type in TEI's PascalCase
# style and a snake_case code, as embedq's own errors carry.
_HTTP_TYPES = {404: ("NotFound", "not_found"), 405: ("MethodNotAllowed", "method_not_allowed")}


def http_error_response(status: int, detail: str, path: str, headers: Mapping[str, str] | None) -> Response:
    """A refusal from the router (Starlette's HTTPException) in the same error shapes."""
    error_type, code = _HTTP_TYPES.get(status, ("Http", "http_error"))
    return json_response(error_body(path, detail, error_type, code), status, headers)


async def read_json(request: Request, limit: int) -> Any:
    """The parsed JSON body, read up to ``limit`` bytes (whatever the Content-Type)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over the payload limit ({limit})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body is over the payload limit ({limit} bytes)")
    if not body:
        raise ValidationError("the request has no JSON body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}") from None


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        if err.get("type") == "missing":
            raise ValidationError(f"missing field `{where}`") from None
        raise ValidationError(f"invalid `{where}`: {err.get('msg', 'invalid value')}") from None


# TEI's response headers of the inference routes (the gateway's CORS exposes them all).
TIMING_HEADERS = (
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-compute-tokens",
    "x-total-time",
    "x-tokenization-time",
    "x-queue-time",
    "x-inference-time",
)


def timing_headers(outcome: Outcome, total_ms: float, characters: int) -> dict[str, str]:
    """TEI's x-* headers, in whole milliseconds as TEI writes them (means per input)."""
    queue = outcome.mean_ms("queue_ms")
    tokenize = outcome.mean_ms("tokenize_ms")
    infer = outcome.mean_ms("infer_ms")
    device = outcome.view.info.get("device", "cpu")
    return {
        "x-compute-type": "gpu" if device.startswith("cuda") else "cpu",
        "x-compute-time": str(round(queue + tokenize + infer)),
        "x-compute-characters": str(characters),
        "x-compute-tokens": str(outcome.tokens),
        "x-total-time": str(round(total_ms)),
        "x-tokenization-time": str(round(tokenize)),
        "x-queue-time": str(round(queue)),
        "x-inference-time": str(round(infer)),
    }


class ApiKeyMiddleware:
    """Every route but the public ones needs exactly ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        response = error_response(AuthenticationError("Unauthorized"), scope["path"])
        await response(scope, receive, send)
