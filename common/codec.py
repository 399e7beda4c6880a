"""msgpack encoding of jobs and replies, with explicit decoding limits.

Pure functions: no Redis, no model. Decoding checks the raw size first, then lets
msgpack enforce bounds on every container and string, and refuses ext types, so a
hostile entry costs microseconds and never an exception class we did not expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np

from embedq.common.errors import ProtocolError

VectorDType = Literal["float32", "float16"]
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
}


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Upper bounds applied while decoding one message."""

    max_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 4 * 1024 * 1024
    max_bin_len: int = 64 * 1024 * 1024
    max_array_len: int = 1_000_000
    max_map_len: int = 64


DEFAULT_LIMITS = DecodeLimits()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def encode(message: dict[str, Any]) -> bytes:
    """Pack a message (already a plain dict of wire types)."""
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def decode(raw: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Unpack one message, enforcing ``limits``; raises ProtocolError on anything odd."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > limits.max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_ext_len=0,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    # msgpack raises ValueError subclasses (ExtraData, FormatError, StackError...) and,
    # for a few malformed inputs, TypeError or UnicodeDecodeError (a ValueError too).
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable message: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a map, got {type(obj).__name__}")
    return obj


def vectors_to_bytes(matrix: np.ndarray, dtype: VectorDType = "float32") -> bytes:
    """Raw little-endian bytes of a 2-D matrix, row-major."""
    return np.ascontiguousarray(matrix, dtype=_NUMPY_DTYPES[dtype]).tobytes()


def vectors_from_bytes(data: bytes, dtype: VectorDType, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`vectors_to_bytes`; always returns float32 (n × d)."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        raise ProtocolError(f"unknown vector dtype {dtype!r}")
    rows, cols = shape
    if rows < 0 or cols < 0 or rows * cols * np_dtype.itemsize != len(data):
        raise ProtocolError(f"vector payload of {len(data)} bytes does not match {shape} {dtype}")
    out = np.frombuffer(data, dtype=np_dtype).reshape(rows, cols)
    return out.astype(np.float32) if np_dtype != np.dtype("<f4") else out.copy()
