"""The builder registry as a real gRPC server on 127.0.0.1:0 against a real S3-protocol store."""

from __future__ import annotations

import hashlib
import pickle

import grpc
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from ftps.common import grpcutil, serde
from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.builder_registry.__main__ import create_server
from services.builder_registry.config import RegistrySettings

SHAPE = [1, 8, 8]


@pytest.fixture
def stub(storage_kwargs, serve):
    settings = RegistrySettings(**storage_kwargs, max_strategy_kb=4)
    addr = serve(create_server(settings))
    ch = grpcutil.make_channel(addr)
    yield registry_pb2_grpc.BuilderRegistryStub(ch)
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
    assert stub.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5) == t
    assert [x.task_id for x in stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=5).tasks] == [t.task_id]


@pytest.mark.parametrize("field,value,needle", [
    ("n_models", 5, "n_models"), ("n_models", 2, "n_models"), ("alpha", 0.9, "alpha"),
    ("batch_threshold", 1, "batch_threshold"), ("builder_mix", -1, "builder_mix")])
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
            serde.records_to_npz(x, np.arange(20) % 10))
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
                                          serde.records_to_npz(x, np.zeros(20, np.int64))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "builder_data.x" in details
    x = np.full((20, *SHAPE), np.nan, np.float32)
    code, details = _code(lambda: _upload(stub, t.task_id, common_pb2.BLOB_KIND_BUILDER_DATA,
                                          serde.records_to_npz(x, np.zeros(20, np.int64))))
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
    t = _task(registry_pb2_grpc.BuilderRegistryStub(ch))
    ch.close()
    first.stop(0)
    ch = grpcutil.make_channel(serve(create_server(settings)))
    assert registry_pb2_grpc.BuilderRegistryStub(ch).GetTask(
        registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5).task_id == t.task_id
    ch.close()


def test_health_and_reflection_are_served(storage_kwargs, serve):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpcutil.make_channel(serve(create_server(RegistrySettings(**storage_kwargs))))
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="ftps.v1.BuilderRegistry"), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert "ftps.v1.BuilderRegistry" in {s.name for s in resp.list_services_response.service}
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
    code, details = _code(lambda: registry_pb2_grpc.BuilderRegistryStub(ch).CreateTask(
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
