"""GPU throughput and MFU: embedq's torch backend against sentence-transformers, one device.

Models are random-weight encoders of real sizes (speed does not depend on the weights),
built from transformers configs and saved as sentence-transformers folders (safetensors)
with the bundled model's WordPiece tokenizer, so both sides load the same files:

- ``bert-base``: 12 layers × 768, 12 heads, mean pooling;
- ``bert-large``: 24 layers × 1024, 16 heads, mean pooling;
- ``qwen3-0.6b``: Qwen3-Embedding-0.6B's shape (28 layers × 1024, 16 query heads of 128,
  8 KV heads, MLP 3072), last-token pooling.

Per model and sequence length L (128 and 512 tokens), two workloads: ``L`` (every row
exactly L tokens) and ``≤L`` (lengths drawn uniformly from L/8..L, as real passages
are), each with these runners:

1. embedq packed: ``TorchBackend.embed`` with ``--packing auto`` (on a GPU in bf16: the
   sequences end to end, flash varlen attention; worker/backends/packed.py), the
   worker's own path: pinned host copies, the forward pass, pooling, the copy back;
2. embedq padded: the same with ``--packing off`` (right-padded rows, SDPA);
3. sentence-transformers' module path (its ``forward`` on the same ids, i.e. ``encode``
   without tokenization) in float32, its default, and in bfloat16, padded to the
   batch's longest row as ``encode`` pads.

Each runner: two untimed batches, then ``--batches`` timed ones. MFU = model FLOPs ÷ time
÷ the device's measured matmul peak in the runner's dtype (best of square matmuls; a
float32 run against the float32 peak, since on a CPU without native bf16 a float32 run
outruns the bf16 peak). FLOPs count real
tokens only (padding is waste, not work): 2 · (weights of the Linear layers) per token +
attention's QKᵀ and AV (4 · len² · heads · head_dim per sequence and layer); embeddings,
norms, activations and pooling are not counted.

    python bench/gpu_throughput.py --json-out gpu.json
    python bench/gpu_throughput.py --models bert-base --lengths 512 --batches 20 --workloads mixed
    python bench/gpu_throughput.py --device cpu --tiny --packings on,off   # checks the script, no GPU

On a machine without the device it says so and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from embedq.worker.backends.torch_backend import TorchBackend
from embedq.worker.config import WorkerConfig, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VOCAB = 30522  # the bundled WordPiece tokenizer's

# name -> (config class, fields, pooling); real sizes, then --tiny's stand-ins.
MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "bert-base": (
        "BertConfig",
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        "mean",
    ),
    "bert-large": (
        "BertConfig",
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
        "mean",
    ),
    "qwen3-0.6b": (
        "Qwen3Config",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 3072,
            "pad_token_id": 0,
        },
        "last-token",
    ),
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
# head_dim × heads ≠ hidden, as in the real Qwen3 (16 × 128 against 1024).
TINY_QWEN = {**TINY, "num_key_value_heads": 2, "head_dim": 32, "pad_token_id": 0}
POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "last-token": "pooling_mode_lasttoken"}


@dataclass
class Result:
    model: str
    length: int
    workload: str  # "fixed": every row `length` tokens; "mixed": length/8..length
    batch: int
    runner: str
    dtype: str  # the runner's, whose matmul peak its MFU is taken against
    sequences_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: float
    min_cosine_to_st_fp32: float | None = None


# ---------------------------------------------------------------- models
def build_folder(
    folder: Path, name: str, tiny: bool, max_length: int, tokenizer_from: Path | None = None
) -> Path:
    """A sentence-transformers folder with random weights of ``name``'s shape, and the
    tokenizer files of ``tokenizer_from`` (default: the bundled model's)."""
    config_name, fields, pooling = MODELS[name]
    if tiny:
        fields = TINY_QWEN if config_name == "Qwen3Config" else TINY
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, max_position_embeddings=max(max_length, 512) + 2, **fields
    )
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    source = tokenizer_from or Path(resolve_model(None, "torch")[1])
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy(source / file, folder / file)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    (folder / "1_Pooling").mkdir()
    pool = {"word_embedding_dimension": config.hidden_size, **{k: False for k in POOLING_KEYS.values()}}
    pool[POOLING_KEYS[pooling]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    return folder


def flops_per_batch(model: torch.nn.Module, lengths: Sequence[int]) -> int:
    """Linear layers on every real token, plus attention's QKᵀ and AV per sequence."""
    weights = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "pooler" not in name.split(".")
    )
    cfg: Any = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    squares = sum(n * n for n in lengths)
    attention = int(cfg.num_hidden_layers) * 4 * squares * heads * head_dim
    return 2 * weights * sum(lengths) + attention


