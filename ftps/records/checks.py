"""Record checks: ``for_task`` at the edge (the gateway's contributors' records, the registry's
builder data) and ``validate`` inside the services (the worker and its sandbox child, the engine).

Records are checked in the dtype they will be used in (the contract in ``common.proto``,
``Records``): x is float32, or float64 converted to float32 first, so a value such as 1e39 that is
finite as float64 but infinite as float32 never reaches a round; y is any integer dtype, converted
to int64. Every error names the field and the first bad index, so a contributor can fix the record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ftps.common.errors import InvalidArgument
from ftps.records import RecordsError
from ftps.records.tabular import of_settings

if TYPE_CHECKING:  # only the services hold TaskSettings; the compute core imports no protobuf
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


def for_task(x: np.ndarray, y: np.ndarray, settings: common_pb2.TaskSettings, *,
             field: str = "records", encoded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Records arriving for a task -> (float32 model inputs, int64 labels), the form stored and
    trained on. A tabular task's records arrive as raw rows, checked row by row against its schema
    and encoded (``ftps.records.tabular``) unless ``encoded`` (builder data uploaded as an npz
    blob is model-ready). Raises InvalidArgument naming the field and the first bad index."""
    schema = of_settings(settings)
    if schema is not None and not encoded:
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise InvalidArgument(f"{field}: x must be raw rows [m, {len(schema.features)}] and y [m] labels, "
                                  f"got x {list(x.shape)} and y {list(y.shape)}",
                                  reason="RECORDS_BAD_SHAPE", field=f"{field}.x")
        if len(x) == 0:
            raise InvalidArgument(f"{field} is empty", reason="RECORDS_EMPTY", field=field)
        x = schema.encode(schema.check_rows(x, field=field))
    return validate_for_task(x, y, settings, field=field)


def validate_for_task(x: np.ndarray, y: np.ndarray, settings: common_pb2.TaskSettings, *,
                      field: str = "records") -> tuple[np.ndarray, np.ndarray]:
    """Model inputs for a task: shape, dtype, finite values in the task's range (as float32),
    labels in range. Returns (float32 x, int64 y); raises InvalidArgument naming the field and first
    bad index."""
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


def validate(x: np.ndarray, y: np.ndarray, *, what: str = "records") -> None:
    """Records inside the services: raise RecordsError unless x is finite float32 [N, ...] and y
    int64 [N] with labels >= 0 (they passed ``for_task`` where they entered; this guards the
    process boundary and in-process callers)."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise RecordsError(f"{what}: x and y must be numpy arrays")
    if x.dtype != np.float32:
        raise RecordsError(f"{what}: x must be float32, got {x.dtype}")
    if x.ndim < 2:
        raise RecordsError(f"{what}: x must have shape [N, ...features], got {x.shape}")
    if y.dtype != np.int64:
        raise RecordsError(f"{what}: y must be int64, got {y.dtype}")
    if y.ndim != 1:
        raise RecordsError(f"{what}: y must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise RecordsError(f"{what}: x has {len(x)} records but y has {len(y)} labels")
    if not np.isfinite(x).all():
        raise RecordsError(f"{what}: x contains NaN or infinite values")
    if len(y) and y.min() < 0:
        raise RecordsError(f"{what}: labels must be >= 0, got {int(y.min())}")
