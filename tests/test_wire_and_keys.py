import pytest
from pydantic import ValidationError as PydanticValidationError

from embedq.common import keys
from embedq.common.codec import encode
from embedq.common.errors import EmptyInputError, ProtocolError, ValidationError, error_from_wire
from embedq.common.wire import EmbedParams, Job, pack_job, unpack_job


def _job(**kw: object) -> Job:
    base = dict(id="r1", kind="embed", model="m", inputs=["a"], reply_to="embedq:reply:c", created_ms=1)
    base.update(kw)
    return Job.model_validate(base)


def test_job_roundtrip() -> None:
    job = _job(inputs=["a", [101, 102]], params={"normalize": False}, trace={"traceparent": "00-x"})
    assert unpack_job(pack_job(job)) == job


def test_unknown_field_rejected() -> None:
    raw = encode({**_job().model_dump(), "surprise": 1})
    with pytest.raises(ProtocolError, match="surprise"):
        unpack_job(raw)


def test_wrong_types_rejected() -> None:
    with pytest.raises(ProtocolError, match="inputs"):
        unpack_job(encode({**_job().model_dump(), "inputs": "not a list"}))
    with pytest.raises(ProtocolError, match="kind"):
        unpack_job(encode({**_job().model_dump(), "kind": "launch_missiles"}))


def test_embed_params_defaults_are_teis() -> None:
    p = EmbedParams()
    assert p.normalize is True and p.truncate is None and p.truncation_direction == "right"
    assert EmbedParams(truncation_direction="Left").truncation_direction == "left"  # type: ignore[arg-type]
    with pytest.raises(PydanticValidationError):
        EmbedParams(dimensions=0)


def test_keys_share_the_model_hash_tag() -> None:
    model = "BAAI/bge-small-en-v1.5"
    for key in (
        keys.jobs_stream(model),
        keys.dead_letter_stream(model),
        keys.workers_key(model),
        keys.model_info_key(model),
    ):
        assert "{" + model + "}" in key
    assert keys.reply_stream("sdk-host-1-ab") == "embedq:reply:sdk-host-1-ab"


@pytest.mark.parametrize("bad", ["", "a}b", "a{b", "has space", "x" * 201, "-lead", "trailing\n"])
def test_bad_model_names(bad: str) -> None:
    with pytest.raises(ValueError):
        keys.jobs_stream(bad)


def test_only_reply_streams_pass_as_reply_to() -> None:
    assert keys.is_reply_stream(keys.reply_stream("sdk-host-1-ab"))
    assert keys.is_reply_stream(keys.reply_stream("x" * 128))
    for not_a_reply in (
        keys.client_lease("sdk-host-1-ab"),  # a string key: a reply there would be refused
        "embedq:reply:",
        "embedq:reply:ab\n",
        "embedq:reply:" + "x" * 129,
        "embedq:reply:has space",
        keys.jobs_stream("m"),
    ):
        assert not keys.is_reply_stream(not_a_reply), not_a_reply
    with pytest.raises(ValueError):
        keys.reply_stream("ab\n")


def test_errors_cross_the_wire_typed() -> None:
    err = error_from_wire(ValidationError.code, "bad")
    assert isinstance(err, ValidationError) and err.message == "bad"
    assert isinstance(error_from_wire("empty", "x"), EmptyInputError)
    assert type(error_from_wire("no-such-code", "x")).__name__ == "EmbedqError"
