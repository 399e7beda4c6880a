"""Worker logic tested in-process: batch isolation and task supervision."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from embedq.common.errors import ValidationError
from embedq.common.settings import RedisSettings
from embedq.redis_server import RedisServer
from embedq.worker.backends.fake import FakeBackend
from embedq.worker.config import WorkerConfig
from embedq.worker.service import Worker, WorkerFault, _ids_only, _isolate_redelivered, _Seq


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
