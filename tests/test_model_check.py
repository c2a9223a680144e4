"""The upload check: a base model is checked against its strategy in a real worker's sandbox (the
registry runs no uploaded code), so a mismatch fails at upload instead of at round time."""

from __future__ import annotations

import re
import uuid

import grpc
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from clients.api import BuilderClient
from ftps.common import archives, grpcutil
from ftps.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.finetune_worker.__main__ import create_server as worker_server
from services.finetune_worker.config import WorkerSettings

BASE, STRATEGY, DATA = (common_pb2.BLOB_KIND_BASE_MODEL, common_pb2.BLOB_KIND_STRATEGY,
                        common_pb2.BLOB_KIND_BUILDER_DATA)


BUCKET = "mc-" + uuid.uuid4().hex[:12]


def _storage(s3_endpoint: str) -> dict:
    return dict(s3_endpoint=s3_endpoint, s3_bucket=BUCKET, s3_access_key="test", s3_secret_key="test-secret",
                auth_disabled=True)


@pytest.fixture(scope="module")
def worker(s3_endpoint):
    # One worker for the module (its sandbox child stays warm); the registries below use it.
    settings = WorkerSettings(**_storage(s3_endpoint), spare_sandbox=False)
    server = worker_server(settings)
    port = server.start("127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(grace=0)


@pytest.fixture
def builder(worker, s3_endpoint, serve, tmp_path):
    settings = RegistrySettings(**_storage(s3_endpoint), worker_addrs=worker,
                                database_url=f"sqlite:///{tmp_path}/meta.db")
    addr = serve(registry_server(settings))
    client = BuilderClient(registry=addr, gateway=addr, scorer=addr)
    yield client
    client.close()


def _task(builder, **settings):
    return builder.create_task("check", common_pb2.TaskSettings(record_shape=[1, 8, 8], **settings))


def _refused(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _renamed(weights: bytes) -> bytes:
    """The same tensors under one wrong name: what a base model of another architecture looks like."""
    tensors = dict(load_safetensors(weights))
    name = sorted(tensors)[0]
    tensors["not_in_the_model.weight"] = tensors.pop(name)
    return save_safetensors(tensors)


def test_a_fitting_pair_is_checked_and_the_task_ready(builder, digits_base_weights, digits_strategy, digits_splits):
    t = _task(builder)
    builder.upload(t.task_id, BASE, digits_base_weights)  # nothing to check it against yet
    assert not builder.get_task(t.task_id).model_check.HasField("checked_at")
    ref = builder.upload(t.task_id, STRATEGY, digits_strategy.encode())
    builder.upload(t.task_id, DATA, archives.records_to_npz(*digits_splits["builder"]))
    task = builder.get_task(t.task_id)
    c = task.model_check
    assert task.ready and c.HasField("checked_at") and c.strategy_sha256 == ref.sha256
    assert c.base_model_sha256 == task.base_model.sha256
    assert c.num_classes == 10 and c.parameters > 1000 and c.device == "cpu" and c.seconds > 0


def test_weights_of_another_architecture_are_refused_at_upload(builder, digits_base_weights, digits_strategy):
    t = _task(builder)
    builder.upload(t.task_id, STRATEGY, digits_strategy.encode())
    code, msg = _refused(lambda: builder.upload(t.task_id, BASE, _renamed(digits_base_weights)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model check failed" in msg and "not_in_the_model.weight" in msg
    assert "127.0.0.1" not in msg  # the worker's answer, not where it runs
    task = builder.get_task(t.task_id)
    assert not task.base_model.key and not task.ready  # nothing stored
    # Then the right weights go in, checked.
    builder.upload(t.task_id, BASE, digits_base_weights)
    assert builder.get_task(t.task_id).model_check.base_model_sha256


def test_a_new_strategy_is_checked_against_the_current_weights(builder, digits_base_weights, digits_strategy):
    t = _task(builder)
    builder.upload(t.task_id, BASE, digits_base_weights)
    builder.upload(t.task_id, STRATEGY, digits_strategy.encode())
    # A strategy whose model is wider than the weights: refused, the task keeps strategy v1.
    wider = re.sub(r"nn\.Conv2d\(1, (\d+)", lambda m: f"nn.Conv2d(1, {int(m.group(1)) * 2}", digits_strategy, count=1)
    assert wider != digits_strategy
    code, msg = _refused(lambda: builder.upload(t.task_id, STRATEGY, wider.encode()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "shape" in msg
    assert builder.get_task(t.task_id).strategy.version == 1


def test_a_strategy_that_fails_to_build_is_refused_with_its_reason(builder, digits_base_weights, digits_strategy):
    t = _task(builder)
    builder.upload(t.task_id, BASE, digits_base_weights)
    broken = digits_strategy.replace("def build_model() -> nn.Module:\n", "def build_model() -> nn.Module:\n    raise RuntimeError('no model today')\n")
    assert broken != digits_strategy
    code, msg = _refused(lambda: builder.upload(t.task_id, STRATEGY, broken.encode()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no model today" in msg


def test_the_task_number_of_classes_is_checked(builder, digits_base_weights, digits_strategy):
    t = _task(builder, num_classes=5)
    builder.upload(t.task_id, BASE, digits_base_weights)
    code, msg = _refused(lambda: builder.upload(t.task_id, STRATEGY, digits_strategy.encode()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "10 logits" in msg and "num_classes = 5" in msg


def test_records_of_another_shape_are_refused(builder, digits_base_weights, digits_strategy):
    t = builder.create_task("check", common_pb2.TaskSettings(record_shape=[3, 32, 32]))
    builder.upload(t.task_id, BASE, digits_base_weights)
    code, msg = _refused(lambda: builder.upload(t.task_id, STRATEGY, digits_strategy.encode()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "(3, 32, 32)" in msg


def test_defer_check_lets_both_halves_change(builder, digits_base_weights, digits_strategy, digits_splits):
    t = _task(builder)
    builder.upload(t.task_id, BASE, digits_base_weights)
    builder.upload(t.task_id, STRATEGY, digits_strategy.encode())
    builder.upload(t.task_id, DATA, archives.records_to_npz(*digits_splits["builder"]))
    assert builder.get_task(t.task_id).ready
    # A new architecture: the weights go first, unchecked, and the task is not ready until the
    # strategy that fits them arrives.
    builder.upload(t.task_id, BASE, _renamed(digits_base_weights), defer_check=True)
    assert not builder.get_task(t.task_id).ready
    code, _ = _refused(lambda: builder.upload(t.task_id, STRATEGY, digits_strategy.encode()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    builder.upload(t.task_id, BASE, digits_base_weights)
    assert builder.get_task(t.task_id).ready


def test_no_worker_answering_is_unavailable_and_stores_nothing(s3_endpoint, serve, digits_base_weights,
                                                               digits_strategy, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    settings = RegistrySettings(**_storage(s3_endpoint), worker_addrs=dead, check_timeout_s=5,
                                database_url=f"sqlite:///{tmp_path}/meta.db")
    addr = serve(registry_server(settings))
    builder = BuilderClient(registry=addr, gateway=addr, scorer=addr)
    try:
        t = _task(builder)
        builder.upload(t.task_id, BASE, digits_base_weights)
        code, msg = _refused(lambda: builder.upload(t.task_id, STRATEGY, digits_strategy.encode()))
        assert code == grpc.StatusCode.UNAVAILABLE and "no fine-tune worker answered" in msg
        assert not builder.get_task(t.task_id).strategy.key
    finally:
        builder.close()


def test_check_model_rpc_validates_its_request(worker):
    ch = grpcutil.make_channel(worker)
    stub = worker_pb2_grpc.FinetuneWorkerServiceStub(ch)
    try:
        code, msg = _refused(lambda: stub.CheckModel(worker_pb2.CheckModelRequest(
            task_id="t-x", record_shape=[], num_classes=10), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "record_shape" in msg
        code, msg = _refused(lambda: stub.CheckModel(worker_pb2.CheckModelRequest(
            task_id="t-x", record_shape=[1, 8, 8], num_classes=10), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "strategy" in msg
    finally:
        ch.close()


def test_staging_objects_are_removed(builder, digits_base_weights, digits_strategy, s3_endpoint):
    from ftps.common.settings import StorageSettings
    from ftps.common.storage import ObjectStore

    t = _task(builder)
    builder.upload(t.task_id, BASE, digits_base_weights)
    builder.upload(t.task_id, STRATEGY, digits_strategy.encode())
    _refused(lambda: builder.upload(t.task_id, BASE, _renamed(digits_base_weights)))
    store = ObjectStore(StorageSettings(**_storage(s3_endpoint)))
    assert list(store.list_keys(f"registry/staging/{t.task_id}/")) == []
    assert len(list(store.list_keys(f"registry/tasks/{t.task_id}/base-model/"))) == 1
