"""The gateway's ASGI application: one SDK client, the model directory, the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError as PydanticValidationError
from pydantic.json_schema import models_json_schema
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedq.common import tracing
from embedq.common.errors import BackendError, EmbedqError, ValidationError
from embedq.common.ids import new_client_id
from embedq.common.settings import connect, redis_username
from embedq.producer.async_client import AsyncClient
from embedq.producer.gateway.config import GatewayConfig
from embedq.producer.gateway.directory import ModelDirectory
from embedq.producer.gateway.dispatch import Dispatcher
from embedq.producer.gateway.http import (
    TIMING_HEADERS,
    ApiKeyMiddleware,
    error_response,
    http_error_response,
)
from embedq.producer.gateway.metrics import GatewayMetrics
from embedq.producer.gateway.routes import VERSION, add_routes
from embedq.producer.gateway.schemas import REQUEST_MODELS

log = logging.getLogger(__name__)


class HotRoutes:
    """Serve the hot routes straight from the ASGI scope, skipping FastAPI's middleware
    and routing layers (measured: ~40% of the gateway's CPU per request); everything
    else (docs, OpenAPI, lifespan, 404s) goes to the FastAPI app."""

    def __init__(
        self,
        app: FastAPI,
        routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]],
        on_error: Callable[[Request, Exception], Awaitable[Response]],
    ) -> None:
        self.app = app
        self.routes = routes
        self.on_error = on_error
        # Resolved once: the tracer provider is installed before the app is built.
        self.tracer = tracing.tracer("embedq.gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is not None:
                request = Request(scope, receive)
                tracer = self.tracer
                if tracer is None:
                    response = await self._answer(handler, request)
                else:
                    # A server span continuing the caller's traceparent; the SDK puts it
                    # into the job, so the worker's spans join the same trace.
                    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                    name = f"{scope['method']} {scope['path']}"
                    with tracer.start_as_current_span(
                        name, context=tracing.extract(carrier), kind=tracing.SERVER
                    ):
                        response = await self._answer(handler, request)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, handler: Callable[[Request], Awaitable[Response]], request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            return await self.on_error(request, exc)


def create_app(config: GatewayConfig) -> ASGIApp:
    # One reply stream for the whole gateway process, however many requests.
    client = AsyncClient(
        model=config.model,
        timeout=config.request_timeout_s,
        client_id=new_client_id("gateway", user=redis_username(config.redis.url)),
        lease_client_id=False,  # random: no other client has it, so a start never waits
        redis_settings=config.redis,
        cache_ttl_s=config.embedding_cache_ttl_s,
    )
    directory = ModelDirectory(connect(config.redis, name="embedq-gateway-directory", max_connections=2))
    directory.refresh_s = config.refresh_s
    metrics = GatewayMetrics()
    metrics.watch_queues(directory)
    dispatcher = Dispatcher(client, directory, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        await directory.start()
        log.info("gateway serving %s (reply stream %s)", config.model, client.reply_stream)
        try:
            yield
        finally:
            # Bounded steps: a stop must not hang on a Redis that went away.
            for name, step in (
                ("directory", directory.close()),
                ("directory connection", directory.redis.aclose()),
                ("client", client.close()),
            ):
                try:
                    await asyncio.wait_for(step, timeout=10)
                except (TimeoutError, RedisError, OSError) as exc:
                    log.warning("closing the %s failed: %r", name, exc)

    app = FastAPI(
        title="embedq",
        version=VERSION,
        description="TEI- and OpenAI-compatible embeddings served by workers behind Redis Streams",
        docs_url="/docs",
        openapi_url="/api-doc/openapi.json",
        redoc_url=None,
        lifespan=lifespan,
    )

    async def on_embedq_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmbedqError)
        metrics.failed(exc.code)
        # The caller's mistakes at debug level; what operators must see (model failures,
        # overload, a queue that cannot answer) as warnings.
        if exc.http_status == 429:
            level = logging.INFO
        else:
            level = logging.DEBUG if exc.http_status < 424 else logging.WARNING
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, exc.http_status,
                exc.tei_type, exc.message)  # fmt: skip
        return error_response(exc, request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return await on_embedq_error(request, ValidationError(str(exc)))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return await on_embedq_error(request, BackendError(f"internal error: {type(exc).__name__}"))

    async def on_any(request: Request, exc: Exception) -> Response:
        if isinstance(exc, EmbedqError):
            return await on_embedq_error(request, exc)
        if isinstance(exc, PydanticValidationError):  # job parameters out of range
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "parameters"
            return await on_embedq_error(request, ValidationError(f"invalid `{where}`: {first.get('msg')}"))
        return await on_unexpected(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and wrong methods: TEI's error shape, not FastAPI's {"detail"}.
        assert isinstance(exc, StarletteHTTPException)
        return http_error_response(exc.status_code, str(exc.detail), request.url.path, exc.headers)

    app.add_exception_handler(EmbedqError, on_embedq_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)

    hot = add_routes(app, config, directory, dispatcher, metrics)
    _document_bodies(app)
    outer: ASGIApp = HotRoutes(app, hot, on_any)
    if config.api_key:
        outer = ApiKeyMiddleware(outer, api_key=config.api_key)
    if config.cors_allow_origin:
        # Outermost, so that a 401 carries the CORS headers too (a browser would report
        # a CORS failure instead of the refusal), and preflights need no key.
        outer = CORSMiddleware(
            outer,
            allow_origins=list(config.cors_allow_origin),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=list(TIMING_HEADERS),
        )
    return outer


def _document_bodies(app: FastAPI) -> None:
    """Routes parse their own bodies (for speed and TEI's error shapes); their schemas
    still belong in the OpenAPI document."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        _, defs = models_json_schema(
            [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
