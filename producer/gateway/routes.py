"""The gateway's routes: TEI's API, OpenAI's embeddings API and the Cohere-style rerank."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

import numpy as np
from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from embedq.common.errors import EmptyInputError, ModelTypeError, ValidationError
from embedq.common.scores import predictions, rank
from embedq.common.wire import (
    EmbedAllParams,
    EmbedParams,
    EmbedSparseParams,
    Input,
    PredictParams,
    RerankParams,
    TokenizeParams,
    TruncationDirection,
)
from embedq.producer.async_client import predict_inputs
from embedq.producer.gateway.config import GatewayConfig
from embedq.producer.gateway.directory import ModelDirectory, ModelView
from embedq.producer.gateway.dispatch import Dispatcher, Outcome
from embedq.producer.gateway.http import json_response, read_json, timing_headers, validate
from embedq.producer.gateway.metrics import GatewayMetrics
from embedq.producer.gateway.schemas import (
    CohereRerankRequest,
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    EmbedSparseRequest,
    OpenAIEmbeddingsRequest,
    PredictRequest,
    RerankRequest,
    SimilarityRequest,
    TokenizeRequest,
    as_inputs,
)

log = logging.getLogger(__name__)

try:
    VERSION = version("embedq")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0"

Handler = Callable[[Request], Awaitable[Response]]


def _body_doc(model: type[Any]) -> dict[str, Any]:
    """OpenAPI for a route that parses its own body (see app.openapi)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _characters(inputs: list[Input], query: str | None = None) -> int:
    """x-compute-characters as TEI counts it: every text of a pair, the query once per
    pair it is in, and one per token id of an input given as ids."""
    total = len(query) * len(inputs) if query else 0
    for x in inputs:
        if isinstance(x, str):
            total += len(x)
        else:  # a [text, text] pair, or token ids
            total += sum(len(t) if isinstance(t, str) else 1 for t in x)
    return total


def _check_dimensions(dimensions: int | None, view: ModelView) -> None:
    if dimensions is None:
        return
    if dimensions < 1:
        raise ValidationError("`dimensions` must be a positive integer")
    width = view.int_field("dim")
    if width and dimensions > width:
        raise ValidationError(
            f"The number of `dimensions` requested ({dimensions}) is greater than "
            f"the model's embedding size ({width})"
        )


def _direction(value: str) -> TruncationDirection:
    # The request schemas also accept "Right"/"Left", and lowercase them when validating.
    return cast(TruncationDirection, value)


def _rerank_params(query: str, truncate: bool | None, direction: str) -> dict[str, Any]:
    return RerankParams(
        query=query,
        truncate=truncate,
        truncation_direction=_direction(direction),
    ).model_dump(exclude_defaults=True)


def _document_text(doc: str | dict[str, Any]) -> str:
    """Cohere/Jina documents: a string, or an object with a ``text`` field."""
    if isinstance(doc, str):
        return doc
    text = doc.get("text")
    if not isinstance(text, str):
        raise ValidationError("each document must be a string or an object with a `text` string")
    return text


