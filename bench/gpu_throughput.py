"""GPU throughput and MFU: embedq's torch backend against sentence-transformers, one device.

Models are random-weight encoders of real sizes (speed does not depend on the weights),
built from transformers configs and saved as sentence-transformers folders (safetensors)
with the bundled model's WordPiece tokenizer, so both sides load the same files:

- ``bert-base``: 12 layers × 768, 12 heads, mean pooling;
- ``bert-large``: 24 layers × 1024, 16 heads, mean pooling;
- ``qwen3-0.6b``: Qwen3-Embedding-0.6B's shape (28 layers × 1024, 16 query heads of 128,
  8 KV heads, MLP 3072), last-token pooling.

Per model and sequence length (128 and 512 tokens), every row exactly that long:

1. embedq: ``TorchBackend.embed`` (``--dtype auto``: bf16 on a GPU that has it), the
   worker's own path: pinned host copies, the forward pass, pooling, the copy back;
2. sentence-transformers' module path (its ``forward`` on the same ids, i.e. ``encode``
   without tokenization) in float32, its default, and in bfloat16.

Each runner: two untimed batches, then ``--batches`` timed ones. MFU = model FLOPs ÷ time
÷ the device's measured bf16 matmul peak (best of square matmuls). FLOPs: 2 · (weights
of the Linear layers) · tokens + attention's QKᵀ and AV (4 · L² · heads · head_dim per
sequence and layer); embeddings, norms, activations and pooling are not counted.

    python bench/gpu_throughput.py --json-out gpu.json
    python bench/gpu_throughput.py --models bert-base --lengths 512 --batches 20
    python bench/gpu_throughput.py --device cpu --tiny      # checks the script, no GPU

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
    batch: int
    runner: str
    sequences_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: float
    min_cosine_to_st_fp32: float | None = None


# ---------------------------------------------------------------- models
def build_folder(folder: Path, name: str, tiny: bool, max_length: int) -> Path:
    """A sentence-transformers folder with random weights of ``name``'s shape."""
    config_name, fields, pooling = MODELS[name]
    if tiny:
        fields = TINY_QWEN if config_name == "Qwen3Config" else TINY
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, max_position_embeddings=max(max_length, 512) + 2, **fields
    )
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _, bundled = resolve_model(None, "torch")
    for file in TOKENIZER_FILES:
        if (Path(bundled) / file).is_file():
            shutil.copy(Path(bundled) / file, folder / file)
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


def flops_per_batch(model: torch.nn.Module, rows: int, length: int) -> int:
    """Linear layers on every token, plus attention's QKᵀ and AV."""
    weights = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "pooler" not in name.split(".")
    )
    cfg: Any = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    attention = int(cfg.num_hidden_layers) * 4 * rows * length * length * heads * head_dim
    return 2 * weights * rows * length + attention


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, sizes: Sequence[int], repeats: int = 10) -> float:
    """Best bf16 TFLOP/s of square matmuls on ``device``."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
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
    folder: Path, device: torch.device, dtype: torch.dtype, ids: torch.Tensor
) -> Callable[[], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
    features = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = st.forward(dict(features))["sentence_embedding"]
        return out.float().cpu().numpy()

    return run


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return float(cos.min())


def measure(
    name: str, folder: Path, length: int, batch: int, args: argparse.Namespace, peak: float
) -> list[Result]:
    device = torch.device(args.device)
    config = WorkerConfig(
        model_id=name,
        model_path=str(folder),
        served_model_name=name,
        device=args.device,
        dtype=args.dtype,
        max_batch_requests=batch,
    )
    backend = TorchBackend(config)
    backend.warmup()
    flops = flops_per_batch(backend.model, batch, length)
    rng = np.random.default_rng(0)
    rows = rng.integers(1000, VOCAB, size=(batch, length)).tolist()
    run: Callable[[], np.ndarray] = functools.partial(backend.embed, rows)
    seconds, eq_out = time_runner(run, device, args.batches)
    runs = [(f"embedq {backend.description.dtype}", seconds, eq_out)]
    del run, backend  # frees the device for the next runner
    ids = torch.tensor(rows, dtype=torch.int64)
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        run = st_runner(folder, device, dtype, ids)
        seconds, out = time_runner(run, device, args.batches)
        runs.append((f"sentence-transformers {dtype_name}", seconds, out))
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    st_fp32 = runs[1][2]
    results = []
    for runner, seconds, out in runs:
        results.append(
            Result(
                model=name,
                length=length,
                batch=batch,
                runner=runner,
                sequences_per_s=batch / seconds,
                tokens_per_s=batch * length / seconds,
                tflops=flops / seconds / 1e12,
                mfu=flops / seconds / 1e12 / peak,
                min_cosine_to_st_fp32=cosine_min(out, st_fp32),
            )
        )
    return results


def print_table(results: list[Result], peak: float) -> None:
    print(f"\nbf16 matmul peak: {peak:.1f} TFLOP/s")
    print(
        f"{'model':<12}{'len':>5}{'batch':>6}  {'runner':<32}{'seq/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'× ST fp32':>10}{'min cos':>10}"
    )
    for r in results:
        base = next(
            x for x in results if (x.model, x.length) == (r.model, r.length) and x.runner.endswith("float32")
        )
        cos = f"{r.min_cosine_to_st_fp32:.5f}" if r.min_cosine_to_st_fp32 is not None else "-"
        print(
            f"{r.model:<12}{r.length:>5}{r.batch:>6}  {r.runner:<32}{r.sequences_per_s:>10.1f}"
            f"{r.tflops:>9.1f}{r.mfu:>7.3f}{r.sequences_per_s / base.sequences_per_s:>9.2f}×{cos:>10}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device (cpu with --tiny to check the script)")
    p.add_argument("--dtype", default="auto", help="embedq's --dtype")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--lengths", default="128,512", help="comma-separated sequence lengths")
    p.add_argument("--tokens-per-batch", type=int, default=32768, help="batch = this ÷ length")
    p.add_argument("--batches", type=int, default=10, help="timed batches per runner")
    p.add_argument("--tiny", action="store_true", help="tiny stand-ins of each model (a quick check)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}: use {', '.join(MODELS)}")
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu --tiny to check the script)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = matmul_peak_tflops(device, (512,) if args.tiny else (4096, 8192))
    print(f"device: {name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="embedq-gpu-") as tmp:
        for model in args.models:
            folder = build_folder(Path(tmp) / model, model, args.tiny, max(args.lengths))
            for length in args.lengths:
                batch = max(1, args.tokens_per_batch // length)
                print(f"{model}, {batch} × {length} tokens ...", flush=True)
                results += measure(model, folder, length, batch, args, peak)
    print_table(results, peak)
    if args.json_out is not None:
        report = {
            "device": name,
            "peak_bf16_tflops": peak,
            "args": vars(args),
            "results": [asdict(r) for r in results],
        }
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
