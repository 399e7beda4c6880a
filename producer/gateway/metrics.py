"""The gateway's Prometheus metrics, under TEI's ``te_*`` names.

TEI's counters carry no ``_total`` suffix (its exporter does not add one), so counters
are kept here and exposed by a small collector; histograms and the gauge use
prometheus_client directly. Every name and bucket layout is defined in this module.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from embedq.common.metric_buckets import DURATION_BUCKETS, POWER_OF_TWO_BUCKETS
from embedq.producer.gateway.directory import ModelDirectory
from embedq.producer.gateway.queue_metrics import QueueCollector

# The route families TEI tracks on their own, besides te_request_*.
FAMILIES = ("request", "embed", "predict")

_COUNTER_HELP = {
    "count": "requests received",
    "success": "requests answered successfully",
    "failure": "requests that failed, by reason",
}
_PHASES = {
    "duration": "end-to-end request duration in seconds",
    "tokenization_duration": "tokenization time in seconds (mean per request)",
    "queue_duration": "time jobs waited in the queue in seconds",
    "inference_duration": "model time in seconds",
}

# Failure reasons, as TEI names them.
FAILURE_REASON = {
    "validation": "validation",
    "empty": "validation",
    "request": "validation",
    "protocol": "validation",
    "payload_too_large": "validation",
    "tokenizer": "tokenization",
    "overloaded": "overloaded",
    "backend": "inference",
    "model_type": "model_type",
    "timeout": "dropped",
    "unavailable": "dropped",
    "model_not_served": "validation",
    "unauthorized": "unauthorized",
}


class _Counters:
    """Counters rendered in Prometheus' text format by hand: prometheus_client would
    rename them ``*_total`` in their HELP and TYPE lines."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def inc(self, name: str, labels: dict[str, str], amount: float = 1.0) -> None:
        key = tuple(sorted(labels.items()))
        series = self.values[name]
        series[key] = series.get(key, 0.0) + amount

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self.values):
            lines.append(f"# HELP {name} {_COUNTER_HELP.get(name.rsplit('_', 1)[-1], name)}")
            lines.append(f"# TYPE {name} counter")
            for key, value in sorted(self.values[name].items()):
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                lines.append(f"{name}{{{labels}}} {value!r}" if labels else f"{name} {value!r}")
        return "\n".join(lines) + "\n" if lines else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class GatewayMetrics:
    def __init__(self) -> None:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
        self.registry = CollectorRegistry(auto_describe=False)
        self._counters = _Counters()
        self._hist: dict[str, Histogram] = {}
        for family in FAMILIES:
            for phase, doc in _PHASES.items():
                name = f"te_{family}_{phase}"
                self._hist[name] = Histogram(name, doc, buckets=DURATION_BUCKETS, registry=self.registry)
        for name, doc in (
            ("te_request_input_length", "tokens per request"),
            ("te_batch_next_size", "size of the batches that ran a request's jobs"),
            ("te_batch_next_tokens", "tokens per request, as batched by the workers"),
        ):
            self._hist[name] = Histogram(name, doc, buckets=POWER_OF_TWO_BUCKETS, registry=self.registry)
        self.queue_size = Gauge(
            "te_queue_size", "jobs waiting or running in the default model's queue", registry=self.registry
        )

    def watch_queues(self, directory: ModelDirectory) -> None:
        """Export every served model's queue state (embedq_* gauges) at each scrape."""
        self.registry.register(QueueCollector(directory))

    def received(self, family: str, batch: bool) -> None:
        method = "batch" if batch else "single"
        self._counters.inc("te_request_count", {"method": method})
        if family != "request":
            self._counters.inc(f"te_{family}_count", {"method": method})

    def succeeded(
        self,
        family: str,
        *,
        batch: bool,
        total_s: float,
        tokenize_s: float,
        queue_s: float,
        infer_s: float,
        tokens: int,
        batch_size: int,
    ) -> None:
        method = "batch" if batch else "single"
        self._counters.inc("te_request_success", {"method": method})
        families = ("request",) if family == "request" else ("request", family)
        if family != "request":
            self._counters.inc(f"te_{family}_success", {"method": method})
        for fam in families:
            self._hist[f"te_{fam}_duration"].observe(total_s)
            self._hist[f"te_{fam}_tokenization_duration"].observe(tokenize_s)
            self._hist[f"te_{fam}_queue_duration"].observe(queue_s)
            self._hist[f"te_{fam}_inference_duration"].observe(infer_s)
        self._hist["te_request_input_length"].observe(tokens)
        if batch_size:
            self._hist["te_batch_next_size"].observe(batch_size)
        self._hist["te_batch_next_tokens"].observe(tokens)

    def failed(self, code: str) -> None:
        self._counters.inc("te_request_failure", {"err": FAILURE_REASON.get(code, "inference")})

    def render(self) -> bytes:
        return self._counters.render().encode() + generate_latest(self.registry)