def row_lengths(workload: str, length: int, rows: int, seed: int = 0) -> list[int]:
    """Token counts of a batch's rows: all ``length``, or uniform in length/8..length."""
    if workload == "fixed":
        return [length] * rows
    rng = np.random.default_rng(seed)
    return rng.integers(max(1, length // 8), length + 1, size=rows).tolist()


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The dtypes whose matmul peak is measured, by the name each runner's label ends with.
PEAK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_peak_tflops(
    device: torch.device, sizes: Sequence[int], dtype: torch.dtype = torch.bfloat16, repeats: int = 10
) -> float:
    """Best TFLOP/s of square ``dtype`` matmuls on ``device``."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def time_runner(
    run: Callable[[], np.ndarray], device: torch.device, batches: int
) -> tuple[float, np.ndarray]:
    """Seconds per batch (mean over ``batches`` after two untimed), and the last output."""
    out = run()
    out = run()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        out = run()  # every runner copies its result to the host: a full round trip
    sync(device)
    return (time.perf_counter() - start) / batches, out


def st_runner(
    folder: Path, device: torch.device, dtype: torch.dtype, rows: Sequence[Sequence[int]]
) -> Callable[[], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    features = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = st.forward(dict(features))["sentence_embedding"]
        return out.float().cpu().numpy()

    return run


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return float(cos.min())


def embedq_runner(
    name: str, folder: Path, args: argparse.Namespace, packing: str, rows: list[list[int]]
) -> tuple[str, Callable[[], np.ndarray], torch.nn.Module]:
    config = WorkerConfig(
        model_id=name,
        model_path=str(folder),
        served_model_name=name,
        device=args.device,
        dtype=args.dtype,
        packing=packing,  # type: ignore[arg-type]
        max_batch_requests=len(rows),
    )
    backend = TorchBackend(config)
    backend.warmup()
    desc = backend.description
    label = f"embedq {'packed' if desc.packed else 'padded'} {desc.dtype}"
    return label, functools.partial(backend.embed, rows), backend.model


def measure(
    name: str, folder: Path, length: int, workload: str, args: argparse.Namespace, peaks: dict[str, float]
) -> list[Result]:
    device = torch.device(args.device)
    batch = max(1, args.tokens_per_batch // length)
    lengths = row_lengths(workload, length, batch)
    rng = np.random.default_rng(0)
    rows = [rng.integers(1000, VOCAB, size=n).tolist() for n in lengths]
    runs: list[tuple[str, float, np.ndarray]] = []
    flops = 0
    for packing in args.packings:
        label, run, model = embedq_runner(name, folder, args, packing, rows)
        flops = flops_per_batch(model, lengths)
        if any(label == seen for seen, _, _ in runs):
            # auto chose padded (no GPU, or the start check failed: the log says which)
            print(f"  --packing {packing} ran padded here; measured once", flush=True)
            continue
        seconds, out = time_runner(run, device, args.batches)
        runs.append((label, seconds, out))
        del run, model  # frees the device for the next runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        run = st_runner(folder, device, dtype, rows)
        seconds, out = time_runner(run, device, args.batches)
        runs.append((f"sentence-transformers {dtype_name}", seconds, out))
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    st_fp32 = next(out for label, _, out in runs if label == "sentence-transformers float32")
    results = []
    for runner, seconds, out in runs:
        dtype = runner.rsplit(" ", 1)[1]  # every label ends with its dtype
        results.append(
            Result(
                model=name,
                length=length,
                workload=workload,
                batch=batch,
                runner=runner,
                dtype=dtype,
                sequences_per_s=batch / seconds,
                tokens_per_s=sum(lengths) / seconds,
                tflops=flops / seconds / 1e12,
                mfu=flops / seconds / 1e12 / peaks[dtype],
                min_cosine_to_st_fp32=cosine_min(out, st_fp32),
            )
        )
    return results


def print_table(results: list[Result], peaks: dict[str, float], header: bool = True) -> None:
    if header:
        print("\nmatmul peaks (TFLOP/s): " + ", ".join(f"{dt} {tf:.1f}" for dt, tf in peaks.items()))
        print(
            f"{'model':<12}{'rows':>6}{'batch':>6}  {'runner':<32}{'seq/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
            f"{'× ST fp32':>10}{'min cos':>10}"
        )
    for r in results:
        base = next(
            x
            for x in results
            if (x.model, x.length, x.workload) == (r.model, r.length, r.workload)
            and x.runner == "sentence-transformers float32"
        )
        cos = f"{r.min_cosine_to_st_fp32:.5f}" if r.min_cosine_to_st_fp32 is not None else "-"
        rows = f"{'' if r.workload == 'fixed' else '≤'}{r.length}"
        print(
            f"{r.model:<12}{rows:>6}{r.batch:>6}  {r.runner:<32}{r.sequences_per_s:>10.1f}"
            f"{r.tflops:>9.1f}{r.mfu:>7.3f}{r.sequences_per_s / base.sequences_per_s:>9.2f}×{cos:>10}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device (cpu with --tiny to check the script)")
    p.add_argument("--dtype", default="auto", help="embedq's --dtype")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--lengths", default="128,512", help="comma-separated sequence lengths")
    p.add_argument("--tokens-per-batch", type=int, default=32768, help="batch = this ÷ length")
    p.add_argument(
        "--packings",
        default="auto,off",
        help="embedq runners by --packing (auto packs on a GPU; on forces the packed path, "
        "which a CPU runs with per-sequence attention)",
    )
    p.add_argument(
        "--workloads",
        default="fixed,mixed",
        help="comma-separated: fixed (every row L tokens), mixed (L/8..L tokens)",
    )
    p.add_argument("--batches", type=int, default=10, help="timed batches per runner")
    p.add_argument("--tiny", action="store_true", help="tiny stand-ins of each model (a quick check)")
    p.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="folder with the WordPiece tokenizer files (default: the bundled model's; "
        "scripts/device_kit.sh copies them for a machine without the model package)",
    )
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}: use {', '.join(MODELS)}")
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.packings = [x for x in args.packings.split(",") if x]
    if not args.packings or not set(args.packings) <= {"auto", "on", "off"}:
        p.error("--packings takes auto, on and/or off")
    if not set(args.workloads) <= {"fixed", "mixed"}:
        p.error("--workloads takes fixed and/or mixed")
    return args


def write_report(
    path: Path | None, device: str, peaks: dict[str, float], args: argparse.Namespace, results: list[Result]
) -> None:
    """The JSON report so far: rewritten after every measurement, so a run cut short by
    its time limit (a lent GPU's minutes) still leaves what it measured."""
    if path is None:
        return
    report = {
        "device": device,
        "peak_tflops": peaks,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": vars(args),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu --tiny to check the script)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sizes = (512,) if args.tiny else (4096, 8192)
    peaks = {label: matmul_peak_tflops(device, sizes, dtype) for label, dtype in PEAK_DTYPES.items()}
    print(f"device: {name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="embedq-gpu-") as tmp:
        for model in args.models:
            folder = build_folder(Path(tmp) / model, model, args.tiny, max(args.lengths), args.tokenizer_from)
            for length in args.lengths:
                for workload in args.workloads:
                    batch = max(1, args.tokens_per_batch // length)
                    print(f"{model}, {batch} rows of {length} tokens ({workload}) ...", flush=True)
                    rows = measure(model, folder, length, workload, args, peaks)
                    print_table(rows, peaks, header=not results)
                    results += rows
                    write_report(args.json_out, name, peaks, args, results)
    print("\nall results:")
    print_table(results, peaks)
    if args.json_out is not None:
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
