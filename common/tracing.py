"""W3C trace context across the queue (OpenTelemetry), optional at every step.

Producers put the current span's context into ``Job.trace``; workers continue the trace
from it. Without the opentelemetry packages, or without a configured tracer provider,
every function here is a cheap no-op: tracing never changes what a request does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

try:
    from opentelemetry import propagate, trace
except ImportError:  # the SDK installs without opentelemetry
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

SERVER: Any = trace.SpanKind.SERVER if trace is not None else None


def inject_current() -> dict[str, str]:
    """The current span's context as W3C headers (empty when there is none)."""
    if propagate is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: dict[str, str]) -> Any:
    """An OpenTelemetry Context from W3C headers (None when tracing is unavailable)."""
    if propagate is None or not carrier:
        return None
    return propagate.extract(carrier)


def tracer(name: str) -> Any:
    """A tracer when a tracer provider is installed (by configure_from_env or by the
    application), else None, so that untraced processes pay nothing per request."""
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return None
    return trace.get_tracer(name)


def span_context(span: Any) -> Any:
    """A Context whose current span is ``span`` (to start children of it)."""
    return trace.set_span_in_context(span) if trace is not None and span is not None else None


def record_span(
    tracer_: Any, name: str, parent: Any, start_ns: int, end_ns: int, attributes: dict[str, Any] | None = None
) -> None:
    """A finished child span of ``parent`` over [start_ns, end_ns] (wall-clock ns)."""
    if tracer_ is None or parent is None:
        return
    span = tracer_.start_span(name, context=span_context(parent), start_time=start_ns, attributes=attributes)
    span.end(end_time=max(end_ns, start_ns))


def link_to(span: Any) -> Any:
    return trace.Link(span.get_span_context()) if trace is not None else None


def mark_error(span: Any, message: str) -> None:
    if trace is not None and span is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, message))


def configure_from_env(service_name: str) -> bool:
    """Install an OTLP/HTTP exporter when the standard OTEL_* variables ask for one.

    OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) turns it on;
    OTEL_SERVICE_NAME names the service (default: ``service_name``); the exporter and
    batch processor read their other OTEL_* settings themselves.
    """
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk/exporter are not installed")
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting traces over OTLP/HTTP to %s", endpoint)
    return True


def shutdown() -> None:
    """Flush spans still buffered (at process exit)."""
    if trace is None:
        return
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()
