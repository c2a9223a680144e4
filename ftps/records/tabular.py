"""Tabular records: a task's schema (named numeric and categorical columns, the builder's
normalisation), the row-by-row checks of raw rows, their encoding into model inputs and back, the
schema inferred from a builder's table, and why a row is unusual against the builder's data.

Raw rows are float64 ``[m, F]`` with F = the number of features: a numeric column holds its value,
a categorical one the index of its level. They are what contributors submit (``TaskSettings.schema``
in ``common.proto``). Encoded rows are float32 ``[m, width]``: numeric columns standardised with the
builder's mean and standard deviation, categorical ones one-hot, in feature order. The services
store and train on encoded rows; everything a person reads (reports, the web pages) decodes them.

Errors are ``InvalidArgument`` naming the row and the column, e.g. ``row 3, column 'mean radius':
'abc' is not a number``, so a contributor can fix their file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import norm

from ftps.common.errors import InvalidArgument

if TYPE_CHECKING:
    from ftps.v1 import common_pb2

NUMERIC, CATEGORICAL = "numeric", "categorical"
DEFAULT_LABEL = "label"


def _kinds() -> dict[str, int]:
    """Feature kind -> its proto enum. The proto module is imported here, not at the top: the
    compute core (``ftps.records`` and ``ftps.ml``) runs on a bare CUDA machine without this
    project's protobuf runtime (``bench/gpu.py``; tests/test_layout.py checks it)."""
    from ftps.v1 import common_pb2

    return {NUMERIC: common_pb2.FEATURE_KIND_NUMERIC, CATEGORICAL: common_pb2.FEATURE_KIND_CATEGORICAL}

MAX_FEATURES = 4096
MAX_LEVELS = 1000
MAX_NAME = 200
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Feature:
    """One input column. Numeric: ``mean``, ``std`` (> 0) and an optional allowed ``range``;
    categorical: ``levels`` and optionally their shares in the builder's data."""

    name: str
    kind: str = NUMERIC
    mean: float = 0.0
    std: float = 1.0
    range: tuple[float, float] | None = None
    levels: tuple[str, ...] = ()
    level_frequencies: tuple[float, ...] = ()

    @property
    def width(self) -> int:
        """Model inputs this column encodes to."""
        return 1 if self.kind == NUMERIC else len(self.levels)


