"""The chaos suite: faults injected under load against real processes; every
acknowledged request gets exactly one right answer. Small runs here (a few seconds
each); `python scripts/chaos_report.py` runs them larger and writes docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import chaos
from .chaos import Cluster, Figures

SCENARIOS = {
    "worker kill -9, restarted": (chaos.kill_worker_restart, {"workers": 1}, {}),
    "worker kill -9, not restarted (2 workers)": (chaos.kill_one_of_two_workers, {"workers": 2}, {}),
    "Redis kill -9 + restart, AOF everysec": (chaos.kill_redis(1.0), {"appendfsync": "everysec"}, {}),
    "Redis kill -9 + restart, AOF always": (chaos.kill_redis(1.0), {"appendfsync": "always"}, {}),
    "Redis kill -9 + restart, no persistence": (chaos.kill_redis(1.0), {"appendonly": False}, {}),
    "Redis SIGSTOP 1 s (< lease)": (chaos.pause_redis(1.0), {}, {}),
    "Redis SIGSTOP 5 s (> lease)": (chaos.pause_redis(5.0), {}, {}),
    "poison inputs (raise, crash, hang)": (chaos.no_fault, {}, {"poison_every": 40}),
    "duplicate delivery": (chaos.duplicate_entries, {}, {}),
    "malformed entries": (chaos.malformed_entries, {}, {}),
}


def build(tmp: Path, cluster_args: dict[str, object]) -> Cluster:
    workers = int(cluster_args.get("workers", 1))  # type: ignore[call-overload]
    kwargs = {k: v for k, v in cluster_args.items() if k != "workers"}
    return Cluster(tmp, **kwargs).start(workers)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_nothing_lost(name: str, tmp_path: Path) -> None:
    fault, cluster_args, run_args = SCENARIOS[name]
    cluster = build(tmp_path, cluster_args)
    try:
        fig: Figures = await chaos.run_scenario(name, cluster, fault, n=240, rate=80, **run_args)  # type: ignore[arg-type]
    finally:
        cluster.stop()
    print(dict(zip(chaos.HEADER, fig.row(), strict=True)), fig.notes[:5])
    # Every submission is accepted: through outages the SDK keeps sending (same ids), and
    # a stream that vanished with a Redis restart is waited for, not reported missing.
    assert fig.acknowledged == fig.sent, fig
    assert fig.lost == 0, fig
    assert fig.duplicate_answers == 0, fig
    if name == "duplicate delivery":
        assert fig.duplicates_dropped > 10  # computed twice, answered once
    if name.startswith("poison"):
        assert fig.typed_errors == 240 // 40  # each poison input fails alone, with a typed error
    else:
        assert fig.typed_errors == 0


async def test_producer_killed_with_work_in_flight(tmp_path: Path) -> None:
    f = await chaos.producer_killed(tmp_path)
    print(f)
    assert f["left_in_stream"] == 0  # every job answered (result or timeout) and removed
    assert f["computed"] + f["expired_uncomputed"] == f["jobs"]
    # Jobs whose deadline passed while queued were answered without compute: far fewer
    # were computed than sent (the backlog took several times the 2 s deadline).
    assert f["expired_uncomputed"] > f["jobs"] / 3
    assert 0 < f["reply_ttl_ms_after_drain"] <= 3000  # the orphaned reply stream expires
    assert f["reply_stream_exists_after_ttl"] == 0


async def test_three_times_overload(tmp_path: Path) -> None:
    f = await chaos.overload(tmp_path)
    print(f)
    assert f["other_status"] == 0
    assert f["accepted"] > 0 and f["rejected_429"] > f["sent"] / 3
    assert f["accepted_max_s"] < 5.0  # every accepted request met its 5 s deadline
    # The rest were told at once, not queued (accepted ones take seconds here). p99 got
    # 38-39 ms alone on a slow Zen 3 host and 230 ms once inside a full suite run there.
    assert f["rejected_p50_ms"] < 100 and f["rejected_p99_ms"] < 500
    assert f["gateway_rss_growth_mb"] < 100 and f["worker_rss_growth_mb"] < 100
