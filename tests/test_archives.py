"""The bounded archive readers (ftps/common/archives.py) without gRPC: good files read back as
numpy/safetensors read them; bombs, lying headers and malformed files are refused with a message
naming the file, the member and the limit, before anything of the declared size is allocated.

The crafted-file builders here are shared with tests/hardening/test_bombs.py."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ftps.common import archives
from ftps.common.archives import ArchiveError, ArchiveLimits, ArraySpec
from ftps.common.errors import InvalidArgument

MiB = 1024 * 1024
GiB = 1024 * MiB


# -- crafting archives by hand (sizes, counts and headers that lie) -------------------------------

def npy_header(shape: tuple[int, ...], descr: str = "<f4", *, version: int = 1) -> bytes:
    """The bytes numpy writes before an array's data."""
    buf = io.BytesIO()
    d = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    (np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0)(buf, d)
    return buf.getvalue()


def deflate_zeros(prefix: bytes, n_zeros: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``prefix`` + ``n_zeros`` zero bytes -> (stream, crc32), built in a
    blink: after a full flush the compressor starts afresh, so every 1 MiB of zeros compresses to
    the same ~1 KB, written once and repeated (1 GiB -> ~1 MB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(n_zeros, MiB)
    seg = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH) if whole else b""
    tail = c.compress(bytes(rest)) + c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(whole):
        crc = zlib.crc32(bytes(MiB), crc)
    crc = zlib.crc32(bytes(rest), crc)
    return head + seg * whole + tail, crc


@dataclass
class Member:
    name: str
    raw: bytes  # as stored in the zip (compressed for deflate)
    size: int  # the uncompressed size the zip headers declare
    crc: int
    method: int = zipfile.ZIP_DEFLATED
    flags: int = 0


def member(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> Member:
    """An honest member."""
    if method == zipfile.ZIP_STORED:
        return Member(name, data, len(data), zlib.crc32(data), method)
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return Member(name, c.compress(data) + c.flush(), len(data), zlib.crc32(data), method)


def zip_of(members: list[Member], *, declared_count: int | None = None) -> bytes:
    """A zip written field by field, so that any field can lie (no zip64: members < 4 GiB)."""
    out, central = io.BytesIO(), io.BytesIO()
    for m in members:
        name = m.name.encode()
        offset = out.tell()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, m.flags, m.method, 0, 0x21, m.crc,
                              len(m.raw), m.size, len(name), 0) + name + m.raw)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, m.flags, m.method, 0, 0x21, m.crc,
                                  len(m.raw), m.size, len(name), 0, 0, 0, 0, 0, offset) + name)
    count = len(members) if declared_count is None else declared_count
    cd = central.getvalue()
    return out.getvalue() + cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                                             min(count, 0xFFFF), len(cd), out.tell(), 0)


def deflate_bomb(records: int, record_shape: tuple[int, ...] = (1, 4, 4)) -> bytes:
    """Builder data of ``records`` zero records (float32) with honest headers: ~1 KB per MiB."""
    xh = npy_header((records, *record_shape))
    x_zeros = records * 4 * int(np.prod(record_shape))
    x_raw, x_crc = deflate_zeros(xh, x_zeros)
    yh = npy_header((records,), "<i8")
    y_raw, y_crc = deflate_zeros(yh, records * 8)
    return zip_of([Member("x.npy", x_raw, len(xh) + x_zeros, x_crc),
                   Member("y.npy", y_raw, len(yh) + records * 8, y_crc)])


def many_members(n: int) -> bytes:
    a = npy_header((0,))
    return zip_of([member(f"a{i}.npy", a, zipfile.ZIP_STORED) for i in range(n)])


