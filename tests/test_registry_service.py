"""The builder registry as a real gRPC server on 127.0.0.1:0 against a real S3-protocol store."""

from __future__ import annotations

import hashlib
import pickle

import grpc
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from ftps.common import archives, grpcutil, serde
from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.builder_registry.__main__ import create_server
from services.builder_registry.config import RegistrySettings

SHAPE = [1, 8, 8]


@pytest.fixture
def stub(storage_kwargs, serve):
    settings = RegistrySettings(**storage_kwargs, max_strategy_kb=4)
    addr = serve(create_server(settings))
    ch = grpcutil.make_channel(addr)
    yield registry_pb2_grpc.BuilderRegistryServiceStub(ch)
    ch.close()


def _task(stub, **settings):
    return stub.CreateTask(registry_pb2.CreateTaskRequest(
        name="digits", settings=common_pb2.TaskSettings(record_shape=SHAPE, **settings)), timeout=10)


def _upload(stub, task_id, kind, data, *, size=None, sha=None, chunk=1000):
    def gen():
        yield registry_pb2.UploadBlobRequest(header=registry_pb2.UploadHeader(
            task_id=task_id, kind=kind, size=len(data) if size is None else size,
            sha256=sha or hashlib.sha256(data).hexdigest()))
        for i in range(0, len(data), chunk):
            yield registry_pb2.UploadBlobRequest(chunk=data[i:i + chunk])
    return stub.UploadBlob(gen(), timeout=10)


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_create_get_list_with_defaults(stub):
    t = _task(stub, n_models=8)
    assert t.task_id.startswith("t-") and not t.ready
    assert t.settings.n_models == 8 and t.settings.batch_threshold == 200  # default filled in
    assert t.settings.method == common_pb2.METHOD_ONLINE_PER_RECORD
    assert t.settings.dp_delta == 1e-5  # the default delta of the records' empirical epsilon
    assert stub.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5) == t
    assert [x.task_id for x in stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=5).tasks] == [t.task_id]


@pytest.mark.parametrize("field,value,needle", [
    ("n_models", 5, "n_models"), ("n_models", 2, "n_models"), ("alpha", 0.9, "alpha"),
    ("batch_threshold", 1, "batch_threshold"), ("builder_mix", -1, "builder_mix"),
    ("dp_delta", 0.5, "dp_delta"), ("dp_delta", -1e-5, "dp_delta"), ("dp_delta", float("nan"), "dp_delta")])
def test_bad_settings_name_the_field(stub, field, value, needle):
    code, details = _code(lambda: _task(stub, **{field: value}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details


def test_unknown_and_path_like_task_ids(stub):
    assert _code(lambda: stub.GetTask(registry_pb2.GetTaskRequest(task_id="t-nope"), timeout=5))[0] \
        == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: stub.GetTask(registry_pb2.GetTaskRequest(task_id="../etc"), timeout=5))[0] \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_uploads_make_a_ready_task_with_versions(stub):
    t = _task(stub)
    weights = save_safetensors({"w": np.ones((2, 2), np.float32)})
    ref = _upload(stub, t.task_id, common_pb2.BLOB_KIND_BASE_MODEL, weights)
    assert ref.version == 1 and ref.sha256 == hashlib.sha256(weights).hexdigest()
    assert _upload(stub, t.task_id, common_pb2.BLOB_KIND_BASE_MODEL, weights).version == 2
    _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, b"def build_model():\n    pass\n")
    x = np.random.default_rng(0).random((20, *SHAPE), dtype=np.float32)
    _upload(stub, t.task_id, common_pb2.BLOB_KIND_BUILDER_DATA,
            archives.records_to_npz(x, np.arange(20) % 10))
    got = stub.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5)
    assert got.ready and got.base_model.version == 2


def test_wrong_sha256_is_rejected_and_nothing_stored(stub):
    t = _task(stub)
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, b"x = 1\n",
                                          sha="0" * 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in details
    assert not stub.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5).strategy.key


def test_truncated_and_oversized_streams(stub):
    t = _task(stub)
    data = b"x = 1\n" * 10
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, data, size=len(data) + 5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ended after" in details
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, data, size=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "larger than its declared size" in details
    big = b"#" * 5000  # limit set to 4 KiB above
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, big))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_pickle_weights_are_rejected_without_loading(stub, tmp_path):
    t = _task(stub)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"w": Evil()})
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_BASE_MODEL, payload))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in details
    assert not marker.exists()


def test_builder_data_is_validated(stub):
    t = _task(stub)
    x = np.zeros((20, 1, 4, 4), np.float32)  # wrong record shape
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_BUILDER_DATA,
                                          archives.records_to_npz(x, np.zeros(20, np.int64))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "builder_data.x" in details
    x = np.full((20, *SHAPE), np.nan, np.float32)
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_BUILDER_DATA,
                                          archives.records_to_npz(x, np.zeros(20, np.int64))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details


