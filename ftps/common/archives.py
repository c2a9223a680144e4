"""Bounded readers of the archives and tensor files the services open: npz (a zip of ``.npy``
members), ``.npy`` and safetensors.

Every size a file declares is checked against the caller's :class:`ArchiveLimits` before anything
of that size is allocated or decompressed: a 1 MB npz that inflates to 1 GiB, a zip of a million
members, a zip header that lies about a member's size, an ``.npy`` header declaring a terabyte, a
safetensors header whose offsets point past the file. In that order:

- npz: the zip's end record (member count, central directory size) before the directory is parsed;
  each member's name, compression (stored or deflate only) and declared size; then each member's
  ``.npy`` header alone (a few hundred bytes inflated), so dtype and shape are known, object dtypes
  refused and shapes checked against the caller's expectation; then sizes, each and in total; only
  then the data, inflated by a reader that never yields a byte past the size the header
  described (a stream that goes on is refused, not truncated) and checked against the member's CRC.
- safetensors: the 8-byte header length, the JSON header, the tensor count, each tensor's dtype,
  shape and ``data_offsets`` against each other and the file (contiguous, no overlap, no gap).

No grpc here (the worker's sandboxed child imports this module): errors are :class:`ArchiveError`,
a ``ValueError`` whose message names the file (``what``), the member and the limit;
:func:`npz_arrays` and the services turn it into ``InvalidArgument`` — the content is at fault,
whatever the server's state, so retrying cannot help (``RESOURCE_EXHAUSTED`` is what this project
answers for load a caller may retry later).
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ftps.common.errors import InvalidArgument

MiB = 1024 * 1024
GiB = 1024 * MiB

# What one archive from outside the deployment may expand to (the registry's max_expanded_mb
# default; the clients' npz files).
DEFAULT_MAX_EXPANDED_BYTES = 512 * MiB
# numpy's own bound on an .npy header (numpy.lib.format's max_header_size default).
MAX_NPY_HEADER = 10_000
MAX_NDIM = 32
# Room per central-directory entry (46 fixed bytes + name + extra fields): a directory larger
# than max_members of these is refused before zipfile parses it.
_CD_ENTRY_ROOM = 1024
_MAX_NAME = 255
_CHUNK = 1 * MiB


class ArchiveError(ValueError):
    """A malformed archive, or one larger than the limits allow."""


def _shown(name: str) -> str:
    """A member or tensor name for a message: as is when plain, quoted (escapes and all) when not."""
    name = name[:_MAX_NAME]
    return name if name.isascii() and name.isprintable() and " " not in name else repr(name)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what reading one archive may materialise, in uncompressed bytes."""

    max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES  # every member (tensor) together
    max_member_bytes: int | None = None  # one npz member; None: max_bytes
    max_members: int = 64  # npz members
    max_tensors: int = 16_384  # safetensors tensors
    max_header_bytes: int = 2 * MiB  # the safetensors JSON header

    @property
    def member_bytes(self) -> int:
        return self.max_bytes if self.max_member_bytes is None else min(self.max_member_bytes, self.max_bytes)


# Files from outside: a contributor's or builder's upload, a file a client was handed.
EDGE_LIMITS = ArchiveLimits()
# Blobs the deployment's own services wrote after validating them at the edge (a round's batch, a
# task's builder data, a job's inputs): generous, so that no setting of the edge trips them, but
# still bounded.
INTERNAL_LIMITS = ArchiveLimits(max_bytes=8 * GiB, max_tensors=65_536, max_header_bytes=16 * MiB)


@dataclass(frozen=True)
class ArraySpec:
    """What a caller expects of one npz array, checked on its header before its data is read.

    ``shape``: None for any shape, else one entry per dimension: an int (exactly that size), a
    str (a size shared by every array naming the same letter, e.g. ``"m"`` records), None (any
    size); a trailing ``...`` allows any further dimensions. ``kinds``: allowed ``dtype.kind``
    letters ("f" float, "iu" integers, "U" strings); empty allows any dtype but object.
    """

    shape: tuple | None = None
    kinds: str = ""
    required: bool = True


def records_spec(record_shape: tuple[int, ...] | list[int]) -> dict[str, ArraySpec]:
    """x [m, *record_shape] of floats and y [m] of integer labels (the registry's builder data)."""
    return {"x": ArraySpec(("m", *record_shape), "f"), "y": ArraySpec(("m",), "iu")}


