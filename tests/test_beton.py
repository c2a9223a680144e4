"""Builder data as FFCV .beton files: the format (ftps.records.beton: header, pointer checks, read and
write, raw and JPEG), the one reader of stored builder data (ftps.records.builder), the registry's
check of an upload (numpy first, then one decode in a child: a hostile file is BUILDER_DATA_INVALID
and the registry stays up; no ffcv is FAILED_PRECONDITION), and a task whose builder data is a
.beton running its preparation stage and a round that mixes builder records, end to end.

Needs ffcv (scripts/bootstrap.sh installs it where it builds). Without it these tests skip on a
developer's machine; under CI they fail, unless the bootstrap tried and recorded why in
$VENV/ffcv-unavailable (as tests/node_packages.py does for the Node.js client)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from ftps.common import archives, grpcutil
from ftps.common.rpc_status import error_details
from ftps.records import RecordsError, beton
from ftps.records.builder import builder_data
from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc, scorer_pb2

UNAVAILABLE_MARKER = Path(sys.prefix) / "ffcv-unavailable"
SHAPE = (1, 8, 8)
UPLOAD_TIMEOUT_S = 180  # the child imports torch and ffcv and compiles FFCV's loader first


def _require_ffcv() -> None:
    why = beton.available()
    if why is None:
        return
    if UNAVAILABLE_MARKER.exists():
        pytest.skip(f"{why}; bootstrap: {UNAVAILABLE_MARKER.read_text().strip()}")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why + " (CI is set and the bootstrap did not record a failed ffcv install)")
    pytest.skip(why)


@pytest.fixture(autouse=True)
def ffcv():
    _require_ffcv()


def _records(n: int, shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape), dtype=np.float32), (np.arange(n) % 10).astype(np.int64)


def _beton(tmp_path: Path, x, y, name="d.beton", **kw) -> bytes:
    beton.write(tmp_path / name, x, y, **kw)
    return (tmp_path / name).read_bytes()


def _alloc(data: bytes) -> tuple[int, np.ndarray]:
    at = int(np.frombuffer(data, dtype=beton._HEADER, count=1)[0]["alloc_table_ptr"])
    return at, np.frombuffer(data, dtype=beton._ALLOC, offset=at).copy()


# -- the format -----------------------------------------------------------------------------------

def test_raw_round_trip_through_bytes_and_path(tmp_path):
    x, y = _records(40)
    data = _beton(tmp_path, x, y)
    assert beton.is_beton(data) and not beton.is_beton(archives.records_to_npz(x, y))
    head = beton.header(data)
    assert head.num_samples == 40
    assert [(f.name, f.kind) for f in head.fields] == [("x", "NDArrayField"), ("y", "IntField")]
    for source in (data, tmp_path / "d.beton"):
        gx, gy = beton.read(source)
        np.testing.assert_array_equal(gx, x)
        np.testing.assert_array_equal(gy, y)
        assert gx.dtype == np.float32 and gy.dtype == np.int64
    # The one reader of stored builder data: npz (the default) and .beton, the same records.
    for blob in (data, archives.records_to_npz(x.astype(np.float64), y.astype(np.uint8))):
        got = builder_data(blob)
        bx, by = got.x, got.y
        np.testing.assert_array_equal(bx, x)
        np.testing.assert_array_equal(by, y)
        assert bx.dtype == np.float32 and by.dtype == np.int64


def test_jpeg_round_trip_within_the_jpeg_error(tmp_path):
    # Smooth images: JPEG keeps them within a few grey levels at quality 95.
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    x = np.stack([np.stack([xx * (i % 3 + 1) / 3, yy, (xx + yy) / 2]) for i in range(12)]).astype(np.float32)
    y = np.arange(12) % 10
    data = _beton(tmp_path, x, y, jpeg_quality=95)
    assert [f.kind for f in beton.header(data).fields] == ["RGBImageField", "IntField"]
    gx, gy = beton.read(data, verify_jpeg=True)
    assert gx.shape == (12, 3, 16, 16) and gx.dtype == np.float32
    assert 0.0 <= gx.min() and gx.max() <= 1.0
    assert np.abs(gx - x).mean() < 0.02 and np.abs(gx - x).max() < 0.15
    np.testing.assert_array_equal(gy, y)


def test_truncated_and_wrong_files_are_records_errors(tmp_path):
    x, y = _records(16)
    data = _beton(tmp_path, x, y)
    with pytest.raises(RecordsError, match="too short"):
        beton.header(data[:10])
    with pytest.raises(RecordsError, match="allocation table"):
        beton.read(data[:len(data) - 100])  # the table cut off
    with pytest.raises(RecordsError, match="declares 2 fields"):
        beton.header(data[:100])
    # Fields named otherwise: the reader says which fields it needs and which it found.
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    class Rows:
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], int(y[i])

    DatasetWriter(str(tmp_path / "w.beton"), {"pixels": NDArrayField(shape=SHAPE, dtype=np.dtype("float32")),
                                              "y": IntField()}, num_workers=1).from_indexed_dataset(Rows())
    with pytest.raises(RecordsError, match="needs a record field named x or image.*'pixels' \\(NDArrayField\\)"):
        beton.read(tmp_path / "w.beton")
    with pytest.raises(RecordsError, match="neither a valid npz nor an FFCV .beton"):
        builder_data(b"PK\x03\x04 not really a zip")


def test_pointers_outside_the_pages_are_refused_before_any_decoder(tmp_path):
    x, y = _records(16)
    data = _beton(tmp_path, x, y)
    at, table = _alloc(data)
    table["ptr"] += 1 << 40
    with pytest.raises(RecordsError, match="allocation 0 .* lies outside the data pages"):
        beton.check_pages(data[:at] + table.tobytes())
    # A sample's data pointer that starts no allocation (FFCV would read another's size).
    meta_start = beton._HEADER.itemsize + 2 * beton._FIELD.itemsize
    bad = bytearray(data)
    bad[meta_start:meta_start + 8] = (int(table["ptr"][0] - (1 << 40)) + 3).to_bytes(8, "little")
    with pytest.raises(RecordsError, match="field 'x' sample 0 points at byte .* does not start an allocation"):
        beton.check_pages(bytes(bad))


# -- the registry's check of an upload ------------------------------------------------------------

@pytest.fixture
def registry(storage_kwargs, serve):
    from services.builder_registry.__main__ import create_server
    from services.builder_registry.config import RegistrySettings

    ch = grpcutil.make_channel(serve(create_server(RegistrySettings(**storage_kwargs))))
    yield registry_pb2_grpc.BuilderRegistryServiceStub(ch)
    ch.close()


def _task(stub, shape=SHAPE):
    return stub.CreateTask(registry_pb2.CreateTaskRequest(
        name="beton", settings=common_pb2.TaskSettings(record_shape=list(shape))), timeout=10)


def _upload(stub, task_id, data):
    def gen():
        yield registry_pb2.UploadBlobRequest(header=registry_pb2.UploadHeader(
            task_id=task_id, kind=common_pb2.BLOB_KIND_BUILDER_DATA, size=len(data),
            sha256=hashlib.sha256(data).hexdigest()))
        for i in range(0, len(data), 1 << 20):
            yield registry_pb2.UploadBlobRequest(chunk=data[i:i + (1 << 20)])
    return stub.UploadBlob(gen(), timeout=UPLOAD_TIMEOUT_S)


def _refused(fn) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), error_details(e.value).reason, e.value.details()


def test_registry_refuses_hostile_betons_and_stays_up(registry, store, tmp_path):
    t = _task(registry, shape=(3, 16, 16))
    rng = np.random.default_rng(1)
    x, y = rng.random((12, 3, 16, 16), dtype=np.float32), np.arange(12) % 10
    good = _beton(tmp_path, x, y, jpeg_quality=90)
    at, table = _alloc(good)
    # Garbage JPEG pages behind intact frame headers: they pass the numpy checks, libjpeg-turbo fails
    # on them in the child (FFCV's loader would hand back whatever the buffer held).
    garbage = bytearray(good)
    for row in table:
        start, n = int(row["ptr"]), int(row["size"])
        garbage[start + n // 2:start + n] = rng.integers(0, 256, n - n // 2, dtype=np.uint8).tobytes()
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, bytes(garbage)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BUILDER_DATA_INVALID")
    assert "sample 0: its JPEG page does not decode" in details and "\n" not in details
    # Allocation pointers rewritten past the end: refused before any decoder sees them.
    table["ptr"] += 1 << 40
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, good[:at] + table.tobytes()))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BUILDER_DATA_INVALID")
    assert "lies outside the data pages" in details
    # A JPEG page larger than its metadata says (libjpeg-turbo would write past the buffer).
    big = _beton(tmp_path, rng.random((12, 3, 32, 32), dtype=np.float32), y, name="big.beton", jpeg_quality=90)
    from ffcv.reader import Reader

    meta = Reader(str(tmp_path / "big.beton")).metadata.copy()
    meta["f0"]["width"], meta["f0"]["height"] = 16, 16
    lie = bytearray(big)
    start = beton._HEADER.itemsize + 2 * beton._FIELD.itemsize
    lie[start:start + meta.nbytes] = meta.tobytes()
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, bytes(lie)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BUILDER_DATA_INVALID")
    assert "its JPEG page declares 32x32 pixels, its metadata 16x16" in details
    assert not registry.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5).builder_data.key

    # Still up: the intact file is stored as uploaded, named as a .beton.
    ref = _upload(registry, t.task_id, good)
    assert ref.version == 1 and ref.sha256 == hashlib.sha256(good).hexdigest()
    assert ref.key.endswith("/builder-data.beton") and store.get_ref(ref) == good


def test_registry_checks_a_beton_like_an_npz(registry, tmp_path):
    t = _task(registry)
    x, y = _records(12)
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, _beton(tmp_path, x[:5], y[:5])))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BUILDER_DATA_INVALID")
    assert "holds 5 records; 8 to 100000 are accepted" in details
    # Decoded, then the task's checks: the record shape, then the values.
    wrong = _records(12, shape=(1, 4, 4))
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, _beton(tmp_path, *wrong, name="w.beton")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "builder_data.x has shape [12, 1, 4, 4]" in details
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, _beton(tmp_path, nan, y, name="n.beton")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details


def test_a_registry_without_ffcv_refuses_a_beton_and_stores_nothing(registry, tmp_path, monkeypatch):
    data = _beton(tmp_path, *_records(12))
    t = _task(registry)
    # The decoding child imports this broken ffcv first (it inherits the environment).
    shadow = tmp_path / "shadow" / "ffcv"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libturbojpeg.so.0: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    code, reason, details = _refused(lambda: _upload(registry, t.task_id, data))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert details.startswith("this registry cannot read FFCV .beton files: ffcv is not installed here "
                              "(ImportError: libturbojpeg.so.0")
    assert not registry.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5).builder_data.key


# -- end to end ------------------------------------------------------------------------------------

def test_a_beton_task_prepares_and_runs_a_builder_mixed_round(module_stack, tmp_path, capsys, digits_splits,
                                                              digits_strategy, digits_base_weights):
    """Builder data uploaded as a .beton by `ftps-builder upload`: the preparation stage's shadow
    models train on its pool (the scorer reads it), then a round whose models mix builder records
    (the worker reads it) ends DONE with a score per record."""
    from clients.api import ContributorClient
    from clients.builder.cli import main as builder_main
    from tests.conftest import digits_records
    from tests.stacks import builder, submit_and_finish_round

    signer = module_stack["signer"]
    b = builder(module_stack, signer.issue("acme", "builder"))
    try:
        m = 12
        task = b.create_task("beton", common_pb2.TaskSettings(
            record_shape=list(SHAPE), n_models=4, batch_threshold=m, shadow_models=2, models_per_job=2,
            method=common_pb2.METHOD_OFFLINE_GLOBAL, builder_mix=6, seed=5))
        b.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
        b.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
        bx, by = digits_splits["builder"]
        beton.write(tmp_path / "builder.beton", bx[:80], by[:80])
        argv = ["--registry", module_stack["registry"], "--gateway", module_stack["gateway"],
                "--scorer", module_stack["scorer"], "--token", signer.issue("acme", "builder"),
                "upload", "--task", task.task_id, "--kind", "data", str(tmp_path / "builder.beton")]
        capsys.readouterr()
        assert builder_main(argv + ["--json"]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        assert out["version"] == 1 and out["size"] == (tmp_path / "builder.beton").stat().st_size

        prep = b.prepare(task.task_id)
        assert prep.state == scorer_pb2.PREPARATION_STATE_READY, prep.message
        assert prep.gaussian.k == 2 and prep.gaussian.sigma > 0 and np.isfinite(prep.gaussian.mu)

        alice = ContributorClient(gateway=module_stack["gateway"], contributor="alice",
                                  token=signer.issue("alice", "contributor"))
        try:
            round_id = submit_and_finish_round(b, alice, task.task_id, *digits_records(digits_splits, m, seed=7))
            scores = b.scores(task.task_id, round_id=round_id).scores
            assert len(scores) == m and all(np.isfinite(s.score) for s in scores)
        finally:
            alice.close()
    finally:
        b.close()


def test_a_tabular_task_refuses_a_beton(tmp_path):
    from ftps.common.errors import InvalidArgument
    from services.builder_registry.registry import _validate_blob, with_defaults

    settings = with_defaults(common_pb2.TaskSettings(num_classes=2, schema=common_pb2.TabularSchema(features=[
        common_pb2.Feature(name="age", kind=common_pb2.FEATURE_KIND_NUMERIC, mean=40, std=10)])))
    data = _beton(tmp_path, *_records(12, shape=(1,)))
    with pytest.raises(InvalidArgument, match="tabular task.*an FFCV .beton holds image or array records") as e:
        _validate_blob(common_pb2.BLOB_KIND_BUILDER_DATA, data, settings)
    assert e.value.reason == "BUILDER_DATA_INVALID"