def add_routes(
    app: FastAPI,
    config: GatewayConfig,
    directory: ModelDirectory,
    dispatcher: Dispatcher,
    metrics: GatewayMetrics,
) -> dict[tuple[str, str], Handler]:
    """Register the routes on ``app`` (for the OpenAPI document and the slow path) and
    return the hot ones by (method, path), for the gateway's direct dispatch."""
    hot: dict[tuple[str, str], Handler] = {}

    def post(path: str, body: type[Any], summary: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            app.add_api_route(
                path,
                fn,
                methods=["POST"],
                summary=summary,
                openapi_extra=_body_doc(body),
                response_model=None,
            )
            hot[("POST", path)] = fn
            return fn

        return register

    def counted_inputs(family: str, value: Any, field: str = "inputs") -> tuple[list[Input], bool]:
        """``as_inputs``, counting the request first as TEI does: an empty batch is a
        batch request that failed, in te_request_count and te_request_failure both."""
        try:
            inputs, batch = as_inputs(value, field)
        except EmptyInputError:
            metrics.received(family, True)
            raise
        metrics.received(family, batch)
        return inputs, batch

    def finish(
        family: str,
        outcome: Outcome,
        started: float,
        body: Any,
        inputs: list[Input],
        batch: bool,
        query: str | None = None,
    ) -> Response:
        total_s = time.perf_counter() - started
        log.debug(
            "%s: %d inputs, %d tokens in %.1f ms (queue %.1f, inference %.1f)",
            family,
            len(inputs),
            outcome.tokens,
            total_s * 1000,
            outcome.mean_ms("queue_ms"),
            outcome.mean_ms("infer_ms"),
        )
        metrics.succeeded(
            family,
            batch=batch,
            total_s=total_s,
            tokenize_s=outcome.mean_ms("tokenize_ms") / 1000,
            queue_s=outcome.mean_ms("queue_ms") / 1000,
            infer_s=outcome.mean_ms("infer_ms") / 1000,
            tokens=outcome.tokens,
            batch_size=outcome.batch_size,
        )
        headers = timing_headers(outcome, total_s * 1000, _characters(inputs, query))
        return json_response(body, headers=headers)

    def embed_params(req: EmbedRequest, view: ModelView) -> dict[str, Any]:
        _check_dimensions(req.dimensions, view)
        return EmbedParams(
            normalize=req.normalize,
            truncate=req.truncate,
            truncation_direction=_direction(req.truncation_direction),
            prompt_name=req.prompt_name,
            dimensions=req.dimensions,
        ).model_dump(exclude_defaults=True)

    # ------------------------------------------------------------------ TEI routes
    @post("/embed", EmbedRequest, "Pooled embeddings")
    async def embed(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(EmbedRequest, await read_json(request, config.payload_limit))
        inputs, batch = counted_inputs("embed", req.inputs)
        params = embed_params(req, await dispatcher.resolve(None))
        outcome = await dispatcher.run("embed", inputs, params)
        return finish("embed", outcome, started, outcome.vectors(), inputs, batch)

    @post("/embed_all", EmbedAllRequest, "One embedding per token, no pooling")
    async def embed_all(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(EmbedAllRequest, await read_json(request, config.payload_limit))
        inputs, batch = counted_inputs("embed", req.inputs)
        params = EmbedAllParams(
            truncate=req.truncate,
            truncation_direction=_direction(req.truncation_direction),
            prompt_name=req.prompt_name,
        ).model_dump(exclude_defaults=True)
        outcome = await dispatcher.run("embed_all", inputs, params)
        rows = outcome.vectors()
        bounds = np.cumsum([0, *outcome.token_counts()])
        per_input = [rows[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
        return finish("embed", outcome, started, per_input, inputs, batch)

    @post("/embed_sparse", EmbedSparseRequest, "SPLADE sparse embeddings")
    async def embed_sparse(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(EmbedSparseRequest, await read_json(request, config.payload_limit))
        inputs, batch = counted_inputs("embed", req.inputs)
        params = EmbedSparseParams(
            truncate=req.truncate,
            truncation_direction=_direction(req.truncation_direction),
            prompt_name=req.prompt_name,
            top_k=req.top_k,
            threshold=req.threshold,
        ).model_dump(exclude_defaults=True)
        outcome = await dispatcher.run("embed_sparse", inputs, params)
        body = [
            [{"index": int(i), "value": float(v)} for i, v in zip(idx.tolist(), val.tolist(), strict=True)]
            for idx, val in outcome.sparse()
        ]
        return finish("embed", outcome, started, body, inputs, batch)

    @post("/rerank", RerankRequest, "Cross-encoder scores of texts against a query")
    async def rerank(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(RerankRequest, await read_json(request, config.payload_limit))
        metrics.received("predict", True)  # TEI counts every rerank as a batch, empty ones too
        if not req.texts:
            raise EmptyInputError("`texts` cannot be empty")
        params = _rerank_params(req.query, req.truncate, req.truncation_direction)
        texts: list[Input] = list(req.texts)
        outcome = await dispatcher.run("rerank", texts, params)
        logits, _ = outcome.scores()
        body = [
            {"index": hit.index, "score": hit.score, "text": req.texts[hit.index]}
            if req.return_text
            else {"index": hit.index, "score": hit.score}
            for hit in rank(logits, raw_scores=req.raw_scores)
        ]
        return finish("predict", outcome, started, body, texts, True, req.query)

    @post("/v1/rerank", CohereRerankRequest, "Rerank in the Cohere/Jina shape (top_n, return_documents)")
    async def rerank_v1(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(CohereRerankRequest, await read_json(request, config.payload_limit))
        metrics.received("predict", True)
        if not req.documents:
            raise EmptyInputError("`documents` cannot be empty")
        docs: list[Input] = [_document_text(d) for d in req.documents]
        view = await dispatcher.resolve(req.model)
        params = _rerank_params(req.query, req.truncate, "right")
        outcome = await dispatcher.run("rerank", docs, params, model=view.name)
        logits, _ = outcome.scores()
        results = []
        for hit in rank(logits, top_n=req.top_n):
            item: dict[str, Any] = {"index": hit.index, "relevance_score": hit.score}
            if req.return_documents:
                item["document"] = {"text": docs[hit.index]}
            results.append(item)
        body = {
            "id": uuid.uuid4().hex,
            "model": req.model or view.name,
            "results": results,
            "usage": {"total_tokens": sum(outcome.token_counts())},
        }
        return finish("predict", outcome, started, body, docs, True, req.query)

    @post("/predict", PredictRequest, "Sequence classification of texts or text pairs")
    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(PredictRequest, await read_json(request, config.payload_limit))
        single = isinstance(req.inputs, str) or (
            isinstance(req.inputs, list)
            and len(req.inputs) == 2
            and all(isinstance(x, str) for x in req.inputs)
        )
        metrics.received("predict", not single)
        if isinstance(req.inputs, list) and not req.inputs:
            raise EmptyInputError("Batch is empty")
        if not isinstance(req.inputs, str | list):
            raise ValidationError("`inputs` must be a text, a [text, text] pair, or a list of those")
        items: list[Input] = predict_inputs(req.inputs)
        params = PredictParams(
            truncate=req.truncate,
            truncation_direction=_direction(req.truncation_direction),
        ).model_dump(exclude_defaults=True)
        outcome = await dispatcher.run("predict", items, params)
        logits, labels = outcome.scores()
        preds = [
            [{"score": p.score, "label": p.label} for p in row]
            for row in predictions(logits, labels, raw_scores=req.raw_scores)
        ]
        return finish("predict", outcome, started, preds[0] if single else preds, items, not single)

    @post("/similarity", SimilarityRequest, "Cosine similarity of sentences to a source sentence")
    async def similarity(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(SimilarityRequest, await read_json(request, config.payload_limit))
        metrics.received("embed", True)
        if not req.inputs.sentences:
            raise EmptyInputError("`sentences` cannot be empty")
        p = req.parameters
        params = EmbedParams(
            normalize=True,
            truncate=p.truncate if p else None,
            truncation_direction=_direction(p.truncation_direction if p else "right"),
            prompt_name=p.prompt_name if p else None,
        ).model_dump(exclude_defaults=True)
        inputs: list[Input] = [req.inputs.source_sentence, *req.inputs.sentences]
        outcome = await dispatcher.run("embed", inputs, params)
        vectors = outcome.vectors()
        scores = vectors[1:] @ vectors[0]
        return finish("embed", outcome, started, scores, inputs, True)

    @post("/tokenize", TokenizeRequest, "Tokens with their text and byte offsets")
    async def tokenize(request: Request) -> Response:
        req = validate(TokenizeRequest, await read_json(request, config.payload_limit))
        inputs, _batch = as_inputs(req.inputs)
        metrics.received("request", len(inputs) > 1)
        params = TokenizeParams(add_special_tokens=req.add_special_tokens, prompt_name=req.prompt_name)
        outcome = await dispatcher.run("tokenize", inputs, params.model_dump(exclude_defaults=True))
        body = [
            [
                {
                    "id": tid,
                    "text": text,
                    "special": special,
                    "start": None if start < 0 else start,
                    "stop": None if stop < 0 else stop,
                }
                for tid, text, special, start, stop in zip(
                    tl.ids, tl.texts, tl.special, tl.starts, tl.stops, strict=True
                )
            ]
            for r in outcome.replies
            for tl in (r.tokens or [])
        ]
        return json_response(body)

    @post("/decode", DecodeRequest, "Token ids back to text")
    async def decode(request: Request) -> Response:
        req = validate(DecodeRequest, await read_json(request, config.payload_limit))
        ids: list[Input]
        if req.ids and isinstance(req.ids[0], list):
            ids = [list(x) for x in req.ids]
        else:
            # One id list: mypy does not narrow the union on ids[0].
            ids = [list(cast("list[int]", req.ids))]
        if not ids or any(not x for x in ids):
            raise EmptyInputError("`ids` cannot be empty")
        metrics.received("request", len(ids) > 1)
        params = {} if req.skip_special_tokens else {"skip_special_tokens": False}
        outcome = await dispatcher.run("decode", ids, params)
        return json_response([t for r in outcome.replies for t in (r.texts or [])])

    @post("/", EmbedRequest, "Routed by the model's kind: /embed, /rerank or /predict")
    async def root(request: Request) -> Response:
        view = await dispatcher.resolve(None)
        route = {"embedding": embed, "reranker": rerank, "classifier": predict, "splade": embed_sparse}.get(
            view.model_type
        )
        if route is None:
            raise ModelTypeError(f"model {view.name!r} is a {view.model_type} model, which / cannot route")
        return await route(request)

    # --------------------------------------------------------------- OpenAI routes
    async def openai_embeddings(request: Request) -> Response:
        started = time.perf_counter()
        req = validate(OpenAIEmbeddingsRequest, await read_json(request, config.payload_limit))
        inputs, batch = counted_inputs("embed", req.input, field="input")
        view = await dispatcher.resolve(req.model)
        _check_dimensions(req.dimensions, view)
        params = EmbedParams(dimensions=req.dimensions).model_dump(exclude_defaults=True)
        outcome = await dispatcher.run("embed", inputs, params, model=view.name)
        vectors = outcome.vectors()
        if req.encoding_format == "base64":
            vectors = vectors.astype("<f4", copy=False)
            items: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
        else:
            items = list(vectors)
        tokens = sum(outcome.token_counts())
        body = {
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(items)],
            "model": req.model or view.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return finish("embed", outcome, started, body, inputs, batch)

    for path in ("/v1/embeddings", "/embeddings"):
        post(path, OpenAIEmbeddingsRequest, "OpenAI-compatible embeddings (float or base64)")(
            openai_embeddings
        )

    @app.get("/v1/models", summary="Served models (OpenAI shape)")
    async def list_models() -> Response:
        live = {name for name, view in directory.models.items() if view.live_workers}
        # Aliases of live models too: a client may check that the model it names is listed.
        names = live | {alias for alias, target in config.model_aliases if target in live}
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "embedq"} for name in sorted(names)]
        return json_response({"object": "list", "data": data})

    # ------------------------------------------------------------ info and probes
    @app.get("/info", summary="Model and limits")
    async def info() -> Response:
        view = await dispatcher.resolve(None)
        i = view.info
        labels = view.labels
        heads = {
            "id2label": {str(n): x for n, x in enumerate(labels)},
            "label2id": {x: n for n, x in enumerate(labels)},
        }
        model_type = (
            {"embedding": {"pooling": i.get("pooling", "mean")}}
            if view.model_type == "embedding"
            else {"embedding": {"pooling": "splade"}}
            if view.model_type == "splade"
            else {view.model_type: heads}
        )
        return json_response(
            {
                "model_id": view.model_id,
                "model_sha": i.get("revision") or None,
                "model_dtype": i.get("dtype", "float32"),
                "served_model_name": view.name,
                "model_type": model_type,
                "max_concurrent_requests": config.max_concurrent_requests,
                "max_input_length": view.int_field("max_input_length"),
                "max_batch_tokens": view.int_field("max_batch_tokens"),
                "max_batch_requests": view.int_field("max_batch_requests") or None,
                "max_client_batch_size": config.max_client_batch_size,
                "auto_truncate": i.get("auto_truncate", "true") == "true",
                "tokenization_workers": 1,
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            }
        )

    async def health(request: Request) -> Response:
        try:
            live = await directory.live_workers(config.model)
        except RedisError:
            live = 0
        if live:
            return Response(status_code=200)
        return json_response({"error": "unhealthy", "error_type": "Unhealthy"}, 503)

    for path in ("/health", "/ping"):
        app.add_api_route(path, health, methods=["GET"], summary="200 when a live worker serves the model")
        hot[("GET", path)] = health

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        view = directory.models.get(config.model)
        metrics.queue_size.set(view.backlog if view else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return hot