# -- .npy -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _NpyHeader:
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int  # where the data starts

    @property
    def count(self) -> int:
        return math.prod(self.shape)  # Python ints: no overflow

    @property
    def size(self) -> int:
        """Bytes of the whole .npy: header and data."""
        return self.offset + self.count * self.dtype.itemsize


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _npy_header(f, where: str) -> _NpyHeader:
    """Parse an .npy header from ``f`` reading at most 12 + MAX_NPY_HEADER bytes: the length
    field is checked before the header is read (numpy reads first, then checks)."""
    try:
        magic = _read_exactly(f, 8)
        if magic[:6] != b"\x93NUMPY":
            raise ArchiveError(f"{where} is not an .npy array")
        version = (magic[6], magic[7])
        if version == (1, 0):
            length_bytes = _read_exactly(f, 2)
            length = struct.unpack("<H", length_bytes)[0]
        elif version == (2, 0):
            length_bytes = _read_exactly(f, 4)
            length = struct.unpack("<I", length_bytes)[0]
        else:
            raise ArchiveError(f"{where}: .npy format version {version[0]}.{version[1]} is not read here")
        if length > MAX_NPY_HEADER:
            raise ArchiveError(f"{where}: .npy header of {length} bytes; the limit is {MAX_NPY_HEADER}")
        header = _read_exactly(f, length)
    except EOFError:
        raise ArchiveError(f"{where}: truncated .npy header") from None
    # numpy's own parser on the bounded header: literal_eval, never unpickling.
    small = io.BytesIO(magic + length_bytes + header)
    small.seek(8)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = read(small, max_header_size=MAX_NPY_HEADER)
    except Exception as exc:  # noqa: BLE001 - a hostile header; numpy's parser raises tokenize errors too
        raise ArchiveError(f"{where}: unreadable .npy header: {str(exc)[:200]}") from None
    if dtype.hasobject:
        raise ArchiveError(f"{where} holds an object array (pickle), refused")
    if dtype.itemsize == 0:
        raise ArchiveError(f"{where} has the zero-size dtype {dtype}")
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise ArchiveError(f"{where} has an invalid shape {list(shape)}")
    return _NpyHeader(dtype, tuple(shape), fortran_order, len(magic) + len(length_bytes) + length)


def _check_spec(where: str, name: str, h: _NpyHeader, spec: ArraySpec, dims: dict[str, tuple[int, str]]) -> None:
    if spec.kinds and h.dtype.kind not in spec.kinds:
        raise ArchiveError(f"{where} has dtype {h.dtype}; expected {_kinds(spec.kinds)}")
    if spec.shape is None:
        return
    fixed = list(spec.shape)
    open_ended = bool(fixed) and fixed[-1] is Ellipsis
    if open_ended:
        fixed.pop()
    if len(h.shape) != len(fixed) and not (open_ended and len(h.shape) >= len(fixed)):
        raise ArchiveError(f"{where} has shape {list(h.shape)}, expected {_spelled(spec.shape)}")
    for size, want in zip(h.shape, fixed):
        if isinstance(want, str):
            seen = dims.setdefault(want, (size, name))
            if seen[0] != size:
                raise ArchiveError(f"{where} has shape {list(h.shape)}, expected {_spelled(spec.shape)} "
                                   f"with {want} = {seen[0]} as in {seen[1]}")
        elif want is not None and size != want:
            raise ArchiveError(f"{where} has shape {list(h.shape)}, expected {_spelled(spec.shape)}")


def _kinds(kinds: str) -> str:
    names = {"f": "float", "i": "signed integer", "u": "unsigned integer", "b": "bool", "U": "string",
             "c": "complex"}
    return " or ".join(names.get(k, k) for k in kinds)


def _spelled(shape: tuple) -> str:
    return "[" + ", ".join("..." if d is Ellipsis else "*" if d is None else str(d) for d in shape) + "]"


def _read_array(f, h: _NpyHeader, where: str) -> np.ndarray:
    """The array's data after its header, read into one buffer of exactly the size the header
    describes (already checked against the limits)."""
    flat = np.empty(h.count, dtype=h.dtype)
    buf = memoryview(flat).cast("B") if flat.nbytes else memoryview(b"")
    filled = 0
    while filled < len(buf):
        got = f.readinto(buf[filled:filled + _CHUNK])
        if not got:
            raise ArchiveError(f"{where}: data ends after {filled} of {len(buf)} bytes")
        filled += got
    if h.fortran_order:
        return flat.reshape(h.shape[::-1]).transpose()
    return flat.reshape(h.shape)


