"""Validation of labelled records at the edge, shared by the registry (builder data) and the
gateway (contributors' records).

Records are checked in the dtype they will be used in (the contract in ``common.proto``,
``Records``): x is float32, or float64 converted to float32 first, so a value such as 1e39 that is
finite as float64 but infinite as float32 never reaches a round; y is any integer dtype, converted
to int64. Every error names the field and the first bad index, so a contributor can fix the record.
"""

from __future__ import annotations

import numpy as np

from ftps.common.errors import InvalidArgument
from ftps.v1 import common_pb2


def value_range(settings: common_pb2.TaskSettings) -> tuple[float, float] | None:
    """The task's declared [min, max] of record values, or None when it declares none."""
    if not settings.HasField("value_range"):
        return None
    return settings.value_range.min, settings.value_range.max


def _first(bad: np.ndarray) -> tuple[tuple[int, ...], str]:
    """The index of the first True of a boolean array, and its ``[j, ...]`` spelling for messages."""
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
    return idx, "[" + ", ".join(map(str, idx)) + "]"


def validate_records(x: np.ndarray, y: np.ndarray, settings: common_pb2.TaskSettings, *,
                     field: str = "records") -> tuple[np.ndarray, np.ndarray]:
    """Records at the edge: shape, dtype, finite values in the task's range (as float32), labels in
    range. Returns (float32 x, int64 y); raises InvalidArgument naming the field and first bad index."""
    shape = tuple(settings.record_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InvalidArgument(f"{field}.x has shape {list(x.shape)}, expected [m, {', '.join(map(str, shape))}]",
                              reason="RECORDS_BAD_SHAPE", field=f"{field}.x")
    if x.dtype not in (np.float32, np.float64):
        raise InvalidArgument(f"{field}.x must be float32 (or float64, converted to float32), got {x.dtype}",
                              reason="RECORDS_BAD_DTYPE", field=f"{field}.x")
    if y.ndim != 1 or len(y) != len(x):
        raise InvalidArgument(f"{field}.y has shape {list(y.shape)}, expected [{len(x)}]",
                              reason="RECORDS_BAD_SHAPE", field=f"{field}.y")
    if y.dtype.kind not in "iu":
        raise InvalidArgument(f"{field}.y must be integer class labels, got {y.dtype}",
                              reason="RECORDS_BAD_DTYPE", field=f"{field}.y")
    if len(x) == 0:
        raise InvalidArgument(f"{field} is empty", reason="RECORDS_EMPTY", field=field)
    with np.errstate(over="ignore"):  # overflow to inf is exactly what is checked next
        x32 = x.astype(np.float32, copy=False)
    finite = np.isfinite(x32)
    if not finite.all():
        idx, where = _first(~finite)
        value = float(x[idx])
        what = "is NaN" if np.isnan(value) else f"= {value:g} is not finite as float32"
        raise InvalidArgument(f"{field}.x{where} {what} ({int((~finite).sum())} non-finite value(s))",
                              reason="RECORDS_NOT_FINITE", field=f"{field}.x")
    bounds = value_range(settings)
    if bounds is not None:
        lo, hi = bounds
        outside = (x32 < lo) | (x32 > hi)
        if outside.any():
            idx, where = _first(outside)
            raise InvalidArgument(
                f"{field}.x{where} = {float(x32[idx]):g} is outside the task's value "
                f"range [{lo:g}, {hi:g}] ({int(outside.sum())} such value(s))",
                reason="RECORDS_OUT_OF_RANGE", field=f"{field}.x")
    labels_bad = (y < 0) | (y >= settings.num_classes)
    if labels_bad.any():
        j = int(np.argmax(labels_bad))
        raise InvalidArgument(f"{field}.y[{j}] = {int(y[j])}: labels outside [0, {settings.num_classes - 1}] "
                              f"({int(labels_bad.sum())} such label(s))",
                              reason="LABEL_OUT_OF_RANGE", field=f"{field}.y")
    return x32, y.astype(np.int64, copy=False)
