"""Forward-pass latency of a small batch after an idle gap, on all threads and on one, in
one run, with the count the worker picks for each shape (worker/threads.py).

embedq's TorchBackend runs in this process on one model thread, as in the worker, with
the worker's OpenMP waits. For each gap, each mode in turn runs passes with that gap
before each; the table gives the median pass time in ms. On a VM whose other vCPU
sleeps when idle, passes on every thread get slow after 20–50 ms of idleness (the line
moves from run to run; docs/benchmarks.md §3, machine H).

    python bench/idle_latency.py
    python bench/idle_latency.py --dtype float32 --shapes 1x16,1x64,4x64 --json-out idle.json
"""

from __future__ import annotations

from embedq.worker.main import set_openmp_waits

# As the worker does; must precede the first torch import, hence the imports below it.
set_openmp_waits()
# ruff: noqa: E402

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from embedq.worker.backends.torch_backend import TorchBackend
from embedq.worker.config import WorkerConfig, resolve_model
from embedq.worker.threads import PassThreads

MODES = ("all threads", "one thread")


def make_backend(dtype: str) -> TorchBackend:
    model_id, path = resolve_model(None, "torch")
    config = WorkerConfig(model_id=model_id, model_path=path, served_model_name=model_id, dtype=dtype)
    backend = TorchBackend(config)
    backend.warmup()
    return backend


def pass_ms(backend: TorchBackend, batch: list[list[int]]) -> float:
    start = time.perf_counter()
    backend.embed(batch)
    return (time.perf_counter() - start) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--shapes", default="1x32,4x64", help="batch x tokens, comma-separated")
    p.add_argument("--gaps-ms", default="0,2,5,8,20,50,200")
    p.add_argument("--passes", type=int, default=9, help="passes per mode and gap")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    model_thread = ThreadPoolExecutor(1)  # one OpenMP team, as in the worker
    backend = model_thread.submit(make_backend, args.dtype).result()
    rule = backend._thread_policy
    fixed = {"all threads": PassThreads(rule.threads, 0), "one thread": PassThreads(1, 0)}
    gaps = [float(g) / 1000 for g in args.gaps_ms.split(",")]
    limit = rule.single_thread_tokens
    print(f"dtype {backend.dtype_name}, {rule.threads} threads; the worker runs up to {limit} tokens on one")
    print(f"{'shape':>8} {'mode':>12} " + " ".join(f"{g * 1000:>7.0f}ms" for g in gaps))
    rows = []
    for shape in args.shapes.split(","):
        n, length = (int(x) for x in shape.split("x"))
        batch = [[101, *range(2000, 2000 + length - 2), 102]] * n
        times: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
        picked = "one thread" if rule.for_pass(n * backend.padded_width(length)) == 1 else "all threads"
        for gap in gaps:  # modes alternate within a gap, so the host's drift falls on all
            for mode in MODES:
                # Swapped on the model thread, where the policy sets torch's thread count.
                model_thread.submit(setattr, backend, "_thread_policy", fixed[mode]).result()
                model_thread.submit(torch.set_num_threads, fixed[mode].threads).result()
                model_thread.submit(pass_ms, backend, batch).result()  # kernels of this shape
                runs = []
                for _ in range(args.passes):
                    time.sleep(gap)
                    runs.append(model_thread.submit(pass_ms, backend, batch).result())
                times[mode].append(runs)
        for mode in MODES:
            medians = [statistics.median(runs) for runs in times[mode]]
            rows.append({"shape": shape, "mode": mode, "gaps_ms": args.gaps_ms, "median_ms": medians})
            mark = "   <- embedq" if mode == picked else ""
            print(f"{shape:>8} {mode:>12} " + " ".join(f"{m:9.2f}" for m in medians) + mark)
    if args.json_out:
        with open(args.json_out, "w") as f:
            meta = {"dtype": backend.dtype_name, "threads": rule.threads, "single_thread_tokens": limit}
            json.dump({**meta, "rows": rows}, f, indent=1)
    model_thread.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