def test_strategy_with_syntax_error(stub):
    t = _task(stub)
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, b"def f(:\n"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "line 1" in details


def test_upload_must_start_with_header(stub):
    def gen():
        yield registry_pb2.UploadBlobRequest(chunk=b"abc")
    code, details = _code(lambda: stub.UploadBlob(gen(), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in details


def test_tasks_survive_a_registry_restart(storage_kwargs, serve):
    settings = RegistrySettings(**storage_kwargs)
    first = create_server(settings)
    addr = serve(first)
    ch = grpcutil.make_channel(addr)
    t = _task(registry_pb2_grpc.BuilderRegistryServiceStub(ch))
    ch.close()
    first.stop(0)
    ch = grpcutil.make_channel(serve(create_server(settings)))
    assert registry_pb2_grpc.BuilderRegistryServiceStub(ch).GetTask(
        registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5).task_id == t.task_id
    ch.close()


def test_health_and_reflection_are_served(storage_kwargs, serve):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpcutil.make_channel(serve(create_server(RegistrySettings(**storage_kwargs))))
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="ftps.v1.BuilderRegistryService"), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert "ftps.v1.BuilderRegistryService" in {s.name for s in resp.list_services_response.service}
    ch.close()


def test_list_tasks_is_paged_and_the_client_reads_every_page(stub, storage_kwargs, serve, monkeypatch):
    made = [_task(stub).task_id for _ in range(5)]
    first = stub.ListTasks(registry_pb2.ListTasksRequest(page_size=2), timeout=5)
    assert [t.task_id for t in first.tasks] == made[:2] and first.next_page_token
    second = stub.ListTasks(registry_pb2.ListTasksRequest(page_size=2, page_token=first.next_page_token), timeout=5)
    assert [t.task_id for t in second.tasks] == made[2:4]
    code, details = _code(lambda: stub.ListTasks(registry_pb2.ListTasksRequest(page_token="nope"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details
    code, details = _code(lambda: stub.ListTasks(registry_pb2.ListTasksRequest(page_size=-1), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in details

    from clients.api import BuilderClient
    from ftps.common import paging

    # A second replica on the same database: the client pages through it with the server's page size.
    addr = serve(create_server(RegistrySettings(**storage_kwargs)))
    client = BuilderClient(registry=addr, gateway=addr, scorer=addr)
    try:
        monkeypatch.setattr(paging, "DEFAULT_PAGE_SIZE", 2)
        assert [t.task_id for t in client.list_tasks()] == made
        tasks, token = client.list_tasks_page(page_size=3)
        assert [t.task_id for t in tasks] == made[:3] and token
    finally:
        client.close()


def test_database_down_is_unavailable_and_says_so(storage_kwargs, serve):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = RegistrySettings(**(storage_kwargs | dict(
        database_url=f"postgresql+psycopg://ftps@127.0.0.1:{port}/ftps", db_migrate=False)))
    ch = grpcutil.make_channel(serve(create_server(settings)))
    code, details = _code(lambda: registry_pb2_grpc.BuilderRegistryServiceStub(ch).CreateTask(
        registry_pb2.CreateTaskRequest(name="x", settings=common_pb2.TaskSettings(record_shape=SHAPE)), timeout=20))
    assert code == grpc.StatusCode.UNAVAILABLE and "registry database unavailable" in details
    ch.close()


def test_migrate_only_applies_the_schema(storage_kwargs):
    import sqlalchemy as sa

    from services.builder_registry.__main__ import migrate

    settings = RegistrySettings(**storage_kwargs)
    migrate(settings)
    migrate(settings)  # again: nothing to do
    engine = sa.create_engine(settings.database_url)
    try:
        names = sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert {"registry_tasks", "alembic_version_registry"} <= set(names)


# --- UploadBuilderData: builder data as Records chunks --------------------------------------------

def _records(x, y):
    return common_pb2.Records(x=serde.tensor_from_array(x), y=serde.tensor_from_array(y))


def _upload_records(stub, task_id, chunks, *, header=True, timeout=10):
    def gen():
        if header:
            yield registry_pb2.UploadBuilderDataRequest(header=registry_pb2.UploadBuilderDataHeader(task_id=task_id))
        for x, y in chunks:
            yield registry_pb2.UploadBuilderDataRequest(records=_records(x, y))
    return stub.UploadBuilderData(gen(), timeout=timeout)


def _error(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    from ftps.common.rpc_status import error_details
    return e.value.code(), e.value.details(), error_details(e.value)


def _get(stub, task_id):
    return stub.GetTask(registry_pb2.GetTaskRequest(task_id=task_id), timeout=5)


def test_builder_data_streamed_as_records_is_stored_as_the_npz(stub, store):
    t = _task(stub)
    rng = np.random.default_rng(1)
    x = rng.random((25, *SHAPE), dtype=np.float32)
    y = np.arange(25) % 10
    # v1 through UploadBlob (the npz convenience), v2 through the stream in three chunks; float64
    # x and uint8 y are converted as for contributors' records.
    _upload(stub, t.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(x[:10], y[:10]))
    chunks = [(x[:10].astype(np.float64), y[:10].astype(np.uint8)), (x[10:20], y[10:20]), (x[20:], y[20:])]
    ref = _upload_records(stub, t.task_id, chunks)
    task = _get(stub, t.task_id)
    assert ref.version == 2 and task.builder_data == ref
    stored = store.get_ref(task.builder_data)
    assert stored == archives.records_to_npz(x, y.astype(np.int64))  # the format the workers read
    arrays = archives.npz_arrays(stored)
    np.testing.assert_array_equal(arrays["x"], x)
    np.testing.assert_array_equal(arrays["y"], y)
    assert arrays["x"].dtype == np.float32 and arrays["y"].dtype == np.int64


def test_builder_data_stream_ready_like_an_npz_upload(stub):
    t = _task(stub)
    _upload(stub, t.task_id, common_pb2.BLOB_KIND_BASE_MODEL, save_safetensors({"w": np.ones((2, 2), np.float32)}))
    _upload(stub, t.task_id, common_pb2.BLOB_KIND_STRATEGY, b"def build_model():\n    pass\n")
    assert not _get(stub, t.task_id).ready
    x = np.random.default_rng(0).random((20, *SHAPE), dtype=np.float32)
    assert _upload_records(stub, t.task_id, [(x, np.arange(20) % 10)]).version == 1
    assert _get(stub, t.task_id).ready


def test_builder_data_chunk_with_nan_names_chunk_and_index_and_stores_nothing(stub):
    t = _task(stub)
    x = np.random.default_rng(0).random((30, *SHAPE), dtype=np.float32)
    y = np.arange(30) % 10
    _upload_records(stub, t.task_id, [(x[:10], y[:10])])
    bad = x[10:20].copy()
    bad[3, 0, 2, 5] = np.nan
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [(x[:10], y[:10]), (bad, y[10:20]),
                                                                           (x[20:], y[20:])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("chunk 2: records.x[3, 0, 2, 5] is NaN"), details
    assert info.reason == "RECORDS_NOT_FINITE" and info.metadata.get("chunk") == "2"
    assert _get(stub, t.task_id).builder_data.version == 1  # nothing stored


def test_builder_data_stream_refusals(stub):
    t = _task(stub, num_classes=10, value_range=common_pb2.ValueRange(min=0.0, max=1.0))
    rng = np.random.default_rng(0)
    x = rng.random((20, *SHAPE), dtype=np.float32)
    y = np.arange(20) % 10
    # the wrong record shape
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [
        (x[:10], y[:10]), (np.zeros((10, 1, 4, 4), np.float32), y[:10])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("chunk 2: records.x has shape")
    assert info.reason == "RECORDS_BAD_SHAPE"
    # labels out of range, values out of the task's range, a malformed tensor
    code, details, _ = _error(lambda: _upload_records(stub, t.task_id, [(x, np.full(20, 10))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("chunk 1: records.y[0] = 10")
    code, details, _ = _error(lambda: _upload_records(stub, t.task_id, [(x[:10], y[:10]), (x[10:] + 2, y[10:])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("chunk 2: records.x[0, 0, 0, 0]")
    assert "value range" in details

    def torn():
        yield registry_pb2.UploadBuilderDataRequest(header=registry_pb2.UploadBuilderDataHeader(task_id=t.task_id))
        yield registry_pb2.UploadBuilderDataRequest(records=common_pb2.Records(
            x=common_pb2.Tensor(shape=[20, *SHAPE], dtype=common_pb2.DTYPE_FLOAT32, data=b"\0" * 7),
            y=serde.tensor_from_array(y)))
    code, details, info = _error(lambda: stub.UploadBuilderData(torn(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("chunk 1: records.x.data")
    assert info.reason == "TENSOR_INVALID"
    # the header missing, or repeated; an empty stream; no records; a zero-record chunk; too few records
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [(x, y)], header=False))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in details and info.reason == "UPLOAD_OUT_OF_ORDER"

    def twice():
        hdr = registry_pb2.UploadBuilderDataHeader(task_id=t.task_id)
        yield registry_pb2.UploadBuilderDataRequest(header=hdr)
        yield registry_pb2.UploadBuilderDataRequest(records=_records(x, y))
        yield registry_pb2.UploadBuilderDataRequest(header=hdr)
    code, details, info = _error(lambda: stub.UploadBuilderData(twice(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.reason == "UPLOAD_OUT_OF_ORDER"
    code, details, _ = _error(lambda: stub.UploadBuilderData(iter([]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in details
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.reason == "RECORDS_EMPTY"
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [(x, y), (x[:0], y[:0])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("chunk 2:") and info.reason == "RECORDS_EMPTY"
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [(x[:3], y[:3])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.reason == "BUILDER_DATA_INVALID"
    # more than 10,000 records in one chunk
    many = np.zeros((10_001, *SHAPE), np.float32)
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [(many, np.zeros(10_001, np.int64))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "TOO_MANY_RECORDS"
    assert details.startswith("chunk 1:")
    assert not _get(stub, t.task_id).builder_data.key  # nothing stored by any of them


def test_builder_data_stream_over_the_size_limit(storage_kwargs, serve):
    ch = grpcutil.make_channel(serve(create_server(RegistrySettings(**storage_kwargs, max_builder_data_mb=1))))
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(ch)
    t = _task(stub)
    x = np.zeros((2000, *SHAPE), np.float32)  # 2000 * (256 + 8) bytes per chunk: the 2nd passes 1 MiB
    y = np.zeros(2000, np.int64)
    code, details, info = _error(lambda: _upload_records(stub, t.task_id, [(x, y)] * 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "BLOB_TOO_LARGE"
    assert details.startswith("chunk 2: builder data exceeds the limit"), details
    assert not _get(stub, t.task_id).builder_data.key
    ch.close()


def test_builder_data_stream_is_for_the_task_owner(storage_kwargs, serve):
    from clients.api import BuilderClient
    from ftps.common.auth import TokenSigner

    key = "k" * 32
    addr = serve(create_server(RegistrySettings(**(storage_kwargs | dict(auth_disabled=False, auth_key=key)))))
    signer = TokenSigner(key.encode())
    clients = {name: BuilderClient(registry=addr, gateway=addr, scorer=addr, token=signer.issue(name, role))
               for name, role in (("acme", "builder"), ("globex", "builder"), ("alice", "contributor"),
                                  ("root", "admin"))}
    try:
        t = clients["acme"].create_task("acme", common_pb2.TaskSettings(record_shape=SHAPE))
        x = np.random.default_rng(0).random((30, *SHAPE), dtype=np.float32)
        y = np.arange(30) % 10
        for who in ("globex", "alice"):
            code, _, _ = _error(lambda c=clients[who]: c.upload_builder_records(t.task_id, x, y))
            assert code == grpc.StatusCode.PERMISSION_DENIED, who
        assert not clients["acme"].get_task(t.task_id).builder_data.key
        # the owner (the client's chunking: at most chunk_records a message) and an admin may
        assert clients["acme"].upload_builder_records(t.task_id, x, y, chunk_records=7).version == 1
        assert clients["root"].upload_builder_records(t.task_id, x, y).version == 2
    finally:
        for c in clients.values():
            c.close()


def test_cli_uploads_data_as_records_by_default_or_as_the_npz(storage_kwargs, serve, tmp_path, capsys):
    import json

    from clients.builder.cli import main as builder_main

    addr = serve(create_server(RegistrySettings(**storage_kwargs)))
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(addr))
    t = _task(stub)
    x = np.random.default_rng(0).random((30, *SHAPE), dtype=np.float32)
    (tmp_path / "d.npz").write_bytes(archives.records_to_npz(x, np.arange(30) % 10))
    b = ["--registry", addr, "--gateway", addr, "--scorer", addr, "upload", "--task", t.task_id, "--kind", "data",
         str(tmp_path / "d.npz"), "--json"]
    shas = []
    for extra, version in (([], 1), (["--npz-blob"], 2)):
        capsys.readouterr()
        assert builder_main(b + extra) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        assert out["version"] == version
        shas.append(out["sha256"])
    task = _get(stub, t.task_id)
    # Both paths store the same bytes for the same records (one content-named object).
    assert task.builder_data.version == 2 and task.builder_data.sha256 == shas[0] == shas[1]
    (tmp_path / "bad.npz").write_bytes(archives.records_to_npz(np.zeros((30, 1, 4, 4), np.float32), np.zeros(30, int)))
    assert builder_main(b[:-2] + [str(tmp_path / "bad.npz")]) == 1
    assert "chunk 1: records.x has shape" in capsys.readouterr().err
