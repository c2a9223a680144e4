"""Records as FFCV ``.beton`` files: builder data in the format builders who train with FFCV
already keep (https://ffcv.io, Leclerc et al., CVPR 2023).

A ``.beton`` holds one row per record and named fields. Records are read from:

- the record field ``x`` (or ``image``): an ``NDArrayField`` of the task's record shape (read as
  float32 as stored), or an ``RGBImageField`` (raw or JPEG pages), read as float32
  ``[3, H, W]`` in [0, 1], the layout the image strategies train on;
- the label field ``y`` (or ``label``): an ``IntField``.

:func:`header` reads what a file declares (samples, fields and their types) with numpy alone,
bounded by the file's size, so a caller can refuse a file before any decoder sees it. :func:`read`
decodes every record through FFCV's ``Loader``; its decoders trust the file's page pointers and
libjpeg-turbo parses the JPEG pages, so a file nobody has checked yet is read in a child process
by the caller (the registry, at upload). :func:`write` makes a ``.beton`` of records (benches,
tests, a builder converting npz).

``ffcv`` is optional (it needs OpenCV and libjpeg-turbo to build): without it :func:`header` still
works and :func:`read` / :func:`write` raise :class:`BetonUnavailable` saying why.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftps.records import RecordsError

__all__ = ["BetonUnavailable", "Field", "Header", "available", "header", "is_beton", "read", "write"]

# ffcv/types.py, format version 2 (ffcv 1.0): the file header, then one descriptor per field.
_VERSION = 2
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", 1024))],
                  align=True)
# ffcv.fields' TYPE_ID of each field class this module reads or names in errors.
_TYPES = {0: "FloatField", 1: "IntField", 2: "RGBImageField", 3: "BytesField", 4: "NDArrayField",
          5: "JSONField", 255: "custom field"}
_MAX_FIELDS = 64
X_NAMES, Y_NAMES = ("x", "image"), ("y", "label")


class BetonUnavailable(RuntimeError):
    """``ffcv`` cannot be imported here (not installed, or it failed to build)."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # one of _TYPES' values, or "type N" for an unknown one


@dataclass(frozen=True)
class Header:
    num_samples: int
    page_size: int
    fields: tuple[Field, ...]

    def field(self, names: tuple[str, ...]) -> Field | None:
        return next((f for f in self.fields if f.name in names), None)


def available() -> str | None:
    """None when ``.beton`` files can be read and written here, else why not (one line)."""
    try:
        import ffcv  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken build raises more than ImportError
        return f"ffcv is not installed here ({type(e).__name__}: {str(e)[:200]})"
    return None


def _require() -> None:
    why = available()
    if why is not None:
        raise BetonUnavailable(f"cannot read or write FFCV .beton files: {why}")


