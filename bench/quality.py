"""Quality by dtype: embedq's torch backend against sentence-transformers' float32 vectors.

For each variant (``float32``, ``bfloat16``, ``float16``, ``int8`` = float32 with
``--quantize int8``, ``int8-int_mm`` and ``int8-fbgemm`` with its ``--int8-kernel``
pinned; a ``+compile`` suffix adds ``--compile``), embedq's TorchBackend
embeds the bench corpus (bench/corpus.py) in this process, in token-sorted batches as
the worker cuts them. Per variant:

- cosine of each vector to sentence-transformers' float32 vector of the same passage
  (min, 1st percentile, mean);
- retrieval: the mean overlap of each passage's 10 nearest neighbours within the corpus
  with the neighbours under sentence-transformers' float32 vectors (1.0 = same sets);
- throughput of the forward passes (tokenization excluded), best of --repeats passes
  taken in turns across variants, and its ratio to embedq's float32.

    python bench/quality.py --limit 800
    python bench/quality.py --limit 400 --variants float32,int8,int8+compile --json-out q.json
    python bench/quality.py --limit 800 --fp16-limit 200    # float16 on a subset (slow CPUs)

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus, fingerprint  # noqa: E402
from mfu import ENCODE, machine_info, sorted_batches  # noqa: E402

from embedq.worker.backends.torch_backend import TorchBackend  # noqa: E402
from embedq.worker.config import Int8KernelName, WorkerConfig, resolve_model  # noqa: E402

# int8 takes the worker's --int8-kernel auto; int8-int_mm and int8-fbgemm pin a kernel.
VARIANTS = ("float32", "bfloat16", "float16", "int8", "int8-int_mm", "int8-fbgemm")
DEFAULT_VARIANTS = VARIANTS[:4]
NEIGHBOURS = 10


@dataclass
class Variant:
    name: str
    dtype: str
    quantize: str | None
    compile: bool
    limit: int
    int8_kernel: Int8KernelName = "auto"
    seconds: list[float] = field(default_factory=list)
    start_s: float = 0.0
    vectors: np.ndarray | None = None


def parse_variant(name: str, limit: int, fp16_limit: int | None) -> Variant:
    base, _, suffix = name.partition("+")
    if base not in VARIANTS or suffix not in ("", "compile"):
        raise SystemExit(f"unknown variant {name!r}: use {', '.join(VARIANTS)}, each optionally +compile")
    n = min(limit, fp16_limit) if base == "float16" and fp16_limit else limit
    if base.startswith("int8"):
        kernel = cast("Int8KernelName", base.partition("-")[2] or "auto")
        return Variant(name, "float32", "int8", bool(suffix), n, int8_kernel=kernel)
    return Variant(name, base, None, bool(suffix), n)


def load(v: Variant, threads: int, batch: int) -> TorchBackend:
    model_id, path = resolve_model(None, "torch")
    config = WorkerConfig(
        model_id=model_id,
        model_path=path,
        served_model_name=model_id,
        dtype=v.dtype,
        quantize=v.quantize,
        int8_kernel=v.int8_kernel,
        compile=v.compile,
        threads=threads,
        max_batch_requests=batch,
    )
    start = time.perf_counter()
    backend = TorchBackend(config)
    backend.warmup()
    v.start_s = time.perf_counter() - start
    return backend


def embed_pass(
    backend: TorchBackend, ids: list[list[int]], batches: list[list[int]]
) -> tuple[np.ndarray, float]:
    """Vectors in corpus order, and the seconds the forward passes took."""
    out: np.ndarray | None = None
    start = time.perf_counter()
    for rows in batches:
        vecs = backend.embed([ids[j] for j in rows])
        if out is None:
            out = np.empty((len(ids), vecs.shape[1]), dtype=np.float32)
        out[rows] = vecs
    elapsed = time.perf_counter() - start
    assert out is not None
    return out, elapsed


def normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    """Indexes of each row's k nearest other rows by cosine."""
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    k = a.shape[1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def reference_vectors(corpus: list[str], path: str) -> tuple[np.ndarray, float]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    start = time.perf_counter()
    vectors = model.encode(corpus, batch_size=32, convert_to_numpy=True)
    return np.asarray(vectors), time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--limit", type=int, default=800, help="passages of the bench corpus")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, e.g. float32,int8+compile"
    )
    p.add_argument("--fp16-limit", type=int, default=None, help="run float16 on the first N passages only")
    p.add_argument(
        "--batch", type=int, default=16, help="sequences per forward pass (the worker's CPU default)"
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=2, help="timed passes per variant, taken in turns")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.limit < NEIGHBOURS + 1:
        p.error(f"--limit must be more than {NEIGHBOURS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {' '.join(info['isa'])}; torch {info['torch']}")
    corpus = build_corpus(args.limit)
    print(f"corpus: {len(corpus)} passages, fingerprint {fingerprint(corpus)}", flush=True)
    _, path = resolve_model(None, "torch")
    print("sentence-transformers float32 reference ...", flush=True)
    ref, st_s = reference_vectors(corpus, path)
    ref_unit = normalize(ref)
    variants = [parse_variant(n, args.limit, args.fp16_limit) for n in args.variants.split(",") if n]

    loaded: list[tuple[Variant, TorchBackend, list[list[int]], list[list[int]]]] = []
    for v in variants:
        backend = load(v, args.threads, args.batch)
        ids = backend.tokenizer.encode(corpus[: v.limit], ENCODE)
        loaded.append((v, backend, ids, sorted_batches(ids, args.batch)))
        print(f"  {v.name}: loaded and warmed up in {v.start_s:.1f}s", flush=True)
    for rep in range(args.repeats):
        for v, backend, ids, batches in loaded:
            vectors, seconds = embed_pass(backend, ids, batches)
            v.seconds.append(seconds)
            v.vectors = vectors
        print(f"  pass {rep + 1}/{args.repeats} done", flush=True)

    base = next((v for v in variants if v.name == "float32"), None)
    base_rate = base.limit / min(base.seconds) if base else None
    ref_nn_full = neighbours(ref_unit, NEIGHBOURS)
    rows: list[dict[str, Any]] = []
    print()
    cols = f"{'min cos':>10}{'p1 cos':>10}{'mean cos':>10}{'top-10':>8}{'sent/s':>8}{'x fp32':>8}"
    head = f"{'variant':<16}{'n':>5}{cols}"
    print(head)
    print("-" * len(head))
    for v in variants:
        assert v.vectors is not None
        unit = normalize(v.vectors)
        cos = np.sum(unit * ref_unit[: v.limit], axis=1)
        # Neighbours within the variant's own rows (a subset for a subsampled float16).
        ref_nn = ref_nn_full if v.limit == args.limit else neighbours(ref_unit[: v.limit], NEIGHBOURS)
        nn_overlap = overlap(neighbours(unit, NEIGHBOURS), ref_nn)
        rate = v.limit / min(v.seconds)
        ratio = rate / base_rate if base_rate else float("nan")
        row = {
            "variant": v.name,
            "passages": v.limit,
            "cos_min": float(cos.min()),
            "cos_p1": float(np.percentile(cos, 1)),
            "cos_mean": float(cos.mean()),
            "top10_overlap": nn_overlap,
            "sentences_per_s": rate,
            "x_float32": ratio,
            "seconds": v.seconds,
            "start_s": v.start_s,
        }
        rows.append(row)
        print(
            f"{v.name:<16}{v.limit:>5}{row['cos_min']:>10.5f}{row['cos_p1']:>10.5f}{row['cos_mean']:>10.6f}"
            f"{nn_overlap:>8.3f}{rate:>8.1f}{ratio:>7.2f}x{'  (subset)' if v.limit != args.limit else ''}"
        )
    if any(v.limit != args.limit for v in variants):
        print("(subset): the first --fp16-limit passages only; its sent/s is over other lengths")
    st_rate = len(corpus) / st_s
    print(
        f"\nsentence-transformers float32 encode(batch_size=32): {st_rate:.1f} sent/s (one pass, reference)"
    )
    print(f"threads {args.threads}, batches of {args.batch}, best of {args.repeats} passes in turns")
    if args.json_out is not None:
        report = {
            "machine": info,
            "config": {k: str(v) for k, v in vars(args).items()},
            "corpus": {"passages": len(corpus), "fingerprint": fingerprint(corpus)},
            "sentence_transformers_sent_per_s": st_rate,
            "rows": rows,
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
