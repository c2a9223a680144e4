"""Validation of labelled records at the edge, shared by the registry (builder data) and the
gateway (contributors' records)."""

from __future__ import annotations

import numpy as np

from ftps.common.errors import InvalidArgument
from ftps.v1 import common_pb2


def validate_records(x: np.ndarray, y: np.ndarray, settings: common_pb2.TaskSettings, *,
                     field: str = "records") -> tuple[np.ndarray, np.ndarray]:
    """Records at the edge: shape, dtype, finite values, labels in range. Returns (float32, int64)."""
    shape = tuple(settings.record_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InvalidArgument(f"{field}.x has shape {list(x.shape)}, expected [m, {', '.join(map(str, shape))}]")
    if x.dtype not in (np.float32, np.float64):
        raise InvalidArgument(f"{field}.x must be float32, got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise InvalidArgument(f"{field}.y has shape {list(y.shape)}, expected [{len(x)}]")
    if y.dtype.kind not in "iu":
        raise InvalidArgument(f"{field}.y must be integer class labels, got {y.dtype}")
    if len(x) == 0:
        raise InvalidArgument(f"{field} is empty")
    if not np.isfinite(x).all():
        raise InvalidArgument(f"{field}.x holds NaN or infinite values")
    if y.min() < 0 or y.max() >= settings.num_classes:
        raise InvalidArgument(
            f"{field}.y has labels outside [0, {settings.num_classes - 1}]: {int(y.min())}..{int(y.max())}")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)
