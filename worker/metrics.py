"""A worker's own Prometheus metrics, served on --metrics-port (one port per process).

Queue state (backlog, pending, dead letters, live workers) is the gateway's and
`embedq status`'s to report; these are what only the worker sees.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from embedq.common.metric_buckets import DURATION_BUCKETS, POWER_OF_TWO_BUCKETS


class WorkerMetrics:
    def __init__(self, model: str, worker: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = {"model": model, "worker": worker}
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets, registry=r)

        self.batch_size = hist("embedq_worker_batch_size", "sequences per forward pass", POWER_OF_TWO_BUCKETS)
        self.batch_tokens = hist(
            "embedq_worker_batch_tokens", "real tokens per forward pass", POWER_OF_TWO_BUCKETS
        )
        self.queue_s = hist("embedq_worker_queue_seconds", "job creation to admission", DURATION_BUCKETS)
        self.tokenize_s = hist(
            "embedq_worker_tokenize_seconds", "tokenization per admitted read", DURATION_BUCKETS
        )
        self.inference_s = hist("embedq_worker_inference_seconds", "forward pass duration", DURATION_BUCKETS)
        self.padding = Gauge(
            "embedq_worker_padding_efficiency", "real / computed tokens since start", list(labels), registry=r
        )
        names = list(labels)
        self.jobs = Counter(
            "embedq_worker_jobs",
            "jobs answered, by kind and outcome",
            [*names, "kind", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "embedq_worker_dead_letters", "entries dead-lettered", [*names, "reason"], registry=r
        )
        self.reclaimed = Counter(
            "embedq_worker_reclaimed", "entries taken over from lapsed leases", names, registry=r
        )
        self.redelivered = Counter(
            "embedq_worker_redelivered_jobs", "jobs admitted with deliveries > 1", names, registry=r
        )
        self.heartbeat_age = Gauge(
            "embedq_worker_heartbeat_age_seconds", "time since the last heartbeat landed", names, registry=r
        )
        self._labels = labels
        self._last_heartbeat = time.monotonic()
        self.heartbeat_age.labels(**labels).set_function(lambda: time.monotonic() - self._last_heartbeat)
        # Labelled children of the per-job and per-batch metrics, looked up once: a
        # labels() call costs more than the observation itself.
        self._batch_size = self.batch_size.labels(**labels)
        self._batch_tokens = self.batch_tokens.labels(**labels)
        self._inference_s = self.inference_s.labels(**labels)
        self._padding = self.padding.labels(**labels)
        self._queue_s = self.queue_s.labels(**labels)
        self._tokenize_s = self.tokenize_s.labels(**labels)
        self._redelivered = self.redelivered.labels(**labels)
        self._jobs: dict[tuple[str, str], Counter] = {}

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def heartbeat_ok(self) -> None:
        self._last_heartbeat = time.monotonic()

    def batch(self, size: int, tokens: int, seconds: float, efficiency: float) -> None:
        self._batch_size.observe(size)
        self._batch_tokens.observe(tokens)
        self._inference_s.observe(seconds)
        self._padding.set(efficiency)

    def admitted(self, queue_s: float, deliveries: int) -> None:
        self._queue_s.observe(queue_s)
        if deliveries > 1:
            self._redelivered.inc()

    def tokenized(self, seconds: float) -> None:
        self._tokenize_s.observe(seconds)

    def answered(self, kind: str, outcome: str, count: int = 1) -> None:
        child = self._jobs.get((kind, outcome))
        if child is None:
            child = self._jobs[(kind, outcome)] = self.jobs.labels(**self._labels, kind=kind, outcome=outcome)
        child.inc(count)

    def dead_lettered(self, reason: str) -> None:
        self.dead_letters.labels(**self._labels, reason=reason).inc()

    def reclaim(self, count: int) -> None:
        self.reclaimed.labels(**self._labels).inc(count)