class _BytesReader:
    """read/readinto over a memoryview, never past its end."""

    def __init__(self, data: memoryview) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int) -> bytes:
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return bytes(out)

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self._data) - self._pos)
        buf[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def _check_size(where: str, h: _NpyHeader, limit: int) -> None:
    if h.size > limit:
        raise ArchiveError(f"{where} expands to {h.size} bytes; the limit is {limit} bytes")
    if any(d > limit for d in h.shape):  # an empty array may still declare dimensions numpy refuses
        raise ArchiveError(f"{where} has shape {list(h.shape)}: a dimension above the limit of {limit}")


def read_npy(data: bytes | bytearray | memoryview, *, what: str = "npy",
             limits: ArchiveLimits = INTERNAL_LIMITS, spec: ArraySpec | None = None) -> np.ndarray:
    """One ``.npy`` file -> its array, header checked before the data is read; never unpickles."""
    view = memoryview(data).cast("B")
    f = _BytesReader(view)
    h = _npy_header(f, what)
    if spec is not None:
        _check_spec(what, what, h, spec, {})
    _check_size(what, h, limits.max_bytes)
    if h.size != len(view):
        raise ArchiveError(f"{what}: its header describes {h.size} bytes, the file has {len(view)}")
    return _read_array(f, h, what)


# -- npz ------------------------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... name length, extra length


class _MemberReader:
    """The uncompressed bytes of one zip member: never more than ``size`` bytes, whatever the
    stream holds; a deflate stream is inflated piece by piece (zlib's ``max_length``)."""

    def __init__(self, raw: memoryview, method: int, size: int, where: str) -> None:
        self._raw, self._pos, self._where = raw, 0, where
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS) if method == zipfile.ZIP_DEFLATED else None
        self._left = size
        self.crc = 0

    def _next(self, n: int) -> bytes:
        if self._inflate is None:
            out = bytes(self._raw[self._pos:self._pos + n])
            self._pos += len(out)
            return out
        while True:
            if self._inflate.eof:  # (after the end, zlib may keep the rest as unconsumed_tail too)
                return b""
            tail = self._inflate.unconsumed_tail
            if not tail:
                if self._pos >= len(self._raw):
                    return b""
                tail = self._raw[self._pos:self._pos + 64 * 1024]
                self._pos += len(tail)
            try:
                out = self._inflate.decompress(tail, n)
            except zlib.error as exc:
                raise ArchiveError(f"{self._where}: corrupt deflate stream ({exc})") from None
            if out:
                return out
            if not self._inflate.eof and len(self._inflate.unconsumed_tail) >= len(tail):
                raise ArchiveError(f"{self._where}: corrupt deflate stream (no progress)")  # never spin

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:  # zlib's max_length 0 would mean "no limit"
            return b""
        out = self._next(n)
        self._left -= len(out)
        self.crc = zlib.crc32(out, self.crc)
        return out

    def readinto(self, buf: memoryview) -> int:
        out = self.read(len(buf))
        buf[:len(out)] = out
        return len(out)

    def goes_on(self) -> bool:
        """True when the stream holds more than ``size`` bytes (reads one byte past it, at most)."""
        return bool(self._next(1))


def _members(data: bytes | bytearray | memoryview, what: str, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    """The zip's members, its central directory bounded before zipfile parses it."""
    fp = io.BytesIO(data if isinstance(data, bytes) else bytes(data))  # shares a bytes object's buffer
    try:
        # zipfile's own end-record reader, so that the count and directory size checked here
        # are the ones ZipFile then uses.
        end = zipfile._EndRecData(fp)
    except (zipfile.BadZipFile, OSError, struct.error, ValueError) as exc:
        raise ArchiveError(f"{what} is not a readable npz file: {exc}") from None
    if end is None:
        raise ArchiveError(f"{what} is not a readable npz file: not a zip archive")
    count, cd_size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if count > limits.max_members:
        raise ArchiveError(f"{what} has {count} members; the limit is {limits.max_members}")
    if cd_size > limits.max_members * _CD_ENTRY_ROOM:
        raise ArchiveError(f"{what}: its zip directory is {cd_size} bytes; the limit is "
                           f"{limits.max_members * _CD_ENTRY_ROOM}")
    try:
        infos = zipfile.ZipFile(fp).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            NotImplementedError, struct.error) as exc:
        raise ArchiveError(f"{what} is not a readable npz file: {exc}") from None
    if len(infos) > limits.max_members:  # the end record's count may lie
        raise ArchiveError(f"{what} has {len(infos)} members; the limit is {limits.max_members}")
    return infos


