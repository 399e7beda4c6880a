"""`embedq embed-file`: embed a JSONL, CSV or Parquet file into Parquet or .npy.

Rows stream through ``AsyncClient.embed_many`` on the bulk lane, so a backfill never
delays interactive queries, and memory stays bounded whatever the file's size.

Resuming: results are written as numbered part files (``part_rows`` rows each, written
to a temporary name and renamed, so a part on disk is always whole) in
``<OUTPUT>.parts/``, next to a manifest of what is being computed. Run the same command
again after an interruption and it skips the rows of the parts already written; a
manifest that does not match (other input, model or parameters) is refused rather than
mixed in. When every row is done, the parts are joined into OUTPUT and removed.

Output: Parquet gets the id column (named as in the input) and an ``embedding``
column (fixed-size lists of float32); .npy gets the (rows × dim) float32 matrix, with
the ids in ``<OUTPUT>.ids.jsonl``, one JSON string per line, in row order.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from embedq.common.errors import EmbedqError
from embedq.common.settings import DEFAULT_MODEL_NAME
from embedq.producer.async_client import AsyncClient

log = logging.getLogger(__name__)

InputFormat = Literal["jsonl", "csv", "parquet"]
OutputFormat = Literal["parquet", "npy"]
_INPUT_SUFFIXES: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MANIFEST = "manifest.json"


class IngestError(Exception):
    """The file cannot be embedded as asked (bad input, mismatched resume...)."""


@dataclass(frozen=True, kw_only=True)
class IngestOptions:
    input: Path
    output: Path
    model: str = DEFAULT_MODEL_NAME
    redis_url: str = "redis://127.0.0.1:6379/0"
    input_format: InputFormat | None = None
    output_format: OutputFormat | None = None
    # Empty id_field: rows are numbered from 0 instead.
    id_field: str = "id"
    text_field: str = "text"
    chunk_size: int = 64
    max_in_flight: int = 16
    part_rows: int = 8192
    normalize: bool = True
    prompt_name: str | None = None
    dimensions: int | None = None
    timeout_s: float = 600.0
    cache_ttl_s: int = 0
    progress: bool = True

    def formats(self) -> tuple[InputFormat, OutputFormat]:
        fmt_in = self.input_format or _INPUT_SUFFIXES.get(self.input.suffix.lower())
        if fmt_in is None:
            raise IngestError(f"cannot tell the format of {self.input}: pass --input-format")
        fmt_out = self.output_format or ("npy" if self.output.suffix.lower() == ".npy" else "parquet")
        return fmt_in, fmt_out


@dataclass(frozen=True)
class IngestResult:
    rows: int
    resumed_rows: int
    seconds: float
    dim: int
    cache_hit_ratio: float | None


# ------------------------------------------------------------------------- reading
def _row_value(row: dict[str, Any], field: str, number: int, what: str) -> Any:
    if field not in row:
        raise IngestError(f"row {number}: no {what} field {field!r} (fields: {', '.join(map(str, row))})")
    return row[field]


def _pair(row: dict[str, Any], number: int, opts: IngestOptions) -> tuple[str, str]:
    text = _row_value(row, opts.text_field, number, "text")
    if not isinstance(text, str) or not text:
        raise IngestError(f"row {number}: the text field {opts.text_field!r} must be a non-empty string")
    ident = str(_row_value(row, opts.id_field, number, "id")) if opts.id_field else str(number)
    return ident, text


def iter_rows(opts: IngestOptions, fmt: InputFormat, skip: int = 0) -> Iterator[tuple[str, str]]:
    """(id, text) of every row after the first ``skip``, in file order."""
    if fmt == "parquet":
        yield from _iter_parquet(opts, skip)
        return
    with opts.input.open("r", encoding="utf-8", newline="") as f:
        rows: Iterator[dict[str, Any]] = _jsonl(f) if fmt == "jsonl" else csv.DictReader(f)
        for number, row in enumerate(rows):
            if number >= skip:
                yield _pair(row, number, opts)


def _jsonl(f: TextIO) -> Iterator[dict[str, Any]]:
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise IngestError(f"line {line_no}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise IngestError(f"line {line_no}: a JSON object per line is expected")
        yield row


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise IngestError("Parquet needs pyarrow: pip install 'embedq[ingest]'") from None
    return pq.ParquetFile(path)


def _iter_parquet(opts: IngestOptions, skip: int) -> Iterator[tuple[str, str]]:
    pf = _parquet_file(opts.input)
    names = pf.schema_arrow.names
    wanted = [c for c in (opts.id_field, opts.text_field) if c]
    for c in wanted:
        if c not in names:
            raise IngestError(f"{opts.input} has no column {c!r} (columns: {', '.join(names)})")
    number = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=4096):
        if number + batch.num_rows <= skip:
            number += batch.num_rows
            continue
        for row in batch.to_pylist():
            if number >= skip:
                yield _pair(row, number, opts)
            number += 1


def count_rows(opts: IngestOptions, fmt: InputFormat) -> int:
    if fmt == "parquet":
        return int(_parquet_file(opts.input).metadata.num_rows)
    if fmt == "jsonl":
        with opts.input.open("rb") as f:
            return sum(1 for line in f if line.strip())
    with opts.input.open("r", encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


# ------------------------------------------------------------------------- parts
class Parts:
    """Whole part files of finished rows, and the manifest they belong to."""

    def __init__(self, output: Path, part_rows: int) -> None:
        self.dir = output.with_name(output.name + ".parts")
        self.part_rows = part_rows

    def open(self, manifest: dict[str, Any]) -> int:
        """Start or resume; returns how many rows are already done."""
        path = self.dir / MANIFEST
        if path.exists() and not any(self.dir.glob("part-*.npz")):
            path.unlink()  # nothing was finished under the old settings: start afresh
        if path.exists():
            found = json.loads(path.read_text())
            if found != manifest:
                changed = sorted(k for k in manifest.keys() | found.keys() if manifest.get(k) != found.get(k))
                raise IngestError(
                    f"{self.dir} holds an unfinished run with other settings ({', '.join(changed)}); "
                    "delete it to start over"
                )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(manifest, indent=1).encode())
        for stale in self.dir.glob("*.tmp"):
            stale.unlink()
        done = 0
        while (self.dir / self._name(done // self.part_rows)).exists():
            done += self.part_rows
        # Parts past a gap cannot happen (they are written in order); drop any to be safe.
        for extra in self.dir.glob("part-*.npz"):
            if int(extra.stem.split("-")[1]) >= done // self.part_rows:
                extra.unlink()
        return done

    @staticmethod
    def _name(index: int) -> str:
        return f"part-{index:07d}.npz"

    def write(self, index: int, ids: list[str], vectors: np.ndarray) -> None:
        path = self.dir / self._name(index)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            # Ids as a fixed-width unicode array: loading it needs no pickle.
            np.savez(f, ids=np.array(ids, dtype=np.str_), vectors=vectors.astype(np.float32))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def read_all(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for path in sorted(self.dir.glob("part-*.npz")):
            with np.load(path, allow_pickle=False) as part:
                yield [str(x) for x in part["ids"]], part["vectors"]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _assemble(parts: Parts, opts: IngestOptions, fmt: OutputFormat, rows: int, dim: int) -> None:
    out = opts.output
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        tmp = out.with_name(out.name + ".tmp.npy")
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        ids_tmp = out.with_name(out.name + ".ids.jsonl.tmp")
        at = 0
        with ids_tmp.open("w", encoding="utf-8") as ids_out:
            for ids, vectors in parts.read_all():
                matrix[at : at + len(ids)] = vectors
                at += len(ids)
                ids_out.writelines(json.dumps(i) + "\n" for i in ids)
        matrix.flush()
        del matrix
        tmp.replace(out)
        ids_tmp.replace(out.with_name(out.name + ".ids.jsonl"))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    id_name = opts.id_field or "row"
    schema = pa.schema([(id_name, pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    tmp = out.with_name(out.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for ids, vectors in parts.read_all():
            flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
            column = pa.FixedSizeListArray.from_arrays(flat, dim)
            writer.write_table(pa.Table.from_arrays([pa.array(ids, pa.string()), column], schema=schema))
    tmp.replace(out)


# ------------------------------------------------------------------------- progress
class Progress:
    """Rows done, rate and ETA on stderr: redrawn on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and (now - self._last >= (0.2 if self.tty else 10.0) or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = (self.done - self.start_done) / max(now - self.started, 1e-9)
        left = max(self.total - self.done, 0)
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f"{self.done:,}/{self.total:,} rows ({pct:.1f}%)  {rate:,.0f} rows/s  ETA {eta}"
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------- the run
def _manifest(opts: IngestOptions, fmt_in: InputFormat, fmt_out: OutputFormat) -> dict[str, Any]:
    st = opts.input.stat()
    return {
        "input": str(opts.input.resolve()),
        "input_size": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "input_format": fmt_in,
        "output_format": fmt_out,
        "model": opts.model,
        "id_field": opts.id_field,
        "text_field": opts.text_field,
        "normalize": opts.normalize,
        "prompt_name": opts.prompt_name,
        "dimensions": opts.dimensions,
        "part_rows": opts.part_rows,
    }


async def embed_file(opts: IngestOptions) -> IngestResult:
    if not opts.input.is_file():
        raise IngestError(f"no such input file: {opts.input}")
    if opts.chunk_size < 1 or opts.max_in_flight < 1 or opts.part_rows < 1:
        raise IngestError("--chunk-size, --max-in-flight and --part-rows must be positive")
    fmt_in, fmt_out = opts.formats()
    if fmt_out == "parquet" or fmt_in == "parquet":
        try:
            import pyarrow  # noqa: F401 - checked before any work is done
        except ImportError:
            raise IngestError("Parquet needs pyarrow: pip install 'embedq[ingest]'") from None
    total = count_rows(opts, fmt_in)
    parts = Parts(opts.output, opts.part_rows)
    done = min(parts.open(_manifest(opts, fmt_in, fmt_out)), total)
    if done:
        log.info("resuming %s: %d of %d rows already embedded", opts.input, done, total)
    started = time.monotonic()
    progress = Progress(total, done, opts.progress)
    ids: deque[str] = deque()

    def texts() -> Iterator[str]:
        for ident, text in iter_rows(opts, fmt_in, skip=done):
            ids.append(ident)
            yield text

    params: dict[str, Any] = {"normalize": opts.normalize}
    if opts.prompt_name:
        params["prompt_name"] = opts.prompt_name
    if opts.dimensions:
        params["dimensions"] = opts.dimensions
    part_ids: list[str] = []
    part_vecs: list[np.ndarray] = []
    index = done // opts.part_rows
    dim = opts.dimensions or 0
    hit_ratio: float | None = None
    client = AsyncClient(
        opts.redis_url, model=opts.model, timeout=opts.timeout_s, cache_ttl_s=opts.cache_ttl_s
    )
    try:
        async with client:
            chunks = client.embed_many(
                texts(), chunk_size=opts.chunk_size, max_in_flight=opts.max_in_flight, **params
            )
            async for vectors in chunks:
                dim = vectors.shape[1]
                part_ids.extend(ids.popleft() for _ in range(len(vectors)))
                part_vecs.append(vectors)
                progress.advance(len(vectors))
                while len(part_ids) >= opts.part_rows:
                    stacked = np.concatenate(part_vecs)
                    parts.write(index, part_ids[: opts.part_rows], stacked[: opts.part_rows])
                    index += 1
                    part_ids = part_ids[opts.part_rows :]
                    part_vecs = [stacked[opts.part_rows :]] if part_ids else []
            if part_ids:
                parts.write(index, part_ids, np.concatenate(part_vecs))
            if client.cache is not None:
                hit_ratio = client.cache.stats.hit_ratio
    except EmbedqError as exc:
        raise IngestError(f"embedding failed ({exc.code}): {exc.message}; run again to resume") from exc
    finally:
        progress.close()
    if not dim:  # nothing left to compute: read the width from the parts
        for _, vectors in parts.read_all():
            dim = vectors.shape[1]
            break
    _assemble(parts, opts, fmt_out, total, dim)
    parts.remove()
    return IngestResult(total, done, time.monotonic() - started, dim, hit_ratio)


# ------------------------------------------------------------------------- CLI
def add_embed_file_arguments(p: argparse.ArgumentParser, redis_url: str) -> None:
    p.add_argument("input", type=Path, help="a .jsonl, .csv or .parquet file")
    p.add_argument("--out", "-o", type=Path, required=True, help="a .parquet or .npy file")
    p.add_argument("--model", default=os.environ.get("EMBEDQ_MODEL", DEFAULT_MODEL_NAME))
    p.add_argument("--redis-url", default=redis_url)
    p.add_argument("--input-format", choices=["jsonl", "csv", "parquet"], default=None)
    p.add_argument("--output-format", choices=["parquet", "npy"], default=None)
    p.add_argument("--id-field", default="id", help="the id column ('' numbers the rows from 0)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--chunk-size", type=int, default=IngestOptions.chunk_size, help="texts per job")
    p.add_argument("--max-in-flight", type=int, default=16, help="jobs outstanding at once")
    p.add_argument("--part-rows", type=int, default=8192, help="rows per resumable part file")
    p.add_argument("--no-normalize", action="store_true")
    p.add_argument("--prompt-name", default=None)
    p.add_argument("--dimensions", type=int, default=None, help="truncate vectors (Matryoshka)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one job may take")
    p.add_argument(
        "--cache-ttl",
        type=int,
        default=0,
        help="use the Redis embedding cache, entries kept this many seconds (0: off)",
    )
    p.add_argument("--no-progress", action="store_true")


def embed_file_from_args(ns: argparse.Namespace) -> IngestResult:
    opts = IngestOptions(
        input=ns.input,
        output=ns.out,
        model=ns.model,
        redis_url=ns.redis_url,
        input_format=ns.input_format,
        output_format=ns.output_format,
        id_field=ns.id_field,
        text_field=ns.text_field,
        chunk_size=ns.chunk_size,
        max_in_flight=ns.max_in_flight,
        part_rows=ns.part_rows,
        normalize=not ns.no_normalize,
        prompt_name=ns.prompt_name,
        dimensions=ns.dimensions,
        timeout_s=ns.timeout,
        cache_ttl_s=ns.cache_ttl,
        progress=not ns.no_progress,
    )
    result = asyncio.run(embed_file(opts))
    summary = asdict(result)
    log.info(
        "embedded %d rows (%d resumed) into %s in %.1fs%s",
        result.rows,
        result.resumed_rows,
        opts.output,
        result.seconds,
        f", cache hit ratio {result.cache_hit_ratio:.3f}" if result.cache_hit_ratio is not None else "",
        extra={"summary": summary},
    )
    return result
