"""Conversions between protobuf messages and numpy arrays, and the enums the services share."""

from __future__ import annotations

import math

import numpy as np

from ftps.common.errors import InvalidArgument
from ftps.v1 import common_pb2

_TO_NUMPY = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_BOOL: np.dtype("?"),
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}

MAX_TENSOR_DIMS = 8
MAX_DIM = 2**31  # numpy refuses larger shapes even for empty arrays


def tensor_from_array(a: np.ndarray) -> common_pb2.Tensor:
    a = np.asarray(a)
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dt not in _FROM_NUMPY:
        raise ValueError(f"unsupported dtype {a.dtype}")
    return common_pb2.Tensor(shape=list(a.shape), dtype=_FROM_NUMPY[dt],
                             data=np.ascontiguousarray(a, dtype=dt).tobytes())


def array_from_tensor(t: common_pb2.Tensor, *, field: str = "tensor") -> np.ndarray:
    """Decode a Tensor, checking dtype, shape and byte count (InvalidArgument names ``field``)."""
    if t.dtype not in _TO_NUMPY:
        raise InvalidArgument(f"{field}.dtype: unsupported or unset dtype {t.dtype}", reason="TENSOR_INVALID",
                              field=f"{field}.dtype")
    if len(t.shape) > MAX_TENSOR_DIMS or any(d < 0 or d > MAX_DIM for d in t.shape):
        raise InvalidArgument(f"{field}.shape: invalid shape {list(t.shape)}", reason="TENSOR_INVALID",
                              field=f"{field}.shape")
    dtype = _TO_NUMPY[t.dtype]
    count = math.prod(t.shape)  # Python ints: no overflow
    if count * dtype.itemsize != len(t.data):
        raise InvalidArgument(
            f"{field}.data: {len(t.data)} bytes do not match shape {list(t.shape)} of {dtype.name}",
            reason="TENSOR_INVALID", field=f"{field}.data")
    try:
        return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape)).copy()
    except (ValueError, MemoryError) as exc:
        # e.g. an empty tensor whose other dimensions multiply past what numpy can index
        raise InvalidArgument(f"{field}.shape: shape {list(t.shape)} cannot be represented",
                              reason="TENSOR_INVALID", field=f"{field}.shape") from exc


# A round in one of these states changes no more (every service and client tests for this).
TERMINAL_ROUND_STATES = (common_pb2.ROUND_STATE_DONE, common_pb2.ROUND_STATE_FAILED)


# Method enum <-> the names the scoring maths and the command lines use.
METHOD_NAMES = {
    common_pb2.METHOD_OFFLINE_GLOBAL: "offline-global",
    common_pb2.METHOD_OFFLINE_PER_RECORD: "offline-per-record",
    common_pb2.METHOD_ONLINE_PER_RECORD: "online-per-record",
    common_pb2.METHOD_RMIA: "rmia",
}
METHOD_ENUMS = {v: k for k, v in METHOD_NAMES.items()}


def method_name(method: int) -> str:
    if method not in METHOD_NAMES:
        raise InvalidArgument(f"method {method} is not a known method", reason="UNKNOWN_METHOD")
    return METHOD_NAMES[method]


def method_enum(name: str) -> int:
    if name not in METHOD_ENUMS:
        raise InvalidArgument(f"method {name!r} is not one of {', '.join(METHOD_ENUMS)}", reason="UNKNOWN_METHOD")
    return METHOD_ENUMS[name]
