"""Every format a client accepts records in, read into records for one task: the one entry point
of the CLIs and the web client.

- ``.npz`` with arrays ``x``, ``y`` and optionally ``record_id`` (``npz.parse_upload``);
- a folder of images with a ``labels.csv`` (``images.load_folder``; paths only);
- ``.csv`` and ``.parquet`` tables for tabular tasks: one row per record, the schema's columns by
  name, the label column, optionally ``record_id`` (``tables``, ``tabular``).

For a tabular task the records hold raw rows (what the contributor submits; the service encodes
them). Everything a task's settings can tell is checked here too, so a wrong file is refused before
anything is sent; the services check it all again. Errors are ``InvalidArgument`` naming the file
and the first problem (the CLIs print it on one line, the web client shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ftps.common.errors import InvalidArgument
from ftps.records import images, npz, tables
from ftps.records.npz import Records
from ftps.records.tabular import Schema, of_settings
from ftps.v1 import common_pb2

__all__ = ["ACCEPTED", "Expect", "load", "parse"]

ACCEPTED = "an .npz (arrays x, y), a folder of images with labels.csv, or for tabular tasks a .csv or .parquet"


class Expect:
    """What a task's records look like, from its settings (or given by hand: ``shape`` and
    ``num_classes`` for an image task, ``schema`` for a tabular one)."""

    def __init__(self, *, shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 schema: Schema | None = None) -> None:
        self.shape, self.num_classes, self.schema = shape, num_classes, schema

    @classmethod
    def of(cls, settings: common_pb2.TaskSettings | None) -> Expect:
        if settings is None:
            return cls()
        schema = of_settings(settings)
        shape = tuple(int(d) for d in settings.record_shape) or None
        return cls(shape=None if schema else shape, num_classes=settings.num_classes or None, schema=schema)


def load(path: str | os.PathLike, expect: Expect | None = None) -> Records:
    """Records from a file or folder on disk (see the module's formats)."""
    p = Path(path)
    expect = expect or Expect()
    if p.is_dir():
        if expect.schema is not None:
            raise InvalidArgument(f"{p} is a folder: a tabular task takes a .csv or .parquet file",
                                  field="records")
        if expect.shape is None:
            raise InvalidArgument(f"{p} is a folder of images: the record shape is needed (--shape C,H,W)",
                                  field="records")
        return _labels_in_range(images.load_folder(p, expect.shape), expect, str(p))
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"cannot read {p}: no such file", field="records") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {p}: {exc.strerror}", field="records") from None
    return parse(data, str(p), expect)


def parse(data: bytes, name: str, expect: Expect | None = None) -> Records:
    """Records from a file's bytes, its format told by ``name``'s suffix (an upload's file name)."""
    expect = expect or Expect()
    fmt = tables.table_format(name)
    if fmt is not None:
        if expect.schema is None:
            raise InvalidArgument(f"{name}: a {fmt.upper()} file holds tabular records, and this task's records "
                                  "are not tabular (use an .npz or a folder of images)", field="records")
        columns = tables.read_table(data, fmt, what=name)
        rows, labels, ids = expect.schema.rows_from_columns(columns, what=name, num_classes=expect.num_classes)
        return Records(rows, labels, record_ids=ids, source=name)
    if not name.lower().endswith(".npz") and data[:2] != b"PK":
        raise InvalidArgument(f"{name}: not a records file ({ACCEPTED})", field="records")
    recs = npz.parse_upload(data, name)
    if expect.schema is not None:
        width = len(expect.schema.features)
        if recs.x.ndim != 2 or recs.x.shape[1] != width:
            raise InvalidArgument(f"{name}: x has shape {list(recs.x.shape)}; this tabular task takes raw rows "
                                  f"[N, {width}] (one value per column)", reason="RECORDS_BAD_SHAPE", field="records")
    elif expect.shape is not None and tuple(recs.x.shape[1:]) != tuple(expect.shape):
        raise InvalidArgument(f"{name}: records have shape {','.join(map(str, recs.x.shape[1:]))}, "
                              f"the task's records are {','.join(map(str, expect.shape))}",
                              reason="RECORDS_BAD_SHAPE", field="records")
    return _labels_in_range(recs, expect, name)


def _labels_in_range(recs: Records, expect: Expect, what: str) -> Records:
    k = expect.num_classes
    if k and len(recs.y) and recs.y.max() >= k:
        j = int(np.argmax(recs.y >= k))
        raise InvalidArgument(f"{what}: label {int(recs.y[j])} of record {j} is out of range: the task has "
                              f"{k} classes (0-{k - 1})", reason="LABEL_OUT_OF_RANGE", field="records.y")
    return recs