def _raw(view: memoryview, info: zipfile.ZipInfo, where: str) -> memoryview:
    """The member's compressed bytes, located through its local header."""
    start = info.header_offset
    fields = view[start:start + _LOCAL_HEADER.size]
    if start < 0 or len(fields) != _LOCAL_HEADER.size:
        raise ArchiveError(f"{where}: its local header lies outside the file")
    sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(fields)
    if sig != b"PK\x03\x04":
        raise ArchiveError(f"{where}: bad local header")
    begin = start + _LOCAL_HEADER.size + name_len + extra_len
    end = begin + info.compress_size
    if end > len(view):
        raise ArchiveError(f"{where}: its {info.compress_size} compressed bytes run past the end of the file")
    return view[begin:end]


def read_npz(data: bytes | bytearray | memoryview, *, what: str = "npz",
             limits: ArchiveLimits = INTERNAL_LIMITS,
             expect: Mapping[str, ArraySpec] | None = None) -> dict[str, np.ndarray]:
    """An npz -> {name: array}, bounded by ``limits`` and checked against ``expect`` (arrays by
    name; other arrays are allowed, within the limits) before any array is allocated. Never
    unpickles; raises ArchiveError naming ``what``, the member and the limit."""
    view = memoryview(data).cast("B")
    infos = _members(data, what, limits)
    expect = dict(expect or {})
    member_limit = limits.member_bytes
    plan: list[tuple[str, zipfile.ZipInfo, str, _NpyHeader, memoryview]] = []
    dims: dict[str, tuple[int, str]] = {}
    names: set[str] = set()
    total = 0
    for info in infos:
        member = info.filename
        where = f"{what}: member {_shown(member)}"
        if len(member) > _MAX_NAME or not member.endswith(".npy"):
            raise ArchiveError(f"{where} is not an .npy array name")
        name = member[:-len(".npy")]
        if name in names:
            raise ArchiveError(f"{where} appears twice")
        names.add(name)
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{where} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArchiveError(f"{where} uses zip compression method {info.compress_type}; only stored "
                               "and deflate are read")
        if info.file_size > member_limit:
            raise ArchiveError(f"{where} expands to {info.file_size} bytes (its zip header says); the "
                               f"limit is {member_limit} bytes")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ArchiveError(f"{where} is stored, yet its zip header gives {info.compress_size} "
                               f"compressed and {info.file_size} uncompressed bytes")
        raw = _raw(view, info, where)
        # Only the header: a few hundred bytes inflated, whatever the member holds.
        h = _npy_header(_MemberReader(raw, info.compress_type, min(info.file_size, 12 + MAX_NPY_HEADER), where), where)
        if name in expect:
            _check_spec(f"{what}.{name}", name, h, expect[name], dims)
        _check_size(where, h, member_limit)
        if h.size != info.file_size:
            raise ArchiveError(f"{where}: its zip header declares {info.file_size} bytes, its .npy header "
                               f"{list(h.shape)} of {h.dtype} ({h.size} bytes)")
        total += h.size
        if total > limits.max_bytes:
            raise ArchiveError(f"{what}: its members expand to more than {limits.max_bytes} bytes together "
                               f"(the limit), {total} with {_shown(member)}")
        plan.append((where, info, name, h, raw))
    required = [n for n, s in expect.items() if s.required]
    missing = [n for n in required if n not in names]
    if missing:
        raise ArchiveError(f"{what} must hold arrays {', '.join(required)}; {', '.join(missing)} missing "
                           f"(found {', '.join(sorted(names)) or 'no arrays'})")
    arrays = {}
    for where, info, name, h, raw in plan:
        f = _MemberReader(raw, info.compress_type, h.size, where)
        if len(f.read(h.offset)) != h.offset:
            raise ArchiveError(f"{where}: truncated .npy header")
        arrays[name] = _read_array(f, h, where)
        # Never trust a stream to end where the headers say: one byte more is refused.
        if f.goes_on():
            raise ArchiveError(f"{where} expands past the {h.size} bytes its headers declare")
        if f.crc != info.CRC:
            raise ArchiveError(f"{where}: CRC mismatch (corrupt archive)")
    return arrays


