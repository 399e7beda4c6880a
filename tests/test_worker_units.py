"""Worker logic tested in-process: batch isolation and task supervision."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from embedq.common.errors import ModelNotServedError, ValidationError
from embedq.common.settings import RedisSettings
from embedq.common.wire import Job, pack_reply, unpack_reply
from embedq.redis_server import RedisServer
from embedq.worker.backends.fake import FakeBackend
from embedq.worker.config import WorkerConfig
from embedq.worker.jobs import ActiveJob
from embedq.worker.service import Worker, WorkerFault, _ids_only, _isolate_redelivered, _Seq
from embedq.worker.stream import Delivery


def _seq(job: object, i: int) -> _Seq:
    return _Seq(job=job, index=i, ids=[101, 102])  # type: ignore[arg-type]


def test_suspected_jobs_run_alone() -> None:
    """Jobs that were in an unfinished forward pass run alone; jobs that were only held
    by a dead worker (redelivered, never suspected) are batched as usual."""
    fresh_a = SimpleNamespace(delivery=SimpleNamespace(deliveries=1, suspicion=0))
    fresh_b = SimpleNamespace(delivery=SimpleNamespace(deliveries=3, suspicion=0))
    again_1 = SimpleNamespace(delivery=SimpleNamespace(deliveries=2, suspicion=1))
    again_2 = SimpleNamespace(delivery=SimpleNamespace(deliveries=3, suspicion=2))
    seqs = [_seq(fresh_a, 0), _seq(again_1, 0), _seq(fresh_b, 0), _seq(again_1, 1), _seq(again_2, 0)]
    groups = _isolate_redelivered(seqs)
    assert [[s.job for s in g] for g in groups] == [[fresh_a, fresh_b], [again_1, again_1], [again_2]]
    assert _isolate_redelivered([]) == []


def _config(url: str) -> WorkerConfig:
    return WorkerConfig(
        model_id="fake",
        model_path="",
        served_model_name="sup-test",
        redis=RedisSettings(url=url),
        backend="fake",
        heartbeat_s=0.1,
    )


async def test_a_dead_helper_task_ends_the_worker(tmp_path: Path) -> None:
    """A stuck-but-alive worker would renew its leases forever: it must fail instead."""
    with RedisServer(tmp_path / "redis") as server:
        config = _config(server.url)
        worker = Worker(config, FakeBackend(config))

        async def broken_heartbeat() -> None:
            raise RuntimeError("boom")

        worker._heartbeat_loop = broken_heartbeat  # type: ignore[method-assign]
        with pytest.raises(WorkerFault, match="heartbeat"):
            await asyncio.wait_for(worker.run(), timeout=10)
        await worker.redis.aclose()


async def test_stop_returns_cleanly(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        config = _config(server.url)
        worker = Worker(config, FakeBackend(config))
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
        await worker.redis.aclose()


@pytest.mark.parametrize("ids", [[["a", "b"]], [[1, True]], [[1, 2.0]], ["text"]])
def test_decode_ids_must_be_lists_of_ints(ids: list[object]) -> None:
    # A hand-made job: the gateway and SDK only send ints. It gets a validation error,
    # not a tokenizer failure reported as a backend error.
    with pytest.raises(ValidationError):
        _ids_only(ids)
    assert _ids_only([[101, 7592, 102], [5]]) == [[101, 7592, 102], [5]]


async def test_the_model_is_loaded_warmed_and_run_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libgomp keeps a thread team per calling thread and stops spinning once teams
    outnumber the cores (worker/main.py model_thread_pool): one thread must do it all."""
    import threading

    from embedq import AsyncClient
    from embedq.worker import main

    threads: dict[str, set[int]] = {"load": set(), "warmup": set(), "embed": set()}

    class ThreadRecordingBackend(FakeBackend):
        def __init__(self, config: WorkerConfig) -> None:
            threads["load"].add(threading.get_ident())
            super().__init__(config)

        def warmup(self) -> None:
            threads["warmup"].add(threading.get_ident())
            super().warmup()

        def embed(self, batch: object) -> object:  # type: ignore[override]
            threads["embed"].add(threading.get_ident())
            return super().embed(batch)  # type: ignore[arg-type]

    workers: list[Worker] = []

    class RecordedWorker(Worker):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            workers.append(self)

    monkeypatch.setattr(main, "load_backend", ThreadRecordingBackend)
    monkeypatch.setattr(main, "Worker", RecordedWorker)
    with RedisServer(tmp_path / "redis") as server:
        config = _config(server.url)
        task = asyncio.create_task(main.serve(config))
        async with AsyncClient(server.url, model=config.served_model_name, timeout=20) as client:
            for _ in range(100):  # until the worker has registered
                try:
                    await client.embed(["first"])
                    break
                except ModelNotServedError:
                    await asyncio.sleep(0.1)
            for _ in range(3):
                assert (await client.embed(["one", "two words"])).shape[0] == 2
        workers[0].stop()
        await asyncio.wait_for(task, timeout=10)
    assert len(threads["load"]) == 1 and len(threads["embed"]) == 1
    assert threads["load"] == threads["warmup"] == threads["embed"]
    assert threads["load"] != {threading.get_ident()}  # not the event loop's thread


