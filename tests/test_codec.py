import msgpack
import numpy as np
import pytest

from embedq.common.codec import DecodeLimits, decode, encode, vectors_from_bytes, vectors_to_bytes
from embedq.common.errors import ProtocolError


def test_roundtrip_map() -> None:
    msg = {"a": 1, "b": [1, 2, "x"], "c": b"\x00\x01"}
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never-used byte
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({1: "int key"}),  # strict_map_key
        msgpack.packb({"a": 1}) + b"\x00",  # trailing data
        msgpack.packb(msgpack.ExtType(5, b"xx")),
        b"\x91" * 2000,  # deep nesting
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4 billion items
    ],
)
def test_garbage_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(raw)


def test_size_checked_before_decoding() -> None:
    raw = encode({"t": "x" * 1000})
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(raw, DecodeLimits(max_bytes=100))


def test_string_and_array_limits() -> None:
    limits = DecodeLimits(max_str_len=10, max_array_len=3)
    with pytest.raises(ProtocolError):
        decode(encode({"t": "x" * 11}), limits)
    with pytest.raises(ProtocolError):
        decode(encode({"t": [1, 2, 3, 4]}), limits)
    assert decode(encode({"t": "x" * 10}), limits) == {"t": "x" * 10}


def test_not_bytes() -> None:
    with pytest.raises(ProtocolError):
        decode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_vectors_roundtrip(dtype: str) -> None:
    m = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    raw = vectors_to_bytes(m, dtype)  # type: ignore[arg-type]
    assert len(raw) == 5 * 7 * (4 if dtype == "float32" else 2)
    back = vectors_from_bytes(raw, dtype, (5, 7))  # type: ignore[arg-type]
    assert back.dtype == np.float32
    np.testing.assert_allclose(
        back, m, rtol=1e-3 if dtype == "float16" else 0, atol=1e-3 if dtype == "float16" else 0
    )


def test_vectors_little_endian() -> None:
    raw = vectors_to_bytes(np.array([[1.0]], dtype=">f4"))
    assert raw == np.array([1.0], dtype="<f4").tobytes()


def test_vector_shape_mismatch() -> None:
    with pytest.raises(ProtocolError):
        vectors_from_bytes(b"\x00" * 12, "float32", (2, 2))
