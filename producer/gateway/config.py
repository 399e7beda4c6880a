"""Gateway configuration: built once from flags and environment, frozen, passed down.

Flags TEI has keep TEI's names and environment variables (``--payload-limit`` →
PAYLOAD_LIMIT); embedq's own flags read EMBEDQ_* variables.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embedq.common.keys import check_model_name
from embedq.common.settings import DEFAULT_MODEL_NAME, DEFAULT_REDIS_URL, RedisSettings

ClientBatchPolicy = Literal["split", "reject"]


class GatewayConfigError(Exception):
    """The gateway cannot start with these settings."""


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    redis: RedisSettings = field(default_factory=RedisSettings)
    hostname: str = "0.0.0.0"
    port: int = 8080
    # The model TEI's routes use; /v1/embeddings may name any served model.
    model: str = DEFAULT_MODEL_NAME
    api_key: str | None = None
    payload_limit: int = 2_000_000
    max_client_batch_size: int = 32
    client_batch_policy: ClientBatchPolicy = "split"
    # Inputs in flight in this gateway (TEI's semaphore); a larger request runs alone.
    max_concurrent_requests: int = 512
    # 429 at once when the model's queue holds this many jobs (waiting + running).
    max_queue_backlog: int = 2048
    # Seconds an /embed result stays in the Redis embedding cache (0: no cache).
    embedding_cache_ttl_s: int = 0
    request_timeout_s: float = 60.0
    cors_allow_origin: tuple[str, ...] = ()
    # How often the gateway re-reads served models, heartbeats and backlogs.
    refresh_s: float = 0.25
    # Other names for served models in a request's `model` (OpenAI clients send their
    # own, such as text-embedding-3-small): (alias, served name) pairs.
    model_aliases: tuple[tuple[str, str], ...] = ()

    def served_name(self, name: str) -> str:
        """The served model a request's `model` names, after aliases."""
        for alias, target in self.model_aliases:
            if alias == name:
                return target
        return name


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name.upper().replace("-", "_"), default)


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--redis-url", default=_env("embedq_redis_url", DEFAULT_REDIS_URL))
    a("--hostname", default=_env("hostname", "0.0.0.0"), help="address to listen on")
    a("--port", type=int, default=int(_env("port", "8080") or 8080))
    a(
        "--model",
        default=_env("embedq_model", DEFAULT_MODEL_NAME),
        help="served model name TEI's routes use (default: %(default)s)",
    )
    a("--api-key", default=_env("api_key"), help="require `Authorization: Bearer <key>`")
    a(
        "--api-key-file",
        default=_env("embedq_api_key_file"),
        help="read the API key from this file (a Docker or Kubernetes secret) instead",
    )
    a("--payload-limit", type=int, default=int(_env("payload_limit", "2000000") or 2_000_000))
    a("--max-client-batch-size", type=int, default=int(_env("max_client_batch_size", "32") or 32))
    a(
        "--client-batch-policy",
        choices=["split", "reject"],
        default=_env("embedq_client_batch_policy", "split"),
        help="larger batches: split across jobs and merge in order, or reject with 422",
    )
    a(
        "--max-concurrent-requests",
        type=int,
        default=int(_env("max_concurrent_requests", "512") or 512),
        help="inputs in flight in this gateway before 429",
    )
    a(
        "--max-queue-backlog",
        type=int,
        default=int(_env("embedq_max_queue_backlog", "2048") or 2048),
        help="jobs waiting or running in the model's interactive lane before 429",
    )
    a(
        "--embedding-cache-ttl",
        type=int,
        default=int(_env("embedq_embedding_cache_ttl", "0") or 0),
        help="cache /embed results in Redis for this many seconds, keyed by model revision, "
        "parameters and text (0: off)",
    )
    a("--request-timeout", type=float, default=float(_env("embedq_request_timeout", "60") or 60))
    a(
        "--cors-allow-origin",
        action="append",
        default=[o for o in (_env("cors_allow_origin") or "").split(",") if o],
        help="an allowed CORS origin (repeat the flag, or comma-separate in the variable)",
    )
    a(
        "--model-alias",
        action="append",
        metavar="ALIAS=MODEL",
        default=[x for x in (_env("embedq_model_aliases") or "").split(",") if x],
        help="accept ALIAS as a request's `model` for the served MODEL, split at the first "
        "`=` (repeat the flag, or comma-separate in the variable), e.g. "
        f"text-embedding-3-small={DEFAULT_MODEL_NAME}",
    )


def _model_aliases(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for pair in pairs:
        alias, sep, target = (x.strip() for x in pair.partition("="))
        if not sep or not alias or not target:
            raise GatewayConfigError(f"--model-alias {pair!r} is not ALIAS=MODEL")
        if alias == target:
            raise GatewayConfigError(f"--model-alias {pair!r} names the model itself")
        if out.get(alias, target) != target:
            raise GatewayConfigError(f"--model-alias {alias!r} is given for two models")
        try:
            out[alias] = check_model_name(target)
        except ValueError as exc:
            raise GatewayConfigError(f"--model-alias {pair!r}: {exc}") from None
    return tuple(out.items())


def _api_key(ns: argparse.Namespace) -> str | None:
    if ns.api_key_file:
        try:
            return Path(ns.api_key_file).read_text().strip() or None
        except OSError as exc:
            raise GatewayConfigError(f"cannot read --api-key-file: {exc}") from None
    return ns.api_key or None


def gateway_config_from_args(ns: argparse.Namespace) -> GatewayConfig:
    cfg = GatewayConfig(
        redis=RedisSettings.from_env(ns.redis_url, max_connections=16),
        hostname=ns.hostname,
        port=ns.port,
        model=check_model_name(ns.model),
        api_key=_api_key(ns),
        payload_limit=ns.payload_limit,
        max_client_batch_size=ns.max_client_batch_size,
        client_batch_policy=ns.client_batch_policy,
        max_concurrent_requests=ns.max_concurrent_requests,
        max_queue_backlog=ns.max_queue_backlog,
        embedding_cache_ttl_s=ns.embedding_cache_ttl,
        request_timeout_s=ns.request_timeout,
        cors_allow_origin=tuple(ns.cors_allow_origin),
        model_aliases=_model_aliases(ns.model_alias),
    )
    for name in ("payload_limit", "max_client_batch_size", "max_concurrent_requests", "max_queue_backlog"):
        if getattr(cfg, name) < 1:
            raise GatewayConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.request_timeout_s <= 0:
        raise GatewayConfigError("--request-timeout must be positive")
    return cfg
