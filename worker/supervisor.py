"""One worker process per device, restarted when it dies: `embedq worker --devices`.

The supervisor is a small parent process. It never loads torch (for ``--devices all`` a
short-lived child process counts the CUDA devices), and it holds no job: each child is a
plain `embedq worker` with the same command line minus ``--devices``, plus its slot's
``--device``, ``--consumer-name`` and, on CPU, ``--threads``:

- ``--devices all`` / ``--devices 0,2``: one child per CUDA device, each started with
  ``CUDA_VISIBLE_DEVICES`` set to its one device and ``--device cuda:0``. Indexes count
  the devices this process sees (an inherited ``CUDA_VISIBLE_DEVICES`` is honoured).
- ``--devices cpu:N``: N CPU children, each with ``--threads`` = cores // N (at least 1)
  unless ``--threads`` was given.

Each slot's consumer name is stable across restarts (``<base>-<slot>``), so a restarted
child takes back its own pending jobs at once instead of waiting out their lease. With
``--metrics-port P`` the slots serve their metrics on P, P+1, ...

A child that exits non-zero or is killed is restarted after a backoff (1 s, doubling to
30 s; a run of a minute resets it). A child exiting 0 stopped on purpose and is not
restarted. A slot whose child fails ``max_start_failures`` times in a row, never running
for ``stable_after_s``, makes the supervisor give up: it stops the other children and
exits 1. SIGTERM and SIGINT are forwarded to every child, which answers what it holds and
exits; stragglers are killed after the worker's shutdown grace. The supervisor exits 0
when every child stopped cleanly.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from embedq.worker.config import config_from_args
from embedq.worker.model_files import read_layout

log = logging.getLogger(__name__)

DEVICES_FLAG = "--devices"
DEVICES_ENV = "EMBEDQ_DEVICES"
# Time a worker may take to exit after its own shutdown grace (it force-exits then).
EXIT_MARGIN_S = 5.0
_POLL_S = 0.1


class SupervisorError(Exception):
    """The supervisor cannot start: a bad --devices value, or no device to run on."""


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed ``--devices``: N CPU processes, or CUDA indexes (None: every visible one)."""

    cpu_processes: int = 0
    cuda_indexes: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Slot:
    """One child process: its label (also the consumer-name suffix) and what it gets."""

    name: str
    device: str
    # Added to the child's environment (CUDA_VISIBLE_DEVICES for a GPU slot).
    env: Mapping[str, str] = field(default_factory=dict)
    # --threads for the child; None leaves the user's value or the worker's default.
    threads: int | None = None
    # --metrics-port for the child; 0 leaves it off.
    metrics_port: int = 0


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    # A run at least this long resets the backoff and the failure count.
    stable_after_s: float = 60.0
    # Consecutive failures, none after a stable run, before the supervisor gives up.
    max_start_failures: int = 5

    def delay_s(self, failures: int) -> float:
        """Wait before restart number ``failures`` (1-based) of a run of failures."""
        return float(min(self.max_delay_s, self.first_delay_s * 2 ** max(0, failures - 1)))


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """How to start one slot's process."""

    slot: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    # For the log (the command line may hold a Redis password).
    summary: str = ""


@dataclass(frozen=True, kw_only=True)
class SupervisorConfig:
    slots: tuple[Slot, ...]
    # The `embedq` command line of the children, without --devices.
    worker_args: tuple[str, ...]
    consumer_base: str
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    # After the stop signal, children still running this long later are killed.
    stop_timeout_s: float = 30.0 + EXIT_MARGIN_S
    python: str = sys.executable


