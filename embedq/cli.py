"""The `embedq` command: `up` (all-in-one), `worker`, `gateway`, `status`, `dlq`,
`exporter` and `embed-file`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from embedq.common.settings import DEFAULT_REDIS_URL
from embedq.ingest import add_embed_file_arguments
from embedq.logs import setup_logging


def _cmd_supervisor(ns: argparse.Namespace, argv: list[str]) -> int:
    """`embedq worker --devices ...`: one worker process per device, restarted when it dies."""
    from embedq.worker.config import ConfigError
    from embedq.worker.model_files import ModelFolderError
    from embedq.worker.supervisor import SupervisorError, run_supervisor, supervisor_config_from_args

    try:
        config = supervisor_config_from_args(ns, argv, environ=os.environ)
    except (ConfigError, ModelFolderError, SupervisorError, ValueError) as exc:
        logging.getLogger("embedq").error("%s", exc)
        return 2
    code: int = run_supervisor(config, os.environ)
    return code


def _cmd_worker(ns: argparse.Namespace, argv: list[str]) -> int:
    if ns.devices:
        return _cmd_supervisor(ns, argv)
    from redis.exceptions import RedisError

    from embedq.worker.config import ConfigError, config_from_args
    from embedq.worker.main import run_worker
    from embedq.worker.model_files import ModelFolderError
    from embedq.worker.service import RegistrationConflict, WorkerFault

    try:
        config = config_from_args(ns)
        run_worker(config)
    except (ConfigError, ModelFolderError, RegistrationConflict, ValueError) as exc:
        logging.getLogger("embedq").error("%s", exc)
        return 2
    except RedisError as exc:  # at start-up (a running worker waits refusals out)
        logging.getLogger("embedq").error(
            "the worker stopped: Redis answered %s: %s", type(exc).__name__, exc
        )
        return 1
    except WorkerFault as exc:
        logging.getLogger("embedq").critical("worker stopped: %s", exc)
        # Exit now: a hung inference thread would keep a normal exit waiting forever.
        logging.shutdown()
        os._exit(1)
    return 0


def _cmd_gateway(ns: argparse.Namespace) -> int:
    from embedq.producer.gateway.config import GatewayConfigError, gateway_config_from_args
    from embedq.producer.gateway.server import run_gateway

    try:
        config = gateway_config_from_args(ns)
    except (GatewayConfigError, ValueError) as exc:
        logging.getLogger("embedq").error("%s", exc)
        return 2
    run_gateway(config)
    return 0


def _cmd_status(ns: argparse.Namespace) -> int:
    from embedq.status import status

    try:
        print(status(ns.redis_url, ns.interval))
    except (ConnectionError, OSError) as exc:
        logging.getLogger("embedq").error("%s", exc)
        return 1
    return 0


def _cmd_exporter(ns: argparse.Namespace) -> int:
    import asyncio

    from embedq.exporter import serve

    asyncio.run(serve(ns.redis_url, port=ns.port, host=ns.hostname, refresh_s=ns.refresh_s))
    return 0


def _cmd_embed_file(ns: argparse.Namespace) -> int:
    from embedq.ingest import IngestError, embed_file_from_args

    try:
        embed_file_from_args(ns)
    except IngestError as exc:
        logging.getLogger("embedq").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("embedq").warning("interrupted: run the same command again to resume")
        return 130
    return 0


def _cmd_dlq(ns: argparse.Namespace) -> int:
    import json

    import redis

    from embedq import dlq
    from embedq.common.settings import RedisSettings, connect_sync

    client = connect_sync(RedisSettings.from_env(ns.redis_url), name="embedq-dlq")
    try:
        if ns.action == "list":
            print(dlq.format_list(dlq.read(client, ns.model, ns.count)))
        elif ns.action == "show":
            for d in dlq.read_ids(client, ns.model, ns.ids):
                summary = {k: v for k, v in vars(d).items() if k != "original"}
                summary["job"] = d.job_summary()
                print(json.dumps(summary, indent=2, default=repr))
        elif not ns.ids and not ns.all:
            raise KeyError(f"name the entries to {ns.action}, or pass --all")
        elif ns.action == "replay":
            print(f"replayed {dlq.replay(client, ns.model, ns.ids, everything=ns.all)} entries")
        else:
            print(f"purged {dlq.purge(client, ns.model, ns.ids, everything=ns.all)} entries")
    except KeyError as exc:
        logging.getLogger("embedq").error("%s", exc.args[0])
        return 2
    except redis.RedisError as exc:
        logging.getLogger("embedq").error("Redis: %s", exc)
        return 1
    finally:
        client.close()
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop `up` cleanly, even when the parent started us with
    SIGINT ignored (as shells do for background jobs)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def _cmd_up(ns: argparse.Namespace, passthrough: list[str]) -> int:
    from embedq.up import Stack, StackError

    _stop_on_signals()

    stack = Stack(
        redis_url=ns.redis_url,
        data_dir=Path(ns.data_dir),
        served_model_name=ns.served_model_name,
        worker_args=passthrough,
        gateway_port=None if ns.no_gateway else ns.port,
        gateway_hostname=ns.hostname,
    )
    try:
        stack.start()
        where = f"; HTTP on http://{ns.hostname}:{ns.port}" if not ns.no_gateway else ""
        print(
            f"embedq is up: model {stack.model!r} on {stack.redis_url}{where} (Ctrl-C stops)",
            flush=True,
        )
        return stack.wait()
    except StackError as exc:
        logging.getLogger("embedq").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def build_parser() -> argparse.ArgumentParser:
    from embedq.worker.config import add_worker_arguments

    json_flag = {"action": "store_true", "dest": "json_output_sub", "help": "logs as JSON lines"}
    parser = argparse.ArgumentParser(prog="embedq", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("EMBEDQ_LOG_LEVEL", "info"))
    parser.add_argument(
        "--json-output",
        action="store_true",
        default=os.environ.get("JSON_OUTPUT", "").lower() in ("1", "true"),
        help="logs as one JSON object per line (also accepted after the subcommand)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve one model from a Redis stream")
    add_worker_arguments(worker)
    worker.add_argument("--json-output", **json_flag)  # type: ignore[arg-type]

    from embedq.producer.gateway.config import add_gateway_arguments

    gateway = sub.add_parser("gateway", help="serve TEI's and OpenAI's HTTP APIs in front of the queue")
    add_gateway_arguments(gateway)
    gateway.add_argument("--json-output", **json_flag)  # type: ignore[arg-type]

    redis_url = os.environ.get("EMBEDQ_REDIS_URL", DEFAULT_REDIS_URL)
    st = sub.add_parser(
        "status", help="served models, live workers, backlog, pending, dead letters and throughput"
    )
    st.add_argument("--redis-url", default=redis_url)
    st.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the two reads that give throughput"
    )

    ex = sub.add_parser("exporter", help="serve every model's queue state as Prometheus metrics")
    ex.add_argument("--redis-url", default=redis_url)
    ex.add_argument("--port", type=int, default=int(os.environ.get("EMBEDQ_EXPORTER_PORT", "9400")))
    ex.add_argument("--hostname", default=os.environ.get("EMBEDQ_EXPORTER_HOSTNAME", "0.0.0.0"))
    ex.add_argument("--refresh-s", type=float, default=1.0, help="how often Redis is re-read")

    ef = sub.add_parser(
        "embed-file",
        help="embed a JSONL/CSV/Parquet file into Parquet or .npy through the bulk lane (resumable)",
    )
    add_embed_file_arguments(ef, redis_url)

    dl = sub.add_parser("dlq", help="list, show, replay or purge a model's dead letters")
    dl.add_argument("action", choices=["list", "show", "replay", "purge"])
    dl.add_argument("ids", nargs="*", help="dead-letter entry ids (from `list`)")
    dl.add_argument(
        "--model", default=os.environ.get("EMBEDQ_MODEL", "sentence-transformers/all-MiniLM-L6-v2")
    )
    dl.add_argument("--redis-url", default=redis_url)
    dl.add_argument("--all", action="store_true", help="replay or purge every entry")
    dl.add_argument("--count", type=int, default=100, help="entries `list` shows (newest)")

    up = sub.add_parser(
        "up",
        help="start Redis (embedded unless --redis-url), a worker and the HTTP gateway; "
        "other flags go to the worker",
    )
    up.add_argument("--redis-url", default=os.environ.get("EMBEDQ_REDIS_URL"))
    up.add_argument("--data-dir", default=".embedq", help="where the embedded Redis keeps its data")
    up.add_argument("--served-model-name", default=None)
    up.add_argument("--port", type=int, default=8080, help="the gateway's HTTP port")
    up.add_argument("--hostname", default="127.0.0.1", help="the gateway's listen address")
    up.add_argument("--no-gateway", action="store_true", help="run Redis and the worker only")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    json_output = bool(ns.json_output or getattr(ns, "json_output_sub", False)) or "--json-output" in rest
    setup_logging(ns.log_level, json_output=json_output)
    if ns.command == "up":
        return _cmd_up(ns, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if ns.command == "gateway":
        return _cmd_gateway(ns)
    if ns.command == "status":
        return _cmd_status(ns)
    if ns.command == "dlq":
        return _cmd_dlq(ns)
    if ns.command == "exporter":
        return _cmd_exporter(ns)
    if ns.command == "embed-file":
        return _cmd_embed_file(ns)
    return _cmd_worker(ns, argv)
