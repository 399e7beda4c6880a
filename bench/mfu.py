"""Model FLOPs utilization (MFU) of embedq's torch backend, against this machine's matmul peak.

1. Peak: the best GFLOP/s of square matmuls (2048², 4096²) in float32 and bfloat16 with
   the worker's thread count.
2. Model: embedq's TorchBackend in this process (no queue) embeds the corpus
   (bench/corpus.py) in token-sorted batches, as the worker's batcher cuts them. Only
   the forward passes are timed (tokenization is not).
3. FLOPs, counted for the shapes actually run (padded lengths): 2 · (weights of the
   Linear layers) · tokens, plus attention's QKᵀ and AV (4 · L² · hidden per sequence
   and layer), plus the pooler on one token per sequence. Embeddings, LayerNorm, GELU,
   softmax and pooling are not counted: they are a few % of the work and are not matmuls.

MFU = achieved GFLOP/s ÷ the peak of the same dtype, as a fraction.

    python bench/mfu.py --limit 800
    python bench/mfu.py --limit 400 --dtypes float32,bfloat16 --json-out mfu.json
    python bench/mfu.py --first-request          # cold vs warmed first-request latency

Like the worker, it sets OpenMP's idle waits (OMP_WAIT_POLICY, GOMP_SPINCOUNT) and
keeps freed memory in glibc's heap (``keep_freed_memory``) unless the environment sets
them.
"""

from __future__ import annotations

import os

from embedq.worker.main import keep_freed_memory, set_openmp_waits

# As the worker does; must precede the first torch import, hence the imports below it.
set_openmp_waits()
# As the worker does: freed activation memory stays in the heap for the next pass.
keep_freed_memory()
# ruff: noqa: E402

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus, fingerprint  # noqa: E402

from embedq.worker.backends.torch_backend import TorchBackend  # noqa: E402
from embedq.worker.config import WorkerConfig, resolve_model  # noqa: E402
from embedq.worker.tokenization import EncodeOptions  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENCODE = EncodeOptions(truncate=True, direction="right", prompt=None)


# ---------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, the ISA flags that decide bf16/int8 speed, and versions."""
    model, flags = "unknown", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    import transformers

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "isa": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_fp16", "avx512_vnni", "amx"))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int) -> dict[int, float]:
    """Best GFLOP/s of an n×n @ n×n matmul per size (one untimed call first)."""
    out: dict[int, float] = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        out[n] = 2 * n**3 / best / 1e9
    return out


# ---------------------------------------------------------------- model FLOPs
@dataclass(frozen=True)
class FlopModel:
    """What the count needs of a BERT-style encoder."""

    body_linear_weights: int  # Σ in·out of the Linear layers applied to every token
    pooler_weights: int  # Σ in·out of Linear layers applied to one token per sequence
    layers: int
    hidden: int

    def batch_flops(self, rows: int, length: int) -> int:
        """FLOPs of one forward pass on ``rows`` sequences padded to ``length``."""
        tokens = rows * length
        linears = 2 * self.body_linear_weights * tokens + 2 * self.pooler_weights * rows
        attention = self.layers * 4 * rows * length * length * self.hidden  # QKᵀ and AV
        return linears + attention


def flop_model(model: torch.nn.Module) -> FlopModel:
    body = 0
    pooler = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weights = module.in_features * module.out_features
            if "pooler" in name.split("."):
                pooler += weights
            else:
                body += weights
    cfg: Any = model.config
    return FlopModel(body, pooler, int(cfg.num_hidden_layers), int(cfg.hidden_size))


def check_flop_model(backend: TorchBackend, fm: FlopModel) -> None:
    """Count the Linear FLOPs of one forward pass with hooks; it must equal the formula's."""
    seen = 0

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal seen
        # A parent rewired by cpu_fusion runs its `dense` Linear inside its own forward.
        linear = module if isinstance(module, torch.nn.Linear) else module.dense
        seen += 2 * linear.out_features * inputs[0].numel()

    def counted(m: torch.nn.Module) -> bool:
        fused_parent = "forward" in vars(m) and isinstance(getattr(m, "dense", None), torch.nn.Linear)
        return isinstance(m, torch.nn.Linear) or fused_parent

    handles = [m.register_forward_hook(hook) for m in backend.model.modules() if counted(m)]
    try:
        rows, length = 3, 40
        backend.embed([[1000] * length] * rows)
    finally:
        for h in handles:
            h.remove()
    want = fm.batch_flops(rows, length) - fm.layers * 4 * rows * length * length * fm.hidden
    if seen != want:
        raise SystemExit(f"FLOP model is off: hooks saw {seen} Linear FLOPs, the formula says {want}")


