"""One trace across the queue: the caller's span, the job's queue wait, tokenization,
inference and the batch span, via W3C trace context carried inside the job."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import redis
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from embedq import AsyncClient
from embedq.common import keys
from embedq.common.ids import now_ms
from embedq.common.settings import RedisSettings
from embedq.common.wire import Job, pack_job, unpack_reply
from embedq.redis_server import RedisServer
from embedq.worker.backends.fake import FakeBackend
from embedq.worker.config import WorkerConfig
from embedq.worker.service import Worker

from .helpers import MODEL, start_gateway, start_worker

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> Iterator[None]:
    # The global provider can be set once per process; this module is its only user.
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tp)
    yield


async def test_a_trace_crosses_the_queue(provider: None, tmp_path: Path) -> None:
    EXPORTER.clear()
    with RedisServer(tmp_path / "redis") as server:
        config = WorkerConfig(
            model_id="fake", model_path="", served_model_name=MODEL, redis=RedisSettings(url=server.url),
            backend="fake",
        )  # fmt: skip
        worker = Worker(config, FakeBackend(config))
        running = asyncio.create_task(worker.run())
        try:
            async with AsyncClient(server.url, model=MODEL, timeout=20) as client:
                for _ in range(100):  # until the worker registered its stream
                    if await client._redis.exists(keys.jobs_stream(MODEL)):  # type: ignore[union-attr]
                        break
                    await asyncio.sleep(0.05)
                with trace.get_tracer("test").start_as_current_span("caller") as caller:
                    await asyncio.gather(client.embed(["a b c", "d e"]), client.embed("f g h i"))
                untraced = await client.embed("no caller span")  # still answered
            assert untraced.shape == (1, 384)
        finally:
            worker.stop()
            await asyncio.wait_for(running, timeout=10)
            await worker.redis.aclose()

    spans = EXPORTER.get_finished_spans()
    trace_id = caller.get_span_context().trace_id
    jobs = [s for s in spans if s.name == "embedq.embed" and s.context.trace_id == trace_id]
    assert len(jobs) == 2
    for job in jobs:
        assert job.parent is not None and job.parent.span_id == caller.get_span_context().span_id
        children = {s.name for s in spans if s.parent is not None and s.parent.span_id == job.context.span_id}
        assert {"embedq.queue", "embedq.tokenize", "embedq.inference"} <= children
        assert job.attributes["embedq.model"] == MODEL
        assert job.start_time <= job.end_time
    # The batch span is linked to each job it served.
    job_ids = {j.context.span_id for j in jobs}
    linked = {link.context.span_id for s in spans if s.name == "embedq.batch" for link in s.links}
    assert job_ids <= linked


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length", 0))
        if self.path == "/v1/traces":
            _Receiver.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def test_worker_exports_spans_over_otlp_http(redis_server: RedisServer, tmp_path: Path) -> None:
    httpd = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Receiver.bodies.clear()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{httpd.server_port}",
        "OTEL_SERVICE_NAME": "embedq-worker-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
        gateway = start_gateway(redis_server.url, tmp_path)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    job = Job(
        id="traced-1", kind="embed", model=MODEL, inputs=["hello traced world"],
        reply_to="embedq:reply:otlp-test", created_ms=now_ms(),
        trace={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )  # fmt: skip
    r = redis.Redis.from_url(redis_server.url)
    r.xadd(keys.jobs_stream(MODEL), {keys.JOB_FIELD: pack_job(job)})
    deadline = time.monotonic() + 20
    while not r.xlen("embedq:reply:otlp-test") and time.monotonic() < deadline:
        time.sleep(0.05)
    reply = unpack_reply(r.xrange("embedq:reply:otlp-test")[0][1][keys.REPLY_FIELD])
    assert reply.ok

    # Through the gateway: its server span continues the HTTP caller's traceparent.
    http_trace, http_parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    resp = httpx.post(
        f"{gateway.url}/embed",
        json={"inputs": "over http"},
        headers={"traceparent": f"00-{http_trace}-{http_parent}-01"},
        timeout=20,
    )
    assert resp.status_code == 200

    def spans() -> list[tuple[str, object]]:
        out = []
        for body in list(_Receiver.bodies):
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
                out += [(service, span) for ss in rs.scope_spans for span in ss.spans]
        return out

    def find(name: str, trace_hex: str) -> object | None:
        return next((sp for _, sp in spans() if sp.name == name and sp.trace_id.hex() == trace_hex), None)

    while time.monotonic() < deadline + 10 and not (
        find("embedq.embed", trace_id)
        and find("embedq.embed", http_trace)
        and find("POST /embed", http_trace)
    ):
        time.sleep(0.1)
    gateway.stop()
    worker.stop()
    httpd.shutdown()
    r.close()
    direct = find("embedq.embed", trace_id)
    assert direct is not None, "the worker exported no span for the traced job"
    assert direct.parent_span_id.hex() == parent_id  # type: ignore[attr-defined]
    assert {svc for svc, sp in spans() if sp.span_id == direct.span_id} == {"embedq-worker-test"}  # type: ignore[attr-defined]
    server_span = find("POST /embed", http_trace)
    job_span = find("embedq.embed", http_trace)
    assert server_span is not None and job_span is not None
    assert server_span.parent_span_id.hex() == http_parent  # type: ignore[attr-defined]
    assert job_span.parent_span_id == server_span.span_id  # type: ignore[attr-defined]
