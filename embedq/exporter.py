"""`embedq exporter`: the queue state of every served model on a Prometheus endpoint,
for deployments without a gateway (or to scrape queue state once, not per gateway).

It refreshes a ModelDirectory in the background and serves the same embedq_* metrics
as the gateway's /metrics. It needs only read access to lengths, group info, heartbeats
and counters (the ACL file's ``metrics`` user): payloads are never read.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import CollectorRegistry, start_http_server

from embedq.common.settings import RedisSettings, connect
from embedq.producer.gateway.directory import ModelDirectory
from embedq.producer.gateway.queue_metrics import QueueCollector

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400


def exporter_registry(directory: ModelDirectory) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(directory))
    return registry


async def serve(redis_url: str, *, port: int, host: str = "0.0.0.0", refresh_s: float = 1.0) -> None:
    redis = connect(RedisSettings.from_env(redis_url), name="embedq-exporter", max_connections=2)
    directory = ModelDirectory(redis, refresh_s=refresh_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await directory.start()
    server, thread = start_http_server(port, addr=host, registry=exporter_registry(directory))
    log.info("queue exporter on %s:%d/metrics (Redis %s)", host, port, "up" if directory.redis_ok else "down")
    try:
        await stop.wait()
    finally:
        server.shutdown()
        thread.join(timeout=5)
        await directory.close()
        await redis.aclose()
