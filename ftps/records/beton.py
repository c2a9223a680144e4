"""Records as FFCV ``.beton`` files: builder data in the format builders who train with FFCV
already keep (https://ffcv.io, Leclerc et al., CVPR 2023).

A ``.beton`` holds one row per record and named fields. Records are read from:

- the record field ``x`` (or ``image``): an ``NDArrayField`` of the task's record shape (read as
  float32 as stored), or an ``RGBImageField`` (raw or JPEG pages), read as float32
  ``[3, H, W]`` in [0, 1], the layout the image strategies train on;
- the label field ``y`` (or ``label``): an ``IntField``.

:func:`header` reads what a file declares (samples, fields and their types) with numpy alone,
bounded by the file's size, so a caller can refuse a file before any decoder sees it;
:func:`check_pages` also checks every pointer the decoders follow (FFCV does not). :func:`read`
decodes every record through FFCV's ``Loader``; its decoders trust the file's page pointers and
libjpeg-turbo parses the JPEG pages, so a file nobody has checked yet is read in a child process
by the caller (the registry, at upload). :func:`write` makes a ``.beton`` of records (benches,
tests, a builder converting npz).

``ffcv`` is optional (it needs OpenCV and libjpeg-turbo to build): without it :func:`header` still
works and :func:`read` / :func:`write` raise :class:`BetonUnavailable` saying why.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftps.records import RecordsError

__all__ = ["BetonUnavailable", "Field", "Header", "available", "check_pages", "header", "is_beton", "read",
           "write"]

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


# ffcv/types.py ALLOC_TABLE_TYPE: one row per allocation (a sample's field data).
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_RGB_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_PTR_SIZE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
# Each field's per-sample metadata (its class's metadata_type in ffcv.fields).
_META = {"FloatField": np.dtype("<f8"), "IntField": np.dtype("<i8"), "NDArrayField": np.dtype("<u8"),
         "RGBImageField": _RGB_META, "BytesField": _PTR_SIZE, "JSONField": _PTR_SIZE}
_NDARRAY_ARGS = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])
_JPG, _RAW = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES
MAX_IMAGE_SIDE = 4096


def check_pages(data: bytes | memoryview | np.ndarray, *, what: str = "beton") -> Header:
    """:func:`header`, then every pointer the decoders will follow, checked with numpy alone.

    FFCV's loader looks a sample's data up by the pointer in its metadata without bounds checks
    (a pointer that is no allocation's start reads another's size, or past the table), copies an
    array's allocation whole into a buffer of the declared shape, and decodes a JPEG page into a
    buffer of the size its metadata declares: so each record and label field's pointers must start
    an allocation of that sample inside the data pages, of exactly the bytes an array or raw image
    holds, and each JPEG page must declare (in its frame header) the size its metadata does.
    Raises RecordsError naming ``what``, the field and the first bad sample.
    """
    return _pages(data, what)[0]


def _pages(data, what: str) -> tuple[Header, list[tuple[int, int, int, int, int]]]:
    """:func:`check_pages` -> (its header, the JPEG pages of the record field: (sample, start,
    bytes, height, width) each)."""
    head = header(data, what=what)
    size = len(data)
    kinds = [f.kind for f in head.fields]
    unknown = [f"{f.name!r} ({f.kind})" for f in head.fields if f.kind not in _META]
    if unknown:
        raise RecordsError(f"{what}: has fields of types this reader does not know: {', '.join(unknown)}")
    meta_type = np.dtype([("", _META[k]) for k in kinds], align=True)
    meta_start = _HEADER.itemsize + len(kinds) * _FIELD.itemsize
    meta_end = meta_start + head.num_samples * meta_type.itemsize
    alloc_ptr = int(np.frombuffer(data, dtype=_HEADER, count=1)[0]["alloc_table_ptr"])
    if meta_end > alloc_ptr:
        raise RecordsError(f"{what}: declares {head.num_samples} samples, whose metadata would end at byte "
                           f"{meta_end}, past its allocation table at byte {alloc_ptr}")
    if (size - alloc_ptr) % _ALLOC.itemsize:
        raise RecordsError(f"{what}: its allocation table ({size - alloc_ptr} bytes from byte {alloc_ptr}) is "
                           f"not whole {_ALLOC.itemsize}-byte rows; the file is truncated")
    meta = np.frombuffer(data, dtype=meta_type, count=head.num_samples, offset=meta_start)
    table = np.frombuffer(data, dtype=_ALLOC, offset=alloc_ptr)
    ptr, length = table["ptr"], table["size"]
    bad = np.flatnonzero((ptr < meta_end) | (length > alloc_ptr - np.minimum(ptr, alloc_ptr)) |
                         (table["sample_id"] >= head.num_samples))
    if bad.size:
        i = int(bad[0])
        raise RecordsError(f"{what}: allocation {i} (sample {int(table['sample_id'][i])}, {int(length[i])} bytes "
                           f"at byte {int(ptr[i])}) lies outside the data pages (bytes {meta_end} to "
                           f"{alloc_ptr}) or names a sample past {head.num_samples}")
    jpegs: list[tuple[int, int, int, int, int]] = []  # (sample, start, bytes, height, width)
    order = np.argsort(ptr, kind="stable")
    ptr, length, owner = ptr[order], length[order], table["sample_id"][order]
    x_field, y_field = _record_fields(head, what)
    for j, f in enumerate(head.fields):
        if f not in (x_field, y_field) or f.kind not in ("NDArrayField", "RGBImageField"):
            continue
        m = meta[f"f{j}"]
        if f.kind == "RGBImageField":
            mode, width, height = m["mode"], m["width"].astype(np.int64), m["height"].astype(np.int64)
            odd = np.flatnonzero(~np.isin(mode, (_JPG, _RAW)) | (width < 1) | (height < 1) |
                                 (width > MAX_IMAGE_SIDE) | (height > MAX_IMAGE_SIDE))
            if odd.size:
                i = int(odd[0])
                raise RecordsError(f"{what}: field {f.name!r} sample {i}: image mode {int(mode[i])} of "
                                   f"{int(width[i])}x{int(height[i])} pixels; JPEG or raw pages of 1 to "
                                   f"{MAX_IMAGE_SIDE} pixels a side are read")
            pointers = m["data_ptr"]
            # Raw pages are copied whole; a JPEG page needs at least its markers (checked below).
            need = np.where(mode == _RAW, width * height * 3, 4)
            exact = mode == _RAW
        else:
            pointers = m
            need = np.full(head.num_samples, _ndarray_bytes(data, j, f, what), dtype=np.int64)
            exact = np.ones(head.num_samples, bool)
        if head.num_samples and not len(ptr):
            raise RecordsError(f"{what}: declares {head.num_samples} samples but allocates no data for them")
        at = np.minimum(np.searchsorted(ptr, pointers), max(len(ptr) - 1, 0))
        got = length[at].astype(np.int64)
        bad = np.flatnonzero((ptr[at] != pointers) | (owner[at] != np.arange(head.num_samples)) |
                             np.where(exact, got != need, got < need)) if len(ptr) else np.empty(0, np.int64)
        if bad.size:
            i = int(bad[0])
            holding = f" of {'exactly' if exact[i] else 'at least'} {int(need[i])} bytes"
            raise RecordsError(f"{what}: field {f.name!r} sample {i} points at byte {int(pointers[i])}, which "
                               f"does not start an allocation of that sample{holding}")
        if f.kind == "RGBImageField":
            for i in np.flatnonzero(mode == _JPG):
                start, n = int(pointers[i]), int(got[i])
                size_hw = _jpeg_size(data[start:start + n])
                if size_hw != (int(height[i]), int(width[i])):
                    said = "no frame header" if size_hw is None else f"{size_hw[1]}x{size_hw[0]} pixels"
                    raise RecordsError(f"{what}: field {f.name!r} sample {i}: its JPEG page declares {said}, "
                                       f"its metadata {int(width[i])}x{int(height[i])}")
                jpegs.append((int(i), start, n, int(height[i]), int(width[i])))
    return head, jpegs


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(page) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, walking its markers; None if it has none."""
    page = bytes(page)
    if page[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(page):
        if page[i] != 0xFF:
            return None
        marker = page[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(page[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > len(page) or length < 7:
                return None
            return int.from_bytes(page[i + 5:i + 7], "big"), int.from_bytes(page[i + 7:i + 9], "big")
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def _ndarray_bytes(data, j: int, f: Field, what: str) -> int:
    """The bytes one sample of NDArrayField ``j`` holds, from its arguments (shape and dtype)."""
    args = np.frombuffer(data, dtype=_FIELD, count=1, offset=_HEADER.itemsize + j * _FIELD.itemsize)[0]
    raw = bytes(args["arguments"])
    h = np.frombuffer(raw, dtype=_NDARRAY_ARGS, count=1)[0]
    shape = [int(d) for d in h["shape"]]
    while shape and shape[-1] == 0:
        shape.pop()
    type_length = int(h["type_length"])
    try:
        if type_length > len(raw) - _NDARRAY_ARGS.itemsize:
            raise ValueError(f"a {type_length}-byte type description")
        descr = json.loads(raw[_NDARRAY_ARGS.itemsize:_NDARRAY_ARGS.itemsize + type_length].decode("ascii"))
        if not (isinstance(descr, list) and len(descr) == 1 and len(descr[0]) == 2
                and all(isinstance(s, str) for s in descr[0])):
            raise ValueError(f"type description {str(descr)[:80]}")
        dtype = np.dtype(descr[0][1])
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise RecordsError(f"{what}: field {f.name!r} has an unreadable NDArrayField type: {e}") from None
    # The decoder copies raw bytes into an array of this dtype: numbers only, never objects.
    if dtype.kind not in "biuf" or not shape or len(shape) > 4 or any(d > 1 << 24 for d in shape):
        raise RecordsError(f"{what}: field {f.name!r} is an NDArrayField of {dtype} {shape}; numeric arrays "
                           f"of 1-4 dimensions are read")
    return int(dtype.itemsize * np.prod(shape, dtype=np.int64))


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
         batch_size: int = 1024, verify_jpeg: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a ``.beton``, in file order -> (x float32 [N, ...], y int64 [N]).

    ``source``: the file's bytes or its path. ``verify_jpeg``: decode each JPEG page once first
    and refuse the file if libjpeg-turbo reports an error (FFCV's loader ignores it and leaves the
    image as it was: a file nobody has checked yet). Raises RecordsError for a file without the
    record and label fields, with pointers :func:`check_pages` refuses or pages that fail to
    decode; BetonUnavailable without ffcv.
    """
    if isinstance(source, (str, os.PathLike)):
        if os.path.getsize(source) < _HEADER.itemsize:
            header(b"", what=what, size=os.path.getsize(source))  # raises: too short
        data = np.memmap(source, dtype=np.uint8, mode="r")
    else:
        data = source
    head, jpegs = _pages(data, what)
    x_field, y_field = _record_fields(head, what)
    _require()
    if verify_jpeg and jpegs:
        _verify_jpeg(np.frombuffer(data, dtype=np.uint8), jpegs, x_field, what)
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


def _verify_jpeg(buf: np.ndarray, jpegs: list[tuple[int, int, int, int, int]], field: Field, what: str) -> None:
    from ffcv.libffcv import imdecode

    for i, start, n, height, width in jpegs:
        out = np.empty((height, width, 3), dtype=np.uint8)
        if imdecode(np.ascontiguousarray(buf[start:start + n]), out, height, width, height, width,
                    0, 0, 1, 1, False, False) != 0:
            raise RecordsError(f"{what}: field {field.name!r} sample {i}: its JPEG page does not decode "
                               f"(libjpeg-turbo reports an error)")


def write(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, *,
          jpeg_quality: int | None = None, num_workers: int = 1) -> None:
    """Write records to a ``.beton`` at ``path``: fields ``x`` and ``y``.

    ``jpeg_quality=None``: ``x`` as an NDArrayField, exactly as given (float32). Otherwise ``x``
    must be images ``[N, 3, H, W]`` in [0, 1], stored as an RGBImageField of JPEG pages at that
    quality (smaller, lossy: :func:`read` gives them back within the JPEG error).
    ``num_workers`` above 1: FFCV's forked worker processes, only for a process without threads.
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

    # One worker runs in this process (safe beside threads); more are FFCV's forked processes.
    writer_class = _inline_writer() if num_workers <= 1 else DatasetWriter
    writer = writer_class(os.fspath(path), {"x": field, "y": IntField()}, num_workers=max(num_workers, 1))
    writer.from_indexed_dataset(_Rows())


def _inline_writer():
    """FFCV's ``DatasetWriter`` running its worker job in this process, no progress bar.

    Its own forks worker processes: in a process with threads (a gRPC server, an S3 test server)
    the forked child can wait forever on a lock another thread held at the fork. This is its
    ``_write_common`` (ffcv 1.0.2, pinned) with the one worker called inline.
    """
    import queue
    import threading

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class Done:
        def __init__(self) -> None:
            self.value = 0
            self._lock = threading.Lock()

        def get_lock(self) -> threading.Lock:
            return self._lock

    class InlineWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            work: queue.Queue = queue.Queue()
            for todo in queue_content:
                work.put(todo)
            work.put(None)
            allocations: queue.Queue = queue.Queue()
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            work_fn(work, self.metadata_sm, self.metadata_type, self.fields, allocator, Done(), allocations,
                    *extra_worker_args)
            self.finalize(allocations.get())
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    return InlineWriter
