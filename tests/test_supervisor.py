"""`embedq worker --devices`: one worker process per device under a supervisor.

Planning is tested as pure functions (the CUDA device count is injected); the restart
loop with tiny Python children; the whole thing with real workers (fake backend) on a
real redis-server.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis

from embedq import Client
from embedq.cli import build_parser
from embedq.common import keys
from embedq.redis_server import RedisServer
from embedq.worker.supervisor import (
    ChildSpec,
    DeviceSpec,
    RestartPolicy,
    Supervisor,
    SupervisorError,
    child_specs,
    parse_devices,
    plan_slots,
    strip_devices,
    supervisor_config_from_args,
)

from .helpers import MODEL, STARTED, WorkerProcess, live_workers, start_worker, wait_for_workers

CHILD_PID = re.compile(r"slot (\w+): worker pid (\d+) (?:re)?started")


# ---------------------------------------------------------------- planning (pure)
def test_parse_devices() -> None:
    assert parse_devices("all") == DeviceSpec()
    assert parse_devices(" ALL ") == DeviceSpec()
    assert parse_devices("cpu:3") == DeviceSpec(cpu_processes=3)
    assert parse_devices("0,2") == DeviceSpec(cuda_indexes=(0, 2))
    assert parse_devices("cuda:1, 3") == DeviceSpec(cuda_indexes=(1, 3))
    for bad in ("", "cpu", "cpu:0", "cpu:x", "0,0", "-1", "gpu0", "all,0", "0,"):
        with pytest.raises(SupervisorError, match="--devices"):
            parse_devices(bad)


def _plan(
    spec: str,
    count: int = 0,
    *,
    cpu_cores: int = 8,
    visible_devices: str | None = None,
    threads: int | None = None,
    metrics_port: int = 0,
) -> list[tuple[str, str, dict[str, str], int | None, int]]:
    """The slots as tuples: (name, device, env, threads, metrics port); ``count`` CUDA devices."""
    slots = plan_slots(
        parse_devices(spec),
        cuda_device_count=lambda: count,
        cpu_cores=cpu_cores,
        visible_devices=visible_devices,
        threads=threads,
        metrics_port=metrics_port,
    )
    return [(s.name, s.device, dict(s.env), s.threads, s.metrics_port) for s in slots]


def test_all_without_a_cuda_device_is_a_clear_error() -> None:
    with pytest.raises(SupervisorError, match=r"--devices all: no CUDA device is visible"):
        _plan("all", count=0)


def test_each_cuda_child_sees_one_device() -> None:
    assert _plan("all", count=2) == [
        ("gpu0", "cuda:0", {"CUDA_VISIBLE_DEVICES": "0"}, None, 0),
        ("gpu1", "cuda:0", {"CUDA_VISIBLE_DEVICES": "1"}, None, 0),
    ]
    # Indexes count the devices this process sees: an inherited list is honoured.
    plan = _plan("0,2", visible_devices="4,GPU-abc,6", metrics_port=9401)
    assert plan == [
        ("gpu0", "cuda:0", {"CUDA_VISIBLE_DEVICES": "4"}, None, 9401),
        ("gpu2", "cuda:0", {"CUDA_VISIBLE_DEVICES": "6"}, None, 9402),
    ]
    with pytest.raises(SupervisorError, match="not among the 2"):
        _plan("0,2", visible_devices="4,5")


def test_cpu_children_share_the_cores() -> None:
    assert [s[3] for s in _plan("cpu:2")] == [4, 4]
    assert [s[3] for s in _plan("cpu:3", cpu_cores=2)] == [1, 1, 1]
    assert [s[3] for s in _plan("cpu:2", threads=3)] == [3, 3]  # the user's --threads wins
    assert [(s[0], s[1], s[2]) for s in _plan("cpu:2")] == [("cpu0", "cpu", {}), ("cpu1", "cpu", {})]


def test_children_get_the_command_line_minus_devices() -> None:
    argv = ["--log-level", "debug", "worker", "--backend", "fake", "--devices", "0,2",
            "--consumer-name", "w", "--metrics-port", "9401", "--threads", "2"]  # fmt: skip
    assert strip_devices(argv) == [a for a in argv if a not in ("--devices", "0,2")]
    assert strip_devices(["worker", "--devices=cpu:2", "--backend", "fake"]) == [
        "worker",
        "--backend",
        "fake",
    ]

    ns = build_parser().parse_args(argv)
    environ = {"CUDA_VISIBLE_DEVICES": "5,6,7", "EMBEDQ_DEVICES": "0,2", "PATH": "/bin"}

    def no_probe() -> int:
        raise AssertionError("an explicit list needs no device count")

    config = supervisor_config_from_args(ns, argv, environ=environ, cuda_device_count=no_probe)
    specs = child_specs(config, environ)
    assert [s.slot for s in specs] == ["gpu0", "gpu2"]
    for spec, visible, port in zip(specs, ("5", "7"), (9401, 9402), strict=True):
        # No recursion: neither the flag nor its variable reaches the child.
        assert "--devices" not in spec.argv and "EMBEDQ_DEVICES" not in spec.env
        assert spec.env["CUDA_VISIBLE_DEVICES"] == visible and spec.env["PATH"] == "/bin"
        assert spec.argv[1:3] == ("-m", "embedq")
        child = build_parser().parse_args(list(spec.argv[3:]))
        assert child.log_level == "debug" and child.backend == "fake" and child.devices is None
        assert child.device == "cuda:0" and child.consumer_name == f"w-{spec.slot}"
        assert child.metrics_port == port and child.threads == 2

    # `all` counts the devices (injected here); cpu:N splits the cores.
    ns = build_parser().parse_args(["worker", "--backend", "fake", "--devices", "all"])
    config = supervisor_config_from_args(ns, ["worker"], environ={}, cuda_device_count=lambda: 3)
    assert [s.name for s in config.slots] == ["gpu0", "gpu1", "gpu2"]
    assert config.consumer_base.endswith(f"-{os.getpid()}")  # stable per slot across restarts
    ns = build_parser().parse_args(["worker", "--backend", "fake", "--devices", "cpu:2"])
    config = supervisor_config_from_args(ns, ["worker"], environ={})
    assert [(s.device, s.threads) for s in config.slots] == [
        ("cpu", max(1, len(os.sched_getaffinity(0)) // 2))
    ] * 2


def test_restart_backoff_doubles_to_a_cap() -> None:
    policy = RestartPolicy()
    assert [policy.delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


# ------------------------------------------------------ the restart loop, tiny children
def _child(slot: str, code: str) -> ChildSpec:
    return ChildSpec(slot=slot, argv=(sys.executable, "-S", "-c", code), env=dict(os.environ))


CRASH = "raise SystemExit(3)"
# Exits 0 on SIGTERM, as a worker does after its drain.
STEADY = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\ntime.sleep(60)"


def _run(sup: Supervisor) -> tuple[threading.Thread, list[int]]:
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(sup.run()), daemon=True)
    thread.start()
    return thread, out


def _wait(cond: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_repeated_start_failures_give_up_and_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "embedq.worker.supervisor")
    sup = Supervisor(
        [_child("bad", CRASH), _child("good", STEADY)],
        policy=RestartPolicy(first_delay_s=0.01),
        stop_timeout_s=20,
    )
    started = time.monotonic()
    assert sup.run() == 1
    assert time.monotonic() - started < 15
    bad, good = sup.children
    # The healthy child got the stop (-SIGTERM: it was killed before its handler was set).
    assert bad.starts == 5 and good.starts == 1 and good.final in (0, -signal.SIGTERM)
    text = caplog.text
    assert "slot bad: worker pid" in text and "exited with code 3" in text
    assert "failed 5 times in a row" in text and "giving up" in text
    assert re.search(
        r"slot good: worker pid \d+ (exited with code 0|was killed by SIGTERM) after the stop", text
    )
    delays = [float(d) for d in re.findall(r"restarting in ([\d.e-]+) s", text)]
    assert delays == [0.01, 0.02, 0.04, 0.08]


def test_exit_zero_is_final_a_crash_is_restarted_a_stable_run_resets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "embedq.worker.supervisor")
    # Runs past stable_after_s, then fails: the failure count restarts every time, so
    # two allowed failures never add up to giving up.
    flaky = "import time\ntime.sleep(0.15)\nraise SystemExit(1)"
    sup = Supervisor(
        [_child("done", "pass"), _child("flaky", flaky)],
        policy=RestartPolicy(first_delay_s=0.05, stable_after_s=0.1, max_start_failures=2),
        stop_timeout_s=20,
    )
    thread, out = _run(sup)
    _wait(lambda: sup.children[1].starts >= 4, what="the flaky child restarted three times")
    sup.request_stop(signal.SIGTERM)
    thread.join(30)
    assert out == [0]
    assert sup.children[0].starts == 1  # exit 0: not restarted
    assert "slot done: worker pid" in caplog.text and "exited with code 0; not restarted" in caplog.text
    assert "giving up" not in caplog.text
    assert set(re.findall(r"slot flaky: .* restarting in ([\d.]+) s", caplog.text)) == {"0.05"}


def test_stragglers_are_killed_after_the_stop_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ready = tmp_path / "ready"
    stubborn = (
        "import pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)"
    )
    spec = _child("stubborn", stubborn)
    spec = ChildSpec(slot=spec.slot, argv=(*spec.argv, str(ready)), env=spec.env)
    sup = Supervisor([spec], policy=RestartPolicy(), stop_timeout_s=0.5)
    thread, out = _run(sup)
    _wait(ready.exists, what="the child ignores SIGTERM")
    sup.request_stop(signal.SIGTERM)
    thread.join(20)
    assert out == [1] and sup.children[0].final == -signal.SIGKILL
    assert "still running 0.5 s after the stop; killing it" in caplog.text


# ------------------------------------------------ real workers (fake backend), real Redis
def _child_pids(sup: WorkerProcess) -> dict[str, int]:
    """Each slot's newest pid, from the supervisor's log."""
    return {slot: int(pid) for slot, pid in CHILD_PID.findall(sup.log())}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _pending_by_consumer(r: redis.Redis) -> dict[str, int]:
    summary = r.xpending(keys.jobs_stream(MODEL), keys.WORKER_GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in summary.get("consumers") or []}


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """kill -9 of the supervisor: its children get SIGTERM (and drain) instead of living on."""
    ready = tmp_path / "child.pid"
    child = (
        "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"open({str(ready)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    )
    code = (
        "import os, sys\n"
        "from embedq.worker.supervisor import ChildSpec, RestartPolicy, Supervisor\n"
        f"spec = ChildSpec(slot='s', argv=(sys.executable, '-S', '-c', {child!r}), env=dict(os.environ))\n"
        "Supervisor([spec], policy=RestartPolicy(), stop_timeout_s=5).run()"
    )
    sup = subprocess.Popen([sys.executable, "-c", code])
    STARTED["function"].append(sup)
    _wait(lambda: ready.exists() and ready.read_text().isdigit(), what="the child started")
    pid = int(ready.read_text())
    sup.kill()
    sup.wait(10)
    _wait(lambda: not _alive(pid), timeout=10, what="the orphaned child to exit")


def _supervise(redis_server: RedisServer, tmp_path: Path, *args: str) -> WorkerProcess:
    sup = start_worker(
        redis_server.url, tmp_path, "--backend", "fake", "--devices", "cpu:2", *args, wait=False
    )
    wait_for_workers(redis_server.url, MODEL, 2, sup, timeout=60)
    return sup


def test_two_cpu_workers_serve_survive_kill_9_and_drain_on_sigterm(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    # 20 ms a token: a job of three words holds its worker for about 0.1 s.
    sup = _supervise(
        redis_server, tmp_path, "--fake-delay-us-per-token", "20000", "--restart-backoff-s", "0.2"
    )
    names = sorted(n.decode() for n in cast(list[bytes], r.zrange(keys.workers_key(MODEL), 0, -1)))
    assert len(names) == 2 and names[0].endswith("-cpu0") and names[1].endswith("-cpu1")
    assert "libtorch" not in Path(f"/proc/{sup.proc.pid}/maps").read_text(), "the supervisor loaded torch"
    stream = keys.jobs_stream(MODEL)

    texts = [[f"job {i} text"] for i in range(12)]
    with Client(redis_server.url, model=MODEL, timeout=40) as client, ThreadPoolExecutor(12) as pool:
        assert client.embed(["warm up"]).shape == (1, 384)
        consumers = {c["name"].decode() for c in r.xinfo_consumers(stream, keys.WORKER_GROUP)}
        assert consumers == set(names)  # both read the model's stream

        # kill -9 of a worker while it holds jobs: it is restarted under the same
        # consumer name, takes its pending jobs back, and every job is answered.
        before = _child_pids(sup)
        futures = [pool.submit(client.embed, t) for t in texts]
        _wait(lambda: any(_pending_by_consumer(r).values()), what="a worker holding jobs")
        victim_name = max(_pending_by_consumer(r).items(), key=lambda kv: kv[1])[0]
        victim = victim_name.rsplit("-", 1)[1]
        os.kill(before[victim], signal.SIGKILL)
        vectors = [f.result(timeout=40) for f in futures]
        _wait(lambda: _child_pids(sup)[victim] != before[victim], what="the restart")
        log = sup.log()
        assert f"slot {victim}: worker pid {before[victim]} was killed by SIGKILL" in log
        assert f"slot {victim}: worker pid {_child_pids(sup)[victim]} restarted (restart 1" in log
        want = client.embed([t[0] for t in texts])  # the fake model is deterministic
        np.testing.assert_array_equal(np.concatenate(vectors), want)
        assert r.xlen(keys.dead_letter_stream(MODEL)) == 0
        wait_for_workers(redis_server.url, MODEL, 2, sup, timeout=30)

        # SIGTERM to the supervisor while both workers hold jobs: all are answered,
        # every child exits 0, and so does the supervisor.
        futures = [pool.submit(client.embed, [f"in flight {i}"]) for i in range(8)]

        def all_delivered() -> bool:  # every job read by a worker, some not yet answered
            pending = sum(_pending_by_consumer(r).values())
            return pending > 0 and pending == r.xlen(stream)

        _wait(all_delivered, what="jobs held by the workers")
        sup.proc.send_signal(signal.SIGTERM)
        assert all(f.result(timeout=40).shape == (1, 384) for f in futures)
    assert sup.proc.wait(timeout=45) == 0
    assert len(re.findall(r"slot cpu\d: worker pid \d+ exited with code 0 after the stop", sup.log())) == 2
    assert live_workers(redis_server.url, MODEL) == 0
    assert r.xlen(stream) == 0


def _embedq_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedq", "worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_bad_model_folder_fails_before_any_child_starts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    started = time.monotonic()
    res = _embedq_worker(
        "--model-id", str(tmp_path / "empty"), "--served-model-name", "m", "--devices", "cpu:2"
    )
    assert res.returncode == 2 and "has no config.json" in res.stderr, res.stderr
    assert "worker pid" not in res.stderr
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_devices_all_without_cuda_exits_with_one_line() -> None:
    # The real probe (a child process that imports torch), with every GPU hidden.
    res = _embedq_worker("--backend", "fake", "--devices", "all", env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--devices all: no CUDA device is visible" in lines[0], res.stderr


@pytest.mark.slow
def test_a_worker_failing_at_start_makes_the_supervisor_give_up(redis_server: RedisServer) -> None:
    # Only the child finds this out (the model's max input length is 512 tokens).
    started = time.monotonic()
    res = _embedq_worker(
        "--redis-url", redis_server.url, "--backend", "fake", "--served-model-name", MODEL,
        "--max-batch-tokens", "100", "--devices", "cpu:1", "--restart-backoff-s", "0.05",
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert len(re.findall(r"slot cpu0: worker pid \d+ exited with code 2", res.stderr)) == 5
    assert "failed 5 times in a row" in res.stderr and "giving up" in res.stderr