def is_beton(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like a ``.beton`` (format version 2). An npz starts with ``PK``."""
    if len(data) < _HEADER.itemsize:
        return False
    h = np.frombuffer(data, dtype=_HEADER, count=1)[0]
    return int(h["version"]) == _VERSION and 1 <= int(h["num_fields"]) <= _MAX_FIELDS


def header(data: bytes | memoryview, *, what: str = "beton", size: int | None = None) -> Header:
    """What a ``.beton`` declares, read with numpy alone and checked against its size.

    ``data``: the file, or its start (then ``size`` is the whole file's size).

    Raises RecordsError naming ``what`` for a file that is not a version-2 ``.beton``, declares
    more fields than it holds, or a table past its end.
    """
    size = len(data) if size is None else size
    if len(data) < _HEADER.itemsize:
        raise RecordsError(f"{what}: {size} bytes is too short for an FFCV .beton header")
    h = np.frombuffer(data, dtype=_HEADER, count=1)[0]
    version, num_fields = int(h["version"]), int(h["num_fields"])
    if version != _VERSION:
        raise RecordsError(f"{what}: not an FFCV .beton of format version {_VERSION} "
                           f"(the header says version {version})")
    if not 1 <= num_fields <= _MAX_FIELDS:
        raise RecordsError(f"{what}: declares {num_fields} fields; 1 to {_MAX_FIELDS} are allowed")
    fields_end = _HEADER.itemsize + num_fields * _FIELD.itemsize
    if fields_end > min(size, len(data)):
        raise RecordsError(f"{what}: declares {num_fields} fields but ends at byte {size}")
    descs = np.frombuffer(data, dtype=_FIELD, count=num_fields, offset=_HEADER.itemsize)
    fields = []
    for d in descs:
        raw = bytes(d["name"]).split(b"\0", 1)[0]
        name = raw.decode("utf-8", "replace")
        type_id = int(d["type_id"])
        fields.append(Field(name, _TYPES.get(type_id, f"type {type_id}")))
    alloc = int(h["alloc_table_ptr"])
    if not fields_end <= alloc <= size:
        raise RecordsError(f"{what}: its allocation table starts at byte {alloc}, outside the "
                           f"{size}-byte file")
    return Header(int(h["num_samples"]), int(h["page_size"]), tuple(fields))


def _record_fields(head: Header, what: str) -> tuple[Field, Field]:
    x, y = head.field(X_NAMES), head.field(Y_NAMES)
    listed = ", ".join(f"{f.name!r} ({f.kind})" for f in head.fields)
    if x is None or x.kind not in ("NDArrayField", "RGBImageField"):
        raise RecordsError(f"{what}: needs a record field named {' or '.join(X_NAMES)} "
                           f"(NDArrayField or RGBImageField); it has {listed}")
    if y is None or y.kind != "IntField":
        raise RecordsError(f"{what}: needs a label field named {' or '.join(Y_NAMES)} (IntField); "
                           f"it has {listed}")
    return x, y


@contextmanager
def _as_path(source: bytes | memoryview | str | os.PathLike) -> Iterator[str]:
    """FFCV memory-maps a file by name: bytes are written to a private temporary file first."""
    if isinstance(source, (str, os.PathLike)):
        yield os.fspath(source)
        return
    with tempfile.TemporaryDirectory(prefix="ftps-beton-") as tmp:
        path = Path(tmp) / "records.beton"
        path.write_bytes(source)
        yield str(path)


def read(source: bytes | memoryview | str | os.PathLike, *, what: str = "beton",
         batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a ``.beton``, in file order -> (x float32 [N, ...], y int64 [N]).

    ``source``: the file's bytes or its path. Raises RecordsError for a file without the record
    and label fields (or whose pages fail to decode), BetonUnavailable without ffcv.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            head = header(f.read(_HEADER.itemsize + _MAX_FIELDS * _FIELD.itemsize), what=what,
                          size=os.fstat(f.fileno()).st_size)
    else:
        head = header(source, what=what)
    x_field, y_field = _record_fields(head, what)
    _require()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    image = x_field.kind == "RGBImageField"
    xs, ys = [], []
    if head.num_samples == 0:
        raise RecordsError(f"{what}: holds no records")
    with _as_path(source) as path:
        try:
            loader = Loader(path, batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL,
                            drop_last=False, pipelines={
                                x_field.name: [SimpleRGBImageDecoder() if image else NDArrayDecoder()],
                                y_field.name: [IntDecoder()],
                            }, custom_fields={})
            for batch in loader:
                xb, yb = batch[0], batch[1]
                # The loader reuses its batch buffers: copy out before the next batch.
                xs.append(np.array(xb, copy=True))
                ys.append(np.array(yb, copy=True).reshape(-1))
        except (RecordsError, BetonUnavailable):
            raise
        except Exception as e:  # noqa: BLE001 - a decoder's failure is the file's fault
            raise RecordsError(f"{what}: FFCV could not decode it ({type(e).__name__}: "
                               f"{str(e)[:300]})") from e
    x = np.concatenate(xs)
    if image:  # [N, H, W, 3] uint8 -> [N, 3, H, W] float32 in [0, 1]
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
    return np.ascontiguousarray(x, dtype=np.float32), np.concatenate(ys).astype(np.int64)


def write(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, *,
          jpeg_quality: int | None = None, num_workers: int = 1) -> None:
    """Write records to a ``.beton`` at ``path``: fields ``x`` and ``y``.

    ``jpeg_quality=None``: ``x`` as an NDArrayField, exactly as given (float32). Otherwise ``x``
    must be images ``[N, 3, H, W]`` in [0, 1], stored as an RGBImageField of JPEG pages at that
    quality (smaller, lossy: :func:`read` gives them back within the JPEG error).
    """
    _require()
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    x = np.asarray(x)
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise RecordsError(f"x has {len(x)} records but y has {len(y)} labels")
    if jpeg_quality is None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        field = NDArrayField(shape=tuple(x.shape[1:]), dtype=np.dtype("float32"))
        rows = x
    else:
        if x.ndim != 4 or x.shape[1] != 3:
            raise RecordsError(f"JPEG pages need images [N, 3, H, W], got {list(x.shape)}")
        rows = np.ascontiguousarray(
            (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))
        field = RGBImageField(write_mode="jpg", jpeg_quality=int(jpeg_quality))

    class _Rows:
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int):
            return rows[i], int(y[i])

    writer = DatasetWriter(os.fspath(path), {"x": field, "y": IntField()}, num_workers=num_workers)
    writer.from_indexed_dataset(_Rows())