@pytest.mark.parametrize(
    ("layout", "computed"),
    [({"length_step": 8}, 8 * 2), ({"packed": True}, 5 + 4), ({}, 5 * 2)],
)
async def test_padding_efficiency_counts_computed_tokens(
    layout: dict[str, object], computed: int, tmp_path: Path
) -> None:
    """Computed tokens: the length bucket of a backend that pads to buckets, the longest
    row's width of a plain padded one, and the real tokens of a packed one."""
    from dataclasses import replace

    from embedq import AsyncClient

    with RedisServer(tmp_path / "redis") as server:
        config = _config(server.url)
        backend = FakeBackend(config)
        backend.description = replace(backend.description, **layout)  # type: ignore[arg-type]
        worker = Worker(config, backend)
        task = asyncio.create_task(worker.run())
        async with AsyncClient(server.url, model=config.served_model_name, timeout=20) as client:
            for _ in range(100):  # until the worker has registered
                try:
                    # One job, one pass: [CLS] 3 words [SEP] (5 tokens) and 2 words (4).
                    await client.embed(["one two three", "four five"])
                    break
                except ModelNotServedError:
                    await asyncio.sleep(0.1)
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
        await worker.redis.aclose()
    assert worker.batches_run == 1
    assert (worker.real_tokens, worker.padded_tokens) == (9, computed)


def _held(kind: str, params: dict[str, object], *, inputs: int = 2, error: bool = False) -> ActiveJob:
    job = Job(
        id="r-1",
        kind=kind,
        model="m",
        inputs=["a"] * inputs,
        params=params,
        reply_to="embedq:reply:c",
        created_ms=1,
    )  # type: ignore[arg-type]
    held = ActiveJob(delivery=Delivery(b"1-0", {}, deliveries=2), job=job, params=job.typed_params())
    held.queue_ms, held.tokenize_ms, held.infer_ms, held.batch_size = 1.23456, 0.5, 2.0, 7
    held.start([3, 5][:inputs], 4)
    assert held.pooled is not None
    held.pooled[:] = np.arange(held.pooled.size, dtype=np.float32).reshape(held.pooled.shape) - 3
    if kind in ("rerank", "predict"):
        held.labels = ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]
    if error:
        held.error = ValidationError("bad")
    return held


@pytest.mark.parametrize(
    ("kind", "params", "error"),
    [
        ("embed", {}, False),
        ("embed", {"normalize": False, "encoding": "float16", "dimensions": 2}, False),
        ("embed", {}, True),
        ("predict", {}, False),
        ("rerank", {"query": "q"}, False),
    ],
)
def test_packed_reply_is_the_models_reply(kind: str, params: dict[str, object], error: bool) -> None:
    # The worker's hot path packs replies without the models: same map, and it validates.
    held = _held(kind, params, error=error)
    packed = held.packed_reply("w-1")
    # Byte for byte: keys in the models' order, and the same wire types.
    assert packed == pack_reply(held.reply("w-1"))
    reply = unpack_reply(packed)
    assert reply.ok is not error and reply.meta is not None
    assert (reply.meta.queue_ms, reply.meta.tokens, reply.meta.deliveries) == (1.235, 8, 2)
    if not error:
        result = reply.scores if kind != "embed" else reply.embed
        assert result is not None and result.token_counts == [3, 5]
        assert result.shape == ((2, 2) if params.get("dimensions") else (2, 4))