# ----------------------------------------------------------------------- planning
def parse_devices(spec: str) -> DeviceSpec:
    """``all``, ``cpu:N``, or a comma-separated list of CUDA indexes (``0,2``, ``cuda:1``)."""
    text = spec.strip().lower()
    if text == "all":
        return DeviceSpec()
    if text.startswith("cpu"):
        count = text[4:] if text.startswith("cpu:") else ""
        if not count.isdigit() or int(count) < 1:
            raise SupervisorError(f"--devices {spec!r}: write cpu:N with N at least 1 (e.g. cpu:4)")
        return DeviceSpec(cpu_processes=int(count))
    indexes: list[int] = []
    for item in text.split(","):
        item = item.strip().removeprefix("cuda:")
        if not item.isdigit():
            raise SupervisorError(
                f"--devices {spec!r}: expected all, cpu:N or CUDA indexes such as 0,2 (got {item!r})"
            )
        if int(item) in indexes:
            raise SupervisorError(f"--devices {spec!r}: CUDA device {int(item)} is listed twice")
        indexes.append(int(item))
    return DeviceSpec(cuda_indexes=tuple(indexes))


def plan_slots(
    devices: DeviceSpec,
    *,
    cuda_device_count: Callable[[], int],
    cpu_cores: int,
    visible_devices: str | None,
    threads: int | None,
    metrics_port: int,
) -> tuple[Slot, ...]:
    """The slots ``devices`` asks for. ``visible_devices`` is the inherited
    CUDA_VISIBLE_DEVICES (None when unset): CUDA indexes count the devices it lists."""
    if devices.cpu_processes:
        n = devices.cpu_processes
        per_child = threads or max(1, cpu_cores // n)
        return tuple(
            Slot(
                name=f"cpu{i}",
                device="cpu",
                threads=per_child,
                metrics_port=metrics_port and metrics_port + i,
            )
            for i in range(n)
        )
    indexes = devices.cuda_indexes
    if indexes is None:
        count = cuda_device_count()
        if count < 1:
            raise SupervisorError(
                "--devices all: no CUDA device is visible (torch.cuda.device_count() is 0); check the "
                "driver, CUDA_VISIBLE_DEVICES and the container's GPU access, or use --devices cpu:N"
            )
        indexes = tuple(range(count))
    listed = None if visible_devices is None else [d.strip() for d in visible_devices.split(",") if d.strip()]
    slots = []
    for i, index in enumerate(indexes):
        if listed is not None and index >= len(listed):
            raise SupervisorError(
                f"--devices: CUDA device {index} is not among the {len(listed)} that "
                f"CUDA_VISIBLE_DEVICES={visible_devices!r} makes visible"
            )
        physical = listed[index] if listed is not None else str(index)
        slots.append(
            Slot(
                name=f"gpu{index}",
                device="cuda:0",
                env={"CUDA_VISIBLE_DEVICES": physical},
                metrics_port=metrics_port and metrics_port + i,
            )
        )
    return tuple(slots)


def probe_cuda_device_count(python: str = sys.executable, timeout_s: float = 180.0) -> int:
    """CUDA devices torch sees, counted in a short-lived child process: the supervisor
    itself never loads torch nor initialises CUDA."""
    code = "import torch; print(torch.cuda.device_count())"
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SupervisorError(f"--devices all: counting CUDA devices failed: {exc}") from exc
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not lines[-1].strip().isdigit():
        why = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SupervisorError(f"--devices all: cannot count CUDA devices with torch: {why}")
    return int(lines[-1])


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def strip_devices(argv: Sequence[str]) -> list[str]:
    """The command line without ``--devices X`` / ``--devices=X``. (argparse cannot take
    an abbreviation of it: every prefix is --device or ambiguous.)"""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == DEVICES_FLAG:
            skip = True
        elif not arg.startswith(DEVICES_FLAG + "="):
            out.append(arg)
    return out


def supervisor_config_from_args(
    ns: argparse.Namespace,
    argv: Sequence[str],
    *,
    environ: Mapping[str, str],
    cuda_device_count: Callable[[], int] = probe_cuda_device_count,
) -> SupervisorConfig:
    """Check the worker flags here, once (a bad flag or model folder fails now, not in
    every child), then plan the slots. ``argv``: the `embedq` command line."""
    worker = config_from_args(ns)
    if worker.backend == "torch":
        read_layout(Path(worker.model_path), pooling=worker.pooling, llm_reranker=worker.llm_reranker)
    slots = plan_slots(
        parse_devices(ns.devices),
        cuda_device_count=cuda_device_count,
        cpu_cores=available_cores(),
        visible_devices=environ.get("CUDA_VISIBLE_DEVICES"),
        threads=worker.threads,
        metrics_port=worker.metrics_port,
    )
    host = socket.gethostname()[:40] or "host"
    return SupervisorConfig(
        slots=slots,
        worker_args=tuple(strip_devices(argv)),
        consumer_base=worker.consumer_name or f"{host}-{os.getpid()}",
        policy=RestartPolicy(first_delay_s=ns.restart_backoff_s),
        stop_timeout_s=worker.shutdown_grace_s + EXIT_MARGIN_S,
    )


def child_specs(config: SupervisorConfig, environ: Mapping[str, str]) -> list[ChildSpec]:
    """Each slot's command line: the worker's, then the slot's flags (argparse keeps the
    last value of a repeated flag, so these win over the user's)."""
    base_env = {k: v for k, v in environ.items() if k != DEVICES_ENV}
    specs = []
    for slot in config.slots:
        consumer = f"{config.consumer_base}-{slot.name}"
        argv = [config.python, "-m", "embedq", *config.worker_args, "--device", slot.device]
        argv += ["--consumer-name", consumer]
        summary = [slot.device, *(f"{k}={v}" for k, v in slot.env.items())]
        if slot.threads:
            argv += ["--threads", str(slot.threads)]
            summary.append(f"--threads {slot.threads}")
        if slot.metrics_port:
            argv += ["--metrics-port", str(slot.metrics_port)]
            summary.append(f"--metrics-port {slot.metrics_port}")
        summary.append(f"consumer {consumer}")
        specs.append(
            ChildSpec(
                slot=slot.name, argv=tuple(argv), env={**base_env, **slot.env}, summary=", ".join(summary)
            )
        )
    return specs


# ----------------------------------------------------------------------- running
def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook: the child gets SIGTERM (and drains) if the supervisor is killed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the supervisor died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    starts: int = 0
    # Failures in a row, none after a stable run.
    failures: int = 0
    # monotonic time of the next start; None: not waiting to start.
    restart_at: float | None = None
    # The exit code in answer to the stop (None: none yet).
    final: int | None = None


class Supervisor:
    """Runs the children until they all stop; ``request_stop`` (from a signal handler or
    another thread) forwards a signal to them and ends the run."""

    def __init__(
        self, children: Sequence[ChildSpec], *, policy: RestartPolicy, stop_timeout_s: float
    ) -> None:
        self.children = [_Child(spec) for spec in children]
        self.policy = policy
        self.stop_timeout_s = stop_timeout_s
        self._preexec = _die_with_parent()
        self._pending_signal: int | None = None
        self._stop_signal: int | None = None
        self._stop_deadline: float | None = None
        self._gave_up = False

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Safe in a signal handler: the run loop forwards it within a poll interval."""
        self._pending_signal = signum

    @property
    def pids(self) -> dict[str, int]:
        """The live child of each slot."""
        return {c.spec.slot: c.proc.pid for c in self.children if c.proc is not None}

    def run(self) -> int:
        for child in self.children:
            self._start(child)
        while True:
            now = time.monotonic()
            for child in self.children:
                code = child.proc.poll() if child.proc is not None else None
                if code is not None:
                    self._exited(child, code, now)
            if self._pending_signal is not None:
                signum, self._pending_signal = self._pending_signal, None
                self._forward(signum, now)
            if self._stop_deadline is not None and now >= self._stop_deadline:
                self._kill_stragglers()
            if all(c.proc is None and c.restart_at is None for c in self.children):
                break
            for child in self.children:
                if child.restart_at is not None and now >= child.restart_at and self._stop_signal is None:
                    self._start(child)
            time.sleep(_POLL_S)
        if self._gave_up:
            return 1
        clean = {0, -signal.SIGTERM, -signal.SIGINT}
        # A child killed by the forwarded signal itself had not set up its handlers yet:
        # it was still starting and held nothing.
        return 0 if all(c.final is None or c.final in clean for c in self.children) else 1

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        child.starts += 1
        try:
            child.proc = subprocess.Popen(child.spec.argv, env=dict(child.spec.env), preexec_fn=self._preexec)
        except OSError as exc:
            log.error("slot %s: the worker could not be started: %s", child.spec.slot, exc)
            child.proc = None
            self._failed(child, 127, time.monotonic(), ran_s=0.0, pid=None)
            return
        child.started = time.monotonic()
        what = "started (" if child.starts == 1 else f"restarted (restart {child.starts - 1}, "
        log.info("slot %s: worker pid %d %s%s)", child.spec.slot, child.proc.pid, what, child.spec.summary)

    def _exited(self, child: _Child, code: int, now: float) -> None:
        assert child.proc is not None
        pid, ran_s = child.proc.pid, now - child.started
        child.proc = None
        if self._stop_signal is not None:
            child.final = code
            level = logging.INFO if code in (0, -self._stop_signal) else logging.WARNING
            log.log(
                level, "slot %s: worker pid %d %s after the stop", child.spec.slot, pid, describe_exit(code)
            )
        elif code == 0:
            log.info("slot %s: worker pid %d exited with code 0; not restarted", child.spec.slot, pid)
        else:
            self._failed(child, code, now, ran_s=ran_s, pid=pid)

    def _failed(self, child: _Child, code: int, now: float, *, ran_s: float, pid: int | None) -> None:
        if ran_s >= self.policy.stable_after_s:
            child.failures = 0
        child.failures += 1
        who = f"worker pid {pid}" if pid is not None else "worker"
        if child.failures >= self.policy.max_start_failures:
            log.error(
                "slot %s: %s %s after %.1f s; it failed %d times in a row, each within %g s of its "
                "start: giving up and stopping the other workers",
                child.spec.slot,
                who,
                describe_exit(code),
                ran_s,
                child.failures,
                self.policy.stable_after_s,
            )
            self._gave_up = True
            self._forward(signal.SIGTERM, now)
            return
        delay = self.policy.delay_s(child.failures)
        child.restart_at = now + delay
        log.warning(
            "slot %s: %s %s after %.1f s; restarting in %g s",
            child.spec.slot,
            who,
            describe_exit(code),
            ran_s,
            delay,
        )

    def _forward(self, signum: int, now: float) -> None:
        running = [c for c in self.children if c.proc is not None]
        for child in self.children:
            child.restart_at = None
        if self._stop_signal is None:
            self._stop_signal = signum
            self._stop_deadline = now + self.stop_timeout_s
            log.info(
                "stopping %d workers with %s (they answer what they hold); waiting up to %g s",
                len(running),
                signal.Signals(signum).name,
                self.stop_timeout_s,
            )
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signum)

    def _kill_stragglers(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                log.warning(
                    "slot %s: worker pid %d still running %g s after the stop; killing it",
                    child.spec.slot,
                    child.proc.pid,
                    self.stop_timeout_s,
                )
                child.proc.kill()
        self._stop_deadline = None


def run_supervisor(config: SupervisorConfig, environ: Mapping[str, str]) -> int:
    """Run one worker per slot until stopped (SIGTERM/SIGINT) or given up; the exit code."""
    supervisor = Supervisor(
        child_specs(config, environ), policy=config.policy, stop_timeout_s=config.stop_timeout_s
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        supervisor.request_stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("supervising %d workers: %s", len(config.slots), ", ".join(s.name for s in config.slots))
    try:
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