def safetensors_raw(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


# -- npz: what reads back -------------------------------------------------------------------------

def _savez(compressed: bool, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reads_back_what_numpy_wrote(compressed):
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.random((5, 1, 4, 4), dtype=np.float32), y=np.arange(5), big=np.arange(6, dtype=">f8"),
                  f=np.asfortranarray(np.arange(12.0).reshape(3, 4)), s=np.array(["a", "bc"]),
                  scalar=np.array(3.5), empty=np.zeros((0, 7), np.uint8), mask=np.array([True, False]))
    back = archives.read_npz(_savez(compressed, **arrays))
    assert set(back) == set(arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(back[k], a)
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
    assert back["x"].flags.writeable


def test_records_npz_reads_back_and_matches_the_spec():
    x, y = np.ones((3, 1, 2, 2), np.float32), np.array([0, 1, 2])
    back = archives.npz_arrays(archives.records_to_npz(x, y), what="r", limits=archives.EDGE_LIMITS,
                            expect=archives.records_spec([1, 2, 2]))
    np.testing.assert_array_equal(back["x"], x)
    np.testing.assert_array_equal(back["y"], y)


def test_object_arrays_are_refused_unread():
    data = _savez(False, x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ArchiveError, match=r"^npz: member x.npy holds an object array \(pickle\), refused$"):
        archives.read_npz(data)
    with pytest.raises(InvalidArgument, match="pickle"):
        archives.npz_arrays(data)


@pytest.mark.parametrize("arrays,spec,message", [
    (dict(x=np.zeros((2, 1, 3, 3), np.float32), y=np.zeros(2, np.int64)), archives.records_spec([1, 2, 2]),
     "d.x has shape [2, 1, 3, 3], expected [m, 1, 2, 2]"),
    (dict(x=np.zeros((2, 1, 2, 2), np.float32), y=np.zeros(3, np.int64)), archives.records_spec([1, 2, 2]),
     "d.y has shape [3], expected [m] with m = 2 as in x"),
    (dict(x=np.zeros((2, 1, 2, 2), np.int64), y=np.zeros(2, np.int64)), archives.records_spec([1, 2, 2]),
     "d.x has dtype int64; expected float"),
    (dict(x=np.zeros((2, 1, 2, 2), np.float32)), archives.records_spec([1, 2, 2]),
     "d must hold arrays x, y; y missing (found x)"),
    (dict(x=np.zeros((2,), np.float32)), {"x": ArraySpec(("m", None, ...))},
     "d.x has shape [2], expected [m, *, ...]"),
])
def test_expected_shapes_and_dtypes_are_checked_on_the_headers(arrays, spec, message):
    with pytest.raises(ArchiveError) as e:
        archives.read_npz(_savez(True, **arrays), what="d", expect=spec)
    assert str(e.value) == message


def test_open_ended_and_optional_specs():
    spec = {"x": ArraySpec(("m", None, ...), "f"), "y": ArraySpec(("m",), "iu"),
            "record_id": ArraySpec(("m",), "U", required=False)}
    back = archives.read_npz(_savez(False, x=np.zeros((2, 3, 4, 5)), y=np.zeros(2, np.int8)), expect=spec)
    assert back["x"].shape == (2, 3, 4, 5)


# -- npz: bombs and lies --------------------------------------------------------------------------

def _peak_allocated(fn) -> int:
    """Peak bytes Python and numpy allocated while ``fn`` ran (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def _refused(data: bytes, limits: ArchiveLimits = archives.EDGE_LIMITS, **kw) -> str:
    def read():
        with pytest.raises(ArchiveError) as e:
            archives.read_npz(data, what="builder_data", limits=limits, **kw)
        read.message = str(e.value)
    peak = _peak_allocated(read)
    assert peak < 4 * MiB, f"{peak} bytes allocated to refuse it"
    return read.message


def test_deflate_bomb_is_refused_on_its_headers():
    bomb = deflate_bomb(2**24)  # 1 GiB of float32 records + 128 MiB of labels
    assert len(bomb) < 1.3 * MiB
    assert _refused(bomb) == ("builder_data: member x.npy expands to 1073741952 bytes (its zip header says); "
                              "the limit is 536870912 bytes")


def test_bomb_whose_zip_header_understates_is_refused_on_its_npy_header():
    xh = npy_header((2**24, 1, 4, 4))
    raw, crc = deflate_zeros(xh, 2**30)
    bomb = zip_of([Member("x.npy", raw, 200, crc)])  # declares 200 bytes
    assert _refused(bomb) == "builder_data: member x.npy expands to 1073741952 bytes; the limit is 536870912 bytes"


def test_bomb_whose_headers_all_understate_is_refused_one_byte_past_them():
    xh = npy_header((1, 1, 4, 4))  # both headers: 128 + 64 bytes
    raw, crc = deflate_zeros(xh, 2**30)
    bomb = zip_of([Member("x.npy", raw, len(xh) + 64, crc)])
    assert _refused(bomb) == "builder_data: member x.npy expands past the 192 bytes its headers declare"


def test_stream_shorter_than_declared_is_refused():
    xh = npy_header((4, 1, 4, 4))
    raw, crc = deflate_zeros(xh, 64)  # one record of the four
    data = zip_of([Member("x.npy", raw, len(xh) + 256, crc)])
    assert _refused(data) == "builder_data: member x.npy: data ends after 64 of 256 bytes"


def test_huge_npy_shape_is_refused_before_allocation():
    xh = npy_header((2**40, 1, 4, 4))
    data = zip_of([member("x.npy", xh + bytes(64), zipfile.ZIP_STORED)])
    assert _refused(data) == ("builder_data: member x.npy expands to 70368744177792 bytes; the limit is "
                              "536870912 bytes")
    with pytest.raises(ArchiveError, match="expands to 70368744177792 bytes"):
        archives.read_npy(xh + bytes(64), what="m.npy")


def test_npy_header_length_is_checked_before_the_header_is_read():
    fake = b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{"
    data = zip_of([member("x.npy", fake, zipfile.ZIP_STORED)])
    assert _refused(data) == "builder_data: member x.npy: .npy header of 2147483648 bytes; the limit is 10000"


def test_thousands_of_members_are_refused_before_the_directory_is_parsed():
    assert _refused(many_members(5000)) == "builder_data has 5000 members; the limit is 64"
    # An end record that understates the count: the directory's size still gives it away.
    lying = zip_of([member(f"a{i}.npy", npy_header((0,)), zipfile.ZIP_STORED) for i in range(5000)],
                   declared_count=2)
    assert _refused(lying).startswith("builder_data: its zip directory is ")


def test_members_together_are_bounded():
    data = _savez(True, a=np.zeros(600_000), b=np.zeros(600_000))  # 4.8 MB each, expanded
    limits = ArchiveLimits(max_bytes=8 * MiB)
    msg = _refused(data, limits)
    assert msg.startswith(f"builder_data: its members expand to more than {8 * MiB} bytes together (the limit)")
    assert len(archives.read_npz(data, limits=ArchiveLimits(max_bytes=10 * MiB))) == 2
    with pytest.raises(ArchiveError, match=r"member a.npy expands to 4800128 bytes .*the limit is 1048576 bytes"):
        archives.read_npz(data, limits=ArchiveLimits(max_bytes=10 * MiB, max_member_bytes=MiB))


@pytest.mark.parametrize("members,message", [
    ([member("x.txt", b"hello")], "builder_data: member x.txt is not an .npy array name"),
    ([member("x.npy", npy_header((0,))), member("x.npy", npy_header((0,)))],
     "builder_data: member x.npy appears twice"),
    ([Member("x.npy", b"", 0, 0, flags=1)], "builder_data: member x.npy is encrypted"),
    ([Member("x.npy", b"", 0, 0, method=zipfile.ZIP_BZIP2)],
     "builder_data: member x.npy uses zip compression method 12; only stored and deflate are read"),
    ([Member("x.npy", b"abc", 10, 0, method=zipfile.ZIP_STORED)],
     "builder_data: member x.npy is stored, yet its zip header gives 3 compressed and 10 uncompressed bytes"),
    ([member("x.npy", b"not an array")], "builder_data: member x.npy is not an .npy array"),
])
def test_malformed_members(members, message):
    assert _refused(zip_of(members)) == message


def test_odd_names_are_quoted_and_empty_arrays_declare_no_huge_dimensions():
    assert _refused(zip_of([member("evil\n.txt", b"")])) == r"builder_data: member 'evil\n.txt' is not an .npy array name"
    empty = zip_of([member("x.npy", npy_header((0, 2**62)), zipfile.ZIP_STORED)])
    assert _refused(empty) == ("builder_data: member x.npy has shape [0, 4611686018427387904]: a dimension above "
                               "the limit of 536870912")


def test_npy_files_are_bounded_too():
    buf = io.BytesIO()
    np.save(buf, np.eye(3, dtype=bool))
    data = buf.getvalue()
    np.testing.assert_array_equal(archives.read_npy(data, spec=ArraySpec((3, None), "b")), np.eye(3, dtype=bool))
    with pytest.raises(ArchiveError, match=r"^m.npy has shape \[3, 3\], expected \[4, \*\]$"):
        archives.read_npy(data, what="m.npy", spec=ArraySpec((4, None), "b"))
    with pytest.raises(ArchiveError, match=rf"^m.npy: its header describes {len(data)} bytes, the file has "
                                           rf"{len(data) - 1}$"):
        archives.read_npy(data[:-1], what="m.npy")
    with pytest.raises(ArchiveError, match="^m.npy expands to 8796093022336 bytes; the limit is 1048576 bytes$"):
        archives.read_npy(npy_header((2**40,), "<f8"), what="m.npy", limits=ArchiveLimits(max_bytes=MiB))


def test_crc_mismatch_is_refused():
    m = member("x.npy", npy_header((4,)) + bytes(16))
    m.crc ^= 1
    assert _refused(zip_of([m])) == "builder_data: member x.npy: CRC mismatch (corrupt archive)"


def test_not_a_zip():
    with pytest.raises(InvalidArgument, match="npz is not a readable npz file"):
        archives.npz_arrays(b"definitely not a zip file")


@given(st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_npz_is_read_or_refused_never_crashes(data):
    good = bytearray(archives.records_to_npz(np.zeros((3, 1, 2, 2), np.float32), np.arange(3)))
    if data.draw(st.booleans()):
        good = bytearray(_savez(True, x=np.zeros((3, 1, 2, 2), np.float32), y=np.arange(3)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    try:
        out = archives.read_npz(bytes(good), limits=ArchiveLimits(max_bytes=MiB))
    except ArchiveError:
        return
    assert sum(a.nbytes for a in out.values()) <= MiB


# -- the readers the services and clients use -----------------------------------------------------

def test_worker_records_and_client_files_are_bounded():
    from ftps.common.errors import InvalidArgument
    from ftps.records import RecordsError
    from ftps.records.npz import load as load_records
    from ftps.records.npz import parse_upload

    bomb = deflate_bomb(2**24)
    with pytest.raises(InvalidArgument) as e:
        parse_upload(bomb, "mine.npz")
    assert str(e.value) == "mine.npz: member x.npy expands to 1073741952 bytes (its zip header says); " \
                           "the limit is 536870912 bytes"
    # The worker's records are blobs the services wrote: generous limits (8 GiB), still bounded.
    xh = npy_header((2**28, 1, 4, 4))  # 16 GiB, in a zip that declares 200 bytes
    raw, crc = deflate_zeros(xh, 64)
    with pytest.raises(RecordsError) as e:
        load_records(zip_of([Member("x.npy", raw, 200, crc)]))
    assert str(e.value) == ("records are not a valid npz file: records: member x.npy expands to 17179869312 bytes; "
                            "the limit is 8589934592 bytes")


def test_worker_reads_the_childs_phi_against_the_expected_shape(tmp_path):
    """phi.npy is written by the sandboxed child, next to the builder's strategy: its header is
    checked before anything is allocated (np.load would try 128 GiB here)."""
    from services.finetune_worker.sandbox import SandboxError, _read_phi

    path = tmp_path / "phi.npy"
    path.write_bytes(npy_header((2**24, 2**10), "<f8") + bytes(64))
    with pytest.raises(SandboxError, match=r"phi.npy has shape \[16777216, 1024\], expected \[4, 8\]"):
        _read_phi(path, 4, 8)
    np.save(path, np.zeros((4, 8)))
    assert _read_phi(path, 4, 8).shape == (4, 8)


# -- safetensors ----------------------------------------------------------------------------------

def test_safetensors_index_matches_the_file_and_loads():
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int64),
               "s": np.array(1.5, np.float64)}
    data = st_save(tensors, metadata={"format": "np"})
    index = archives.safetensors_index(data)
    assert index["w"].shape == (2, 3) and index["w"].end - index["w"].begin == 24
    loaded = archives.load_safetensors(data)
    for k, t in st_load(data).items():
        np.testing.assert_array_equal(loaded[k], t)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("data,message", [
    (b"\x01\x02", "w: not a safetensors file (2 bytes)"),
    (safetensors_raw({"w": _entry()}, bytes(8), length=2**60),
     "w: safetensors header of 1152921504606846976 bytes; the limit is 2097152"),
    (safetensors_raw({"w": _entry()}, bytes(8), length=100_000),
     "w: safetensors header of 100000 bytes runs past the end of the file (77 bytes)"),
    (safetensors_raw({"w": _entry(offsets=(0, 8))}, bytes(4)),
     "w: tensor w: data_offsets [0, 8] run past the 4 bytes of data"),
    (safetensors_raw({"w": _entry(shape=(2**20, 2**20), offsets=(0, 4 * 2**40))}, bytes(8)),
     "w: tensor w: [1048576, 1048576] of F32 is 4398046511104 bytes, 4398046511104 with the tensors before "
     "it; the limit is 536870912 bytes"),
    (safetensors_raw({"w": _entry(shape=(3,))}, bytes(8)),
     "w: tensor w: data_offsets [0, 8] span 8 bytes, its shape [3] of F32 needs 12"),
    (safetensors_raw({"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12)),
     "w: tensor b overlaps the tensor before it"),
    (safetensors_raw({"a": _entry(), "b": _entry(offsets=(12, 20))}, bytes(20)),
     "w: tensor b leaves a gap at byte 8"),
    (safetensors_raw({"a": _entry()}, bytes(12)), "w: 4 bytes after the last tensor"),
    (safetensors_raw({"a": _entry(dtype="OBJ")}, bytes(8)), "w: tensor a: unsupported dtype 'OBJ'"),
    (safetensors_raw({"a": _entry(shape=(-2,))}, bytes(8)), "w: tensor a: invalid shape [-2]"),
    (safetensors_raw({"a": _entry(offsets=(8, 0))}, bytes(8)), "w: tensor a: invalid data_offsets [8, 0]"),
    (safetensors_raw({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
     "w: tensor a: needs exactly dtype, shape and data_offsets"),
    (safetensors_raw(b'{"a": {}, "a": {}}'), "w: unreadable safetensors header: duplicate key 'a'"),
    (safetensors_raw(b"[" * 100_000 + b"]" * 100_000), "w: the safetensors header is not a JSON object"),
    (safetensors_raw(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     "w: unreadable safetensors header: maximum recursion depth exceeded while decoding a JSON array from a "
     "unicode string"),
    (safetensors_raw({"__metadata__": {"a": 1}}), "w: safetensors __metadata__ must map strings to strings"),
])
def test_safetensors_bombs_and_lies_are_refused_before_loading(data, message):
    def check():
        with pytest.raises(ArchiveError) as e:
            archives.load_safetensors(data, what="w", limits=archives.EDGE_LIMITS)
        check.message = str(e.value)
    assert _peak_allocated(check) < 8 * MiB
    assert check.message == message


def test_safetensors_tensor_count_is_bounded():
    header = {f"t{i}": _entry(shape=(0,), offsets=(0, 0)) for i in range(20)}
    with pytest.raises(ArchiveError, match="w: 20 tensors; the limit is 10"):
        archives.safetensors_index(safetensors_raw(header), what="w", limits=ArchiveLimits(max_tensors=10))
    assert len(archives.safetensors_index(safetensors_raw(header))) == 20
