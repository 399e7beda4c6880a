"""Hypothesis fuzz of what a worker does with a stream entry before it trusts it: the
msgpack decoder with limits, the job schema and the per-kind parameters. Whatever the
bytes, the only exception that may escape is the typed ProtocolError (the worker
dead-letters on it); parameters fail with pydantic's ValidationError (answered as a
typed 422-style error). Over 10,000 cases in all."""

from __future__ import annotations

import msgpack
import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedq.common.codec import DecodeLimits
from embedq.common.errors import ProtocolError
from embedq.common.wire import PARAMS_BY_KIND, Job, pack_job, unpack_job

KINDS = sorted(PARAMS_BY_KIND)

LIMITS = DecodeLimits(max_bytes=64 * 1024, max_str_len=4096, max_bin_len=4096, max_array_len=512)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )


VALID = pack_job(
    Job(
        id="r1",
        kind="embed",
        model="m",
        inputs=["a text", [101, 7, 102]],
        params={"normalize": False},
        reply_to="embedq:reply:c",
        created_ms=1,
        deadline_ms=2,
    )  # fmt: skip
)


def _worker_view(raw: bytes) -> None:
    """What the worker's admission does: decode, validate, then the kind's parameters."""
    try:
        job = unpack_job(raw, LIMITS)
    except ProtocolError:
        return
    try:
        job.typed_params()
    except pydantic.ValidationError:
        pass


@fuzz(4000)
@given(st.binary(max_size=2048))
def test_random_bytes(raw: bytes) -> None:
    _worker_view(raw)


@fuzz(3000)
@given(st.data())
def test_mutated_valid_jobs(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and raw:
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif op == "truncate":
            del raw[at:]
    _worker_view(bytes(raw))


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=40), st.binary(max_size=40),
)  # fmt: skip
_value = st.recursive(
    _leaf,
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=8), c, max_size=6),
    max_leaves=30,
)
_field_names = st.sampled_from(
    [
        "v",
        "id",
        "kind",
        "model",
        "inputs",
        "params",
        "reply_to",
        "created_ms",
        "deadline_ms",
        "trace",
        "extra",
    ]
)
_params = st.dictionaries(
    st.sampled_from(["normalize", "truncate", "truncation_direction", "prompt_name", "dimensions", "encoding",
                     "query", "top_k", "threshold", "add_special_tokens", "skip_special_tokens", "x"]),
    _value, max_size=5,
)  # fmt: skip


@fuzz(3500)
@given(
    base=st.fixed_dictionaries(
        {"v": st.sampled_from([1, 2, "1"]), "id": st.text(max_size=70),
         "kind": st.sampled_from([*KINDS, "nope"]), "model": st.text(max_size=10),
         "reply_to": st.text(max_size=20), "created_ms": st.integers(-5, 2**40)}
    ),
    inputs=st.lists(st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 2**40), max_size=5), _value),
                    max_size=6),
    params=_params,
    junk=st.dictionaries(_field_names, _value, max_size=3),
)  # fmt: skip
def test_structured_jobs(base: dict, inputs: list, params: dict, junk: dict) -> None:  # type: ignore[type-arg]
    obj = {**base, "inputs": inputs, "params": params, **junk}
    try:
        raw = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not representable in msgpack: nothing a producer could send
    _worker_view(raw)