@dataclass(frozen=True)
class Schema:
    """A tabular task's columns (``TabularSchema`` in ``common.proto``)."""

    features: tuple[Feature, ...]
    label_column: str = DEFAULT_LABEL
    class_names: tuple[str, ...] = ()
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        offsets, at = [], 0
        for f in self.features:
            offsets.append(at)
            at += f.width
        object.__setattr__(self, "_offsets", tuple(offsets))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def width(self) -> int:
        """Encoded width: the model's input size, ``record_shape == [width]``."""
        return sum(f.width for f in self.features)

    # -- the schema itself -----------------------------------------------------------------------

    def check(self, num_classes: int | None = None, *, field: str = "settings.schema") -> None:
        """InvalidArgument (reason INVALID_SETTINGS) naming the first bad part of the schema."""
        def bad(where: str, msg: str) -> InvalidArgument:
            return InvalidArgument(f"{field}{where} {msg}", reason="INVALID_SETTINGS", field=f"{field}{where}")

        if not 1 <= len(self.features) <= MAX_FEATURES:
            raise bad(".features", f"must list 1 to {MAX_FEATURES} columns, got {len(self.features)}")
        seen: set[str] = set()
        for i, f in enumerate(self.features):
            at = f".features[{i}]"
            if not _good_name(f.name):
                raise bad(f"{at}.name", f"must be 1-{MAX_NAME} printable characters, got {f.name[:40]!r}")
            if f.name in seen:
                raise bad(f"{at}.name", f"{f.name!r} appears twice")
            if f.name == self.label_column:
                raise bad(f"{at}.name", f"{f.name!r} is the label column")
            seen.add(f.name)
            if f.kind == NUMERIC:
                if not (math.isfinite(f.mean) and abs(f.mean) <= FLOAT32_MAX):
                    raise bad(f"{at}.mean", f"must be finite, got {f.mean:g}")
                if not (math.isfinite(f.std) and 0.0 < f.std <= FLOAT32_MAX):
                    raise bad(f"{at}.std", f"must be > 0 and finite, got {f.std:g}")
                if f.range is not None:
                    lo, hi = f.range
                    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                        raise bad(f"{at}.range", f"must be finite with min <= max, got [{lo:g}, {hi:g}]")
            elif f.kind == CATEGORICAL:
                if not 2 <= len(f.levels) <= MAX_LEVELS:
                    raise bad(f"{at}.levels", f"must list 2 to {MAX_LEVELS} levels, got {len(f.levels)}")
                if len(set(f.levels)) != len(f.levels) or not all(_good_name(v) for v in f.levels):
                    raise bad(f"{at}.levels", f"must be distinct, 1-{MAX_NAME} printable characters each")
                freqs = f.level_frequencies
                if freqs and (len(freqs) != len(f.levels)
                              or not all(math.isfinite(q) and 0.0 <= q <= 1.0 for q in freqs)):
                    raise bad(f"{at}.level_frequencies", f"must be {len(f.levels)} shares in [0, 1]")
            else:
                raise bad(f"{at}.kind", "must be numeric or categorical")
        if not _good_name(self.label_column):
            raise bad(".label_column", f"must be 1-{MAX_NAME} printable characters")
        if self.class_names:
            if num_classes is not None and len(self.class_names) != num_classes:
                raise bad(".class_names", f"must name all {num_classes} classes, got {len(self.class_names)}")
            if len(set(self.class_names)) != len(self.class_names) or not all(map(_good_name, self.class_names)):
                raise bad(".class_names", f"must be distinct, 1-{MAX_NAME} printable characters each")

    # -- proto and JSON --------------------------------------------------------------------------

    @classmethod
    def from_proto(cls, msg: common_pb2.TabularSchema) -> Schema:
        kinds = _kinds()
        feats = []
        for f in msg.features:
            numeric = f.kind == kinds[NUMERIC]
            feats.append(Feature(
                name=f.name, kind=next((k for k, v in kinds.items() if v == f.kind), "unspecified"), mean=f.mean if numeric else 0.0,
                std=f.std if numeric else 1.0,
                range=(f.range.min, f.range.max) if f.HasField("range") else None,
                levels=tuple(f.levels), level_frequencies=tuple(f.level_frequencies)))
        return cls(tuple(feats), msg.label_column or DEFAULT_LABEL, tuple(msg.class_names))

    def to_proto(self) -> common_pb2.TabularSchema:
        from ftps.v1 import common_pb2

        kinds = _kinds()
        msg = common_pb2.TabularSchema(label_column=self.label_column, class_names=list(self.class_names))
        for f in self.features:
            p = msg.features.add(name=f.name, kind=kinds[f.kind])
            if f.kind == NUMERIC:
                p.mean, p.std = f.mean, f.std
                if f.range is not None:
                    p.range.min, p.range.max = f.range
            else:
                p.levels.extend(f.levels)
                p.level_frequencies.extend(f.level_frequencies)
        return msg

    def to_json(self) -> str:
        """The schema as a JSON document (``ftps-builder schema`` writes it, ``create-task
        --schema`` reads it): easy to read and to edit by hand."""
        feats = []
        for f in self.features:
            d: dict[str, Any] = {"name": f.name, "kind": f.kind}
            if f.kind == NUMERIC:
                d.update(mean=f.mean, std=f.std)
                if f.range is not None:
                    d["range"] = list(f.range)
            else:
                d["levels"] = list(f.levels)
                if f.level_frequencies:
                    d["level_frequencies"] = list(f.level_frequencies)
            feats.append(d)
        return json.dumps({"label_column": self.label_column, "class_names": list(self.class_names),
                           "features": feats}, indent=2)

    @classmethod
    def from_json(cls, text: str, *, what: str = "schema") -> Schema:
        """A schema written by :meth:`to_json` (or by hand); InvalidArgument names what is wrong."""
        try:
            doc = json.loads(text)
            feats = []
            for i, d in enumerate(doc["features"]):
                unknown = set(d) - {"name", "kind", "mean", "std", "range", "levels", "level_frequencies"}
                if unknown:
                    raise ValueError(f"features[{i}] has unknown key {sorted(unknown)[0]!r}")
                rng = d.get("range")
                feats.append(Feature(
                    name=str(d["name"]), kind=str(d.get("kind", NUMERIC)), mean=float(d.get("mean", 0.0)),
                    std=float(d.get("std", 1.0)), range=(float(rng[0]), float(rng[1])) if rng else None,
                    levels=tuple(str(v) for v in d.get("levels", ())),
                    level_frequencies=tuple(float(q) for q in d.get("level_frequencies", ()))))
            schema = cls(tuple(feats), str(doc.get("label_column") or DEFAULT_LABEL),
                         tuple(str(c) for c in doc.get("class_names", ())))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise InvalidArgument(f"{what} is not a schema document: {exc!s}", reason="INVALID_SETTINGS",
                                  field="schema") from exc
        schema.check(field=what)
        return schema

    # -- rows --------------------------------------------------------------------------------------

    def check_rows(self, x: np.ndarray, *, field: str = "records") -> np.ndarray:
        """Raw rows ``[m, F]`` (float) against the schema -> float64 rows; InvalidArgument names the
        first bad row and column: a non-finite or out-of-range number, a level index that is not one."""
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise InvalidArgument(
                f"{field}.x has shape {list(x.shape)}, expected raw rows [m, {len(self.features)}] "
                f"(one value per column: {_name_list(self.names)})", reason="RECORDS_BAD_SHAPE", field=f"{field}.x")
        if x.dtype.kind != "f":
            raise InvalidArgument(f"{field}.x must be float32 or float64 raw values, got {x.dtype}",
                                  reason="RECORDS_BAD_DTYPE", field=f"{field}.x")
        rows = x.astype(np.float64, copy=False)
        bad_row = None  # (row, feature index, message, reason)
        for j, f in enumerate(self.features):
            col = rows[:, j]
            finite = np.isfinite(col)
            if f.kind == NUMERIC:
                ok, why, reason = finite, "not finite", "RECORDS_NOT_FINITE"
                if f.range is not None and finite.all():
                    ok = (col >= f.range[0]) & (col <= f.range[1])
                    why = f"outside the column's range [{f.range[0]:g}, {f.range[1]:g}]"
                    reason = "RECORDS_OUT_OF_RANGE"
            else:
                ok = finite & (col >= 0) & (col < len(f.levels)) & (col == np.floor(col))
                why = f"not a level index in [0, {len(f.levels) - 1}] ({_name_list(f.levels)})"
                reason = "RECORDS_OUT_OF_RANGE"
            if not ok.all():
                i = int(np.argmin(ok))
                if bad_row is None or i < bad_row[0]:
                    bad_row = (i, j, why, reason)
        if bad_row is not None:
            i, j, why, reason = bad_row
            value = rows[i, j]
            raise InvalidArgument(f"{field}.x[{i}, {j}] (column {self.features[j].name!r}) = {value:g} is {why}",
                                  reason=reason, field=f"{field}.x")
        return rows

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """Raw rows ``[m, F]`` (checked) -> model inputs float32 ``[m, width]``."""
        rows = np.asarray(rows, dtype=np.float64)
        out = np.zeros((len(rows), self.width), dtype=np.float64)
        for j, (f, at) in enumerate(zip(self.features, self._offsets)):
            if f.kind == NUMERIC:
                out[:, at] = (rows[:, j] - f.mean) / f.std
            else:
                out[np.arange(len(rows)), at + rows[:, j].astype(np.int64)] = 1.0
        with np.errstate(over="ignore"):  # an overflow to inf is caught by the checks that follow
            return out.astype(np.float32)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Model inputs ``[m, width]`` -> raw rows float64 ``[m, F]`` (a categorical as the index
        of its largest one-hot entry): what a person reads."""
        enc = np.asarray(encoded, dtype=np.float64).reshape(len(encoded), -1)
        out = np.zeros((len(enc), len(self.features)), dtype=np.float64)
        for j, (f, at) in enumerate(zip(self.features, self._offsets)):
            if f.kind == NUMERIC:
                out[:, j] = enc[:, at] * f.std + f.mean
            else:
                out[:, j] = np.argmax(enc[:, at:at + f.width], axis=1)
        return out

    def cell_text(self, j: int, value: float) -> str:
        """One raw value as a person writes it: a number, or a categorical's level."""
        f = self.features[j]
        if f.kind == CATEGORICAL:
            return f.levels[int(value)] if 0 <= value < len(f.levels) else f"?{value:g}"
        return f"{value:.6g}"

    def label_text(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    # -- why a row is exposed ----------------------------------------------------------------------

    def unusual(self, row: np.ndarray, *, top: int = 5) -> list[dict[str, Any]]:
        """The columns that make one raw row unusual against the builder's data, most unusual
        first: numeric by |z| (z = (value - mean) / std, percentile Phi(z) under a normal fit),
        categorical by how rare its level is (its share in the builder's data, when known).

        Each entry: ``feature``, ``value`` (text), ``z`` (None for categoricals), ``percentile``
        (0-100, the share of the builder's rows at or below it; for a categorical, its level's
        share), and ``rarity`` (the sort key: |z|, or the |z| of a normal tail as rare as the level).
        """
        out = []
        for j, f in enumerate(self.features):
            v = float(row[j])
            if f.kind == NUMERIC:
                z = (v - f.mean) / f.std
                out.append({"feature": f.name, "value": self.cell_text(j, v), "z": z,
                            "percentile": 100.0 * float(norm.cdf(z)), "rarity": abs(z)})
            else:
                share = (f.level_frequencies[int(v)] if f.level_frequencies and 0 <= v < len(f.levels)
                         else None)
                # a level held by a share q of rows is as rare as a two-sided normal tail of mass q
                rarity = float(norm.isf(max(share, 1e-12) / 2)) if share is not None else 0.0
                out.append({"feature": f.name, "value": self.cell_text(j, v), "z": None,
                            "percentile": None if share is None else 100.0 * share, "rarity": rarity})
        out.sort(key=lambda d: -d["rarity"])
        return out[:top]

    # -- tables (CSV, Parquet) -> raw rows ---------------------------------------------------------

    def rows_from_columns(self, columns: Mapping[str, Sequence[Any]], *, what: str,
                          num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        """A table's columns by name (strings from a CSV, typed values from Parquet) -> (raw rows
        float64 [m, F], labels int64 [m], record ids or None). InvalidArgument names the file, the
        row (numbered from 1, as a spreadsheet shows the data rows) and the column."""
        missing = [n for n in [*self.names, self.label_column] if n not in columns]
        if missing:
            raise InvalidArgument(f"{what}: missing column(s) {_name_list(missing)}; the task's columns are "
                                  f"{_name_list([*self.names, self.label_column])}",
                                  reason="RECORDS_BAD_SHAPE", field="records")
        m = len(columns[self.label_column])
        if m == 0:
            raise InvalidArgument(f"{what} holds no rows", reason="RECORDS_EMPTY", field="records")
        rows = np.zeros((m, len(self.features)), dtype=np.float64)
        for j, f in enumerate(self.features):
            col = columns[f.name]
            if f.kind == NUMERIC:
                rows[:, j] = [_number(v, what, i, f.name) for i, v in enumerate(col)]
            else:
                index = {lvl: k for k, lvl in enumerate(f.levels)}
                for i, v in enumerate(col):
                    text = _text(v)
                    if text not in index:
                        raise InvalidArgument(
                            f"{what} row {i + 1}, column {f.name!r}: {text[:80]!r} is not one of its levels "
                            f"({_name_list(f.levels)})", reason="RECORDS_OUT_OF_RANGE", field="records.x")
                    rows[i, j] = index[text]
        labels = np.array([self._label(v, what, i, num_classes) for i, v in enumerate(columns[self.label_column])],
                          dtype=np.int64)
        ids = None
        if "record_id" in columns:
            ids = [_text(v) for v in columns["record_id"]]
            if not all(ids):
                ids = None
        return rows, labels, ids

    def _label(self, value: Any, what: str, i: int, num_classes: int | None) -> int:
        text = _text(value)
        if text in self.class_names:
            return self.class_names.index(text)
        try:
            label = int(text)
        except ValueError:
            label = -1
        limit = num_classes or len(self.class_names) or None
        if label < 0 or (limit is not None and label >= limit):
            names = f" or one of {_name_list(self.class_names)}" if self.class_names else ""
            span = f"[0, {limit - 1}]" if limit else ">= 0"
            raise InvalidArgument(f"{what} row {i + 1}, column {self.label_column!r}: {text[:80]!r} is not a "
                                  f"class (an index in {span}{names})", reason="LABEL_OUT_OF_RANGE",
                                  field="records.y")
        return label

    @classmethod
    def infer(cls, columns: Mapping[str, Sequence[Any]], *, label_column: str = DEFAULT_LABEL,
              class_names: Sequence[str] = (), what: str = "table",
              max_levels: int = 50) -> Schema:
        """A schema from a builder's table: a column whose every value parses as a number is
        numeric (the builder's mean and standard deviation), any other categorical (its levels
        sorted, with their shares) when it has at most ``max_levels`` of them; ``record_id`` and
        the label column are not features."""
        if label_column not in columns:
            raise InvalidArgument(f"{what}: no label column {label_column!r} (columns: {_name_list(list(columns))})",
                                  reason="RECORDS_BAD_SHAPE", field="records")
        feats = []
        for name, col in columns.items():
            if name in (label_column, "record_id"):
                continue
            values = [_text(v) for v in col]
            try:
                nums = np.array([float(v) for v in values], dtype=np.float64)
            except ValueError:
                nums = None
            if nums is not None and len(nums) and np.isfinite(nums).all():
                std = float(nums.std())
                feats.append(Feature(name=name, kind=NUMERIC, mean=float(nums.mean()), std=std if std > 0 else 1.0))
                continue
            levels = sorted(set(values))
            if not 2 <= len(levels) <= max_levels:
                raise InvalidArgument(f"{what}: column {name!r} is neither all numbers nor a category with 2 "
                                      f"to {max_levels} levels ({len(levels)} distinct values)",
                                      reason="INVALID_SETTINGS", field="schema")
            counts = Counter(values)
            feats.append(Feature(name=name, kind=CATEGORICAL, levels=tuple(levels),
                                 level_frequencies=tuple(counts[v] / len(values) for v in levels)))
        schema = cls(tuple(feats), label_column, tuple(class_names))
        schema.check(field="schema")
        return schema


def of_settings(settings: common_pb2.TaskSettings) -> Schema | None:
    """The task's schema, or None for an image task."""
    return Schema.from_proto(settings.schema) if settings.HasField("schema") else None


def _good_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and name.isprintable()


def _name_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a Parquet float label 1.0 is the class "1"
    return str(value).strip()


def _number(value: Any, what: str, i: int, column: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
    else:
        text = _text(value)
        try:
            v = float(text)
        except ValueError:
            shown = "an empty cell" if not text else repr(text[:80])
            raise InvalidArgument(f"{what} row {i + 1}, column {column!r}: {shown} is not a number",
                                  reason="RECORDS_BAD_DTYPE", field="records.x") from None
    if not math.isfinite(v):
        raise InvalidArgument(f"{what} row {i + 1}, column {column!r}: {v} is not finite",
                              reason="RECORDS_NOT_FINITE", field="records.x")
    return v