# -- safetensors ----------------------------------------------------------------------------------

# safetensors dtype -> bytes per element (sub-byte formats are not read here).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section, after the header
    end: int


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def safetensors_index(data: bytes | bytearray | memoryview, *, what: str = "safetensors",
                      limits: ArchiveLimits = INTERNAL_LIMITS) -> dict[str, TensorEntry]:
    """Check a safetensors file's header against itself, the file and ``limits`` without
    loading any tensor -> {name: TensorEntry}. Raises ArchiveError naming ``what``."""
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise ArchiveError(f"{what}: not a safetensors file ({len(view)} bytes)")
    n = int.from_bytes(view[:8], "little")
    if n > limits.max_header_bytes:
        raise ArchiveError(f"{what}: safetensors header of {n} bytes; the limit is {limits.max_header_bytes}")
    if 8 + n > len(view):
        raise ArchiveError(f"{what}: safetensors header of {n} bytes runs past the end of the file "
                           f"({len(view)} bytes)")
    raw = bytes(view[8:8 + n])
    if not raw.startswith(b"{"):
        raise ArchiveError(f"{what}: the safetensors header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{what}: unreadable safetensors header: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ArchiveError(f"{what}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArchiveError(f"{what}: safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise ArchiveError(f"{what}: {len(header)} tensors; the limit is {limits.max_tensors}")
    data_len = len(view) - 8 - n
    entries: dict[str, TensorEntry] = {}
    total = 0
    for name, e in header.items():
        where = f"{what}: tensor {_shown(name)}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ArchiveError(f"{where}: needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ArchiveError(f"{where}: unsupported dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and 0 <= d <= limits.max_bytes for d in shape)):
            raise ArchiveError(f"{where}: invalid shape {str(shape)[:100]}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ArchiveError(f"{where}: invalid data_offsets {str(offsets)[:100]}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        total += nbytes
        if nbytes > limits.max_bytes or total > limits.max_bytes:
            raise ArchiveError(f"{where}: {shape} of {dtype} is {nbytes} bytes, {total} with the tensors "
                               f"before it; the limit is {limits.max_bytes} bytes")
        if offsets[1] - offsets[0] != nbytes:
            raise ArchiveError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, its "
                               f"shape {shape} of {dtype} needs {nbytes}")
        if offsets[1] > data_len:
            raise ArchiveError(f"{where}: data_offsets {offsets} run past the {data_len} bytes of data")
        entries[name] = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    # The data section is the tensors, back to back: no overlap, no gap, nothing after.
    at = 0
    for name, t in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != at:
            kind = "overlaps the tensor before it" if t.begin < at else f"leaves a gap at byte {at}"
            raise ArchiveError(f"{what}: tensor {_shown(name)} {kind}")
        at = t.end
    if at != data_len:
        raise ArchiveError(f"{what}: {data_len - at} bytes after the last tensor")
    return entries


def load_safetensors(data: bytes, *, what: str = "safetensors",
                     limits: ArchiveLimits = INTERNAL_LIMITS) -> dict[str, np.ndarray]:
    """A safetensors file -> {name: numpy array}, its header checked by :func:`safetensors_index`
    first; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    safetensors_index(data, what=what, limits=limits)
    try:
        return load(bytes(data))
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:  # e.g. a dtype numpy lacks
        raise ArchiveError(f"{what}: not a loadable safetensors file: {str(exc)[:200]}") from None


# --------------------------------------------------------------------------- record files


def records_to_npz(x: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> bytes:
    """An npz readable by ``np.load``, byte-for-byte the same for the same arrays (no timestamps),
    so that its sha256 identifies its content."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in {"x": x, "y": y, **extra}.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def npz_arrays(data: bytes, *, what: str = "npz", limits: ArchiveLimits = INTERNAL_LIMITS,
               expect: Mapping[str, ArraySpec] | None = None) -> dict[str, np.ndarray]:
    """Load an npz without ever unpickling (object arrays are refused), every member bounded by
    ``limits`` and checked against ``expect`` before it is read (:func:`read_npz`).

    The default limits suit blobs the deployment wrote itself; anything from outside passes its
    own (e.g. ``archives.EDGE_LIMITS``). InvalidArgument names ``what``, the member and the limit.
    """
    try:
        return read_npz(data, what=what, limits=limits, expect=expect)
    except ArchiveError as exc:
        raise InvalidArgument(str(exc), reason="ARCHIVE_INVALID") from exc
