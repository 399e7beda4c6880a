"""Queue state of every served model as Prometheus metrics, from a ModelDirectory.

Shared by the gateway's /metrics and the standalone exporter (`embedq exporter`). It
reads only what ModelDirectory reads (lengths, group info, heartbeats, counters): no
payload is ever touched.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedq.producer.gateway.directory import ModelDirectory

# The counters workers and producers add to each model's stats hash, exported as
# embedq_<name>_total.
STAT_COUNTERS = {
    "jobs_answered": "jobs answered by the model's workers (results and typed errors)",
    "inputs_answered": "inputs (texts) in the jobs answered",
    "tokens_answered": "tokens in the jobs answered",
    "cache_hits": "inputs served from the embedding cache without reaching a worker",
    "cache_misses": "inputs looked up in the embedding cache and not found",
}


class QueueCollector(Collector):
    """Collected at scrape time from the directory's latest snapshot."""

    def __init__(self, directory: ModelDirectory) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        views = sorted(self.directory.models.values(), key=lambda v: v.name)
        by_lane = [
            ("embedq_queue_backlog", "jobs in a lane's stream, waiting or running"),
            ("embedq_queue_pending", "jobs delivered to a worker and not yet acknowledged"),
            ("embedq_queue_lag", "jobs not yet delivered to any worker (absent when Redis cannot tell)"),
        ]
        lane_families = {
            name: GaugeMetricFamily(name, doc, labels=["model", "lane"]) for name, doc in by_lane
        }
        per_model = {
            name: GaugeMetricFamily(name, doc, labels=["model"])
            for name, doc in (
                ("embedq_dead_letters", "entries in the model's dead-letter stream"),
                ("embedq_live_workers", "workers with a fresh heartbeat"),
                (
                    "embedq_queue_tokens_estimate",
                    "backlog × mean tokens per answered job (an estimate: payloads are not read)",
                ),
            )
        }
        counters = {
            name: CounterMetricFamily(f"embedq_{name}", doc, labels=["model"])
            for name, doc in STAT_COUNTERS.items()
        }
        for v in views:
            for lane, state in v.lanes.items():
                lane_families["embedq_queue_backlog"].add_metric([v.name, lane], state.backlog)
                lane_families["embedq_queue_pending"].add_metric([v.name, lane], state.pending)
                if state.lag is not None:
                    lane_families["embedq_queue_lag"].add_metric([v.name, lane], state.lag)
            per_model["embedq_dead_letters"].add_metric([v.name], v.dead_letters)
            per_model["embedq_live_workers"].add_metric([v.name], v.live_workers)
            per_model["embedq_queue_tokens_estimate"].add_metric([v.name], v.queued_tokens_estimate)
            for name, family in counters.items():
                family.add_metric([v.name], v.stats.get(name, 0))
        up = GaugeMetricFamily("embedq_redis_up", "1 when the last refresh reached Redis")
        up.add_metric([], 1 if self.directory.redis_ok else 0)
        yield up
        yield from lane_families.values()
        yield from per_model.values()
        yield from counters.values()
