"""`embedq dlq`: inspect, replay and purge a model's dead-letter stream.

Workers move an entry there (fields ``f:<name>`` hold the original entry) with the
reason, the delivery count, the consumer and the time. Replaying re-adds the original
entry to the model's request stream; the job keeps its id, so a caller still waiting
gets the answer, and one that gave up has it dropped as late.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import redis
from redis.typing import EncodableT, FieldT

from embedq.common import keys
from embedq.common.codec import DecodeLimits, decode
from embedq.common.errors import ProtocolError

# An XRANGE entry as this client gets it (responses not decoded): bytes throughout.
# redis-py's annotations also allow str, and None for the whole reply.
_Entries: TypeAlias = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(frozen=True)
class DeadLetter:
    dlq_id: str
    entry_id: str
    reason: str
    deliveries: str
    consumer: str
    at_ms: int
    original: dict[bytes, bytes]
    # The lane the entry came from; replay puts it back there.
    lane: keys.Lane = "interactive"

    def job_summary(self) -> dict[str, Any]:
        """The decoded job, inputs shortened; or why it cannot be decoded."""
        raw = self.original.get(keys.JOB_FIELD)
        if raw is None:
            return {"undecodable": "no job field"}
        try:
            job = decode(raw, DecodeLimits())
        except ProtocolError as exc:
            return {"undecodable": exc.message, "bytes": len(raw)}
        if not isinstance(job, dict):
            return {"undecodable": f"a {type(job).__name__}, not a map"}
        inputs = job.get("inputs")
        if isinstance(inputs, list):
            job["inputs"] = [str(x)[:80] for x in inputs[:5]] + (
                [f"... {len(inputs)} in all"] if len(inputs) > 5 else []
            )
        return job


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode("utf-8", "replace")


def _letter(dlq_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        dlq_id=dlq_id.decode(),
        entry_id=_text(fields, b"entry_id"),
        reason=_text(fields, b"reason"),
        deliveries=_text(fields, b"deliveries"),
        consumer=_text(fields, b"consumer"),
        at_ms=int(_text(fields, b"at_ms") or 0),
        original={k[2:]: v for k, v in fields.items() if k.startswith(b"f:")},
        lane="bulk" if fields.get(b"lane") == b"bulk" else "interactive",
    )


def read(client: redis.Redis, model: str, count: int = 100) -> list[DeadLetter]:
    """The newest ``count`` dead letters, oldest first."""
    rows = cast(_Entries, client.xrevrange(keys.dead_letter_stream(model), count=count))
    return [_letter(dlq_id, fields) for dlq_id, fields in reversed(rows)]


def read_ids(client: redis.Redis, model: str, ids: Sequence[str]) -> list[DeadLetter]:
    """The named dead letters (one XRANGE each); KeyError names the missing ones."""
    stream = keys.dead_letter_stream(model)
    found: list[DeadLetter] = []
    missing: list[str] = []
    for dlq_id in ids:
        try:
            rows = cast(_Entries, client.xrange(stream, min=dlq_id, max=dlq_id))
        except redis.ResponseError:  # not a stream id at all
            rows = []
        if rows:
            found.append(_letter(*rows[0]))
        else:
            missing.append(dlq_id)
    if missing:
        raise KeyError(f"not in the dead-letter stream of {model!r}: {', '.join(missing)}")
    return found


def format_list(letters: Sequence[DeadLetter]) -> str:
    if not letters:
        return "(the dead-letter stream is empty)"
    lines = [f"{'dlq id':<20} {'when (UTC)':<20} {'deliveries':>10}  reason"]
    for d in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.at_ms / 1000)) if d.at_ms else "?"
        lines.append(f"{d.dlq_id:<20} {when:<20} {d.deliveries:>10}  {d.reason[:100]}")
    return "\n".join(lines)


def replay(client: redis.Redis, model: str, ids: Sequence[str], *, everything: bool = False) -> int:
    """Re-queue dead letters to their lane (each removed from the DLQ once it is back)."""
    if not client.exists(keys.jobs_stream(model)):
        raise KeyError(f"model {model!r} has no request stream: start a worker for it first")
    done = 0
    if everything:
        letters = read(client, model, count=client.xlen(keys.dead_letter_stream(model)))
    else:
        letters = read_ids(client, model, ids)
    for d in letters:
        if keys.JOB_FIELD not in d.original:
            continue  # nothing a worker could run
        # dict is invariant in its key type: redis-py wants its own unions.
        client.xadd(keys.jobs_stream(model, d.lane), cast("dict[FieldT, EncodableT]", dict(d.original)))
        client.xdel(keys.dead_letter_stream(model), d.dlq_id)
        done += 1
    return done


def purge(client: redis.Redis, model: str, ids: Sequence[str], *, everything: bool = False) -> int:
    if everything:
        return int(client.xtrim(keys.dead_letter_stream(model), maxlen=0, approximate=False))
    chosen = read_ids(client, model, ids)
    return int(client.xdel(keys.dead_letter_stream(model), *[d.dlq_id for d in chosen])) if chosen else 0