# ---------------------------------------------------------------- runs
@dataclass
class ModelRun:
    dtype: str
    compile: bool
    sentences: int
    real_tokens: int
    padded_tokens: int
    gflop: float
    seconds: list[float]

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def gflops(self) -> float:
        return self.gflop / self.best_s


def make_backend(dtype: str, threads: int, batch: int, compile_: bool = False) -> TorchBackend:
    model_id, path = resolve_model(None, "torch")
    config = WorkerConfig(
        model_id=model_id,
        model_path=path,
        served_model_name=model_id,
        dtype=dtype,
        threads=threads,
        max_batch_requests=batch,
        compile=compile_,
        # Padded batches: the FLOP model counts padded widths (on sorted batches, the
        # packed path computes ~3% fewer tokens, its attention per sequence).
        packing="off",
    )
    return TorchBackend(config)


def sorted_batches(ids: list[list[int]], size: int) -> list[list[int]]:
    """Index batches of ``size`` over the sequences sorted by token count (as e2e_throughput)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def time_pass(backend: TorchBackend, ids: list[list[int]], batches: list[list[int]]) -> float:
    start = time.perf_counter()
    for rows in batches:
        backend.embed([ids[j] for j in rows])
    return time.perf_counter() - start


def padded_width(backend: TorchBackend, seqs: list[list[int]]) -> int:
    width = max(len(s) for s in seqs)
    return backend.padded_width(width)


def run_models(corpus: list[str], args: argparse.Namespace) -> list[ModelRun]:
    """Every (dtype, compile) variant loaded at once, timed in turns (best of --repeats)."""
    variants = [(d, False) for d in args.dtypes] + ([(d, True) for d in args.dtypes] if args.compile else [])
    loaded: dict[tuple[str, bool], tuple[TorchBackend, list[list[int]], list[list[int]]]] = {}
    runs: dict[tuple[str, bool], ModelRun] = {}
    for dtype, comp in variants:
        t0 = time.perf_counter()
        backend = make_backend(dtype, args.threads, args.batch, comp)
        backend.warmup()
        print(
            f"  {dtype}{' + compile' if comp else ''}: loaded and warmed in {time.perf_counter() - t0:.1f}s"
        )
        fm = flop_model(backend.model if not comp else backend.model._orig_mod)
        if not comp:
            check_flop_model(backend, fm)
        ids = backend.tokenizer.encode(corpus, ENCODE)
        batches = sorted_batches(ids, args.batch)
        gflop = 0.0
        padded = 0
        for rows in batches:
            width = padded_width(backend, [ids[j] for j in rows])
            gflop += fm.batch_flops(len(rows), width) / 1e9
            padded += len(rows) * width
        loaded[(dtype, comp)] = (backend, ids, batches)
        runs[(dtype, comp)] = ModelRun(dtype, comp, len(ids), sum(map(len, ids)), padded, gflop, [])
    for rep in range(args.repeats):
        for key, (backend, ids, batches) in loaded.items():
            runs[key].seconds.append(time_pass(backend, ids, batches))
        print(f"  pass {rep + 1}/{args.repeats} done", flush=True)
    return list(runs.values())


# ---------------------------------------------------------------- first request
FIRST_TEXT = "What is the capital city of France?"


def first_request_child(dtype: str, warm: bool, compile_: bool, threads: int) -> dict[str, float]:
    """In a fresh process: load, optionally warm up, then time one 1-sentence request and 20 more."""
    t0 = time.perf_counter()
    backend = make_backend(dtype, threads, 16, compile_)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if warm:
        backend.warmup()
    warm_s = time.perf_counter() - t0
    ids = backend.tokenizer.encode([FIRST_TEXT], ENCODE)
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        backend.embed(ids)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "load_s": load_s,
        "warmup_s": warm_s,
        "first_ms": times[0],
        "steady_ms": statistics.median(times[1:]),
    }


def run_first_request(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dtype in args.dtypes:
        for comp in (False, True) if args.compile else (False,):
            for warm in (False, True):
                cmd = [sys.executable, __file__, "--_child", f"{dtype},{int(warm)},{int(comp)}"]
                cmd += ["--threads", str(args.threads)]
                with tempfile.TemporaryDirectory(prefix="embedq-inductor-") as cache:
                    # An empty compile cache, as in a fresh container: inductor keeps
                    # compiled kernels on disk, and a warm cache hides most compile time.
                    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                result = json.loads(out.strip().splitlines()[-1])
                row = {"dtype": dtype, "compile": comp, "warmup": warm, **result}
                rows.append(row)
                print(
                    f"  {dtype:<9} compile {'on ' if comp else 'off'} warm-up {'on ' if warm else 'off'}: "
                    f"load {row['load_s']:.1f}s, warm-up {row['warmup_s']:.1f}s, "
                    f"first request {row['first_ms']:.1f} ms, then {row['steady_ms']:.1f} ms (median of 20)",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--limit", type=int, default=800, help="passages of the bench corpus")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument(
        "--batch", type=int, default=16, help="sequences per forward pass (the worker's CPU default)"
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the corpus per variant")
    p.add_argument("--peak-sizes", default="2048,4096", help="square matmul sizes for the peak")
    p.add_argument("--compile", action="store_true", help="also run each dtype with --compile")
    p.add_argument("--first-request", action="store_true", help="measure first-request latency instead")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := [d for d in args.dtypes if d not in DTYPES]:
        p.error(f"unknown dtype(s) {bad}")
    if args.limit < 1 or args.repeats < 1 or args.batch < 1:
        p.error("--limit, --repeats and --batch must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        dtype, warm, comp = args._child.split(",")
        print(json.dumps(first_request_child(dtype, warm == "1", comp == "1", args.threads)))
        return 0
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {' '.join(info['isa'])}; torch {info['torch']}")
    print(
        f"threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"
    )
    report: dict[str, Any] = {"machine": info, "config": {k: str(v) for k, v in vars(args).items()}}
    if args.first_request:
        print("first request (fresh process each) ...", flush=True)
        report["first_request"] = run_first_request(args)
    else:
        sizes = tuple(int(s) for s in args.peak_sizes.split(","))
        peaks: dict[str, dict[int, float]] = {}
        for dtype in args.dtypes:
            peaks[dtype] = matmul_peak(DTYPES[dtype], sizes, repeats=5)
            shown = ", ".join(f"{n}²: {g:.0f}" for n, g in peaks[dtype].items())
            print(f"matmul peak {dtype}: {shown} GFLOP/s", flush=True)
        corpus = build_corpus(args.limit)
        print(f"corpus: {len(corpus)} passages, fingerprint {fingerprint(corpus)}", flush=True)
        runs = run_models(corpus, args)
        print()
        cols = f"{'sent/s':>8}{'tokens':>9}{'padded':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'peak':>7}{'MFU':>7}"
        head = f"{'run':<22}{cols}"
        print(head)
        print("-" * len(head))
        rows = []
        for r in runs:
            peak = max(peaks[r.dtype].values())
            mfu = r.gflops / peak
            name = r.dtype + (" + compile" if r.compile else "")
            print(
                f"{name:<22}{r.sentences / r.best_s:>8.1f}{r.real_tokens:>9}"
                f"{r.padded_tokens / r.real_tokens:>7.3f}x"
                f"{r.gflop:>9.1f}{r.gflops:>9.1f}{peak:>7.0f}{mfu:>7.3f}"
            )
            rows.append({**asdict(r), "name": name, "gflops": r.gflops, "peak_gflops": peak, "mfu": mfu})
        print(
            f"\nbest of {args.repeats} passes; spread (max/min time): "
            + ", ".join(f"{r.dtype}{'+c' if r.compile else ''} {max(r.seconds) / r.best_s:.2f}" for r in runs)
        )
        report.update(
            peaks={d: {str(n): g for n, g in p.items()} for d, p in peaks.items()},
            corpus={"passages": len(corpus), "fingerprint": fingerprint(corpus)},
            runs=rows,
        )
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
