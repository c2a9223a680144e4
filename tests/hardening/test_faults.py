"""Faults survived: the object store unreachable for a few seconds (retry with backoff, or a clear
UNAVAILABLE), and many contributors submitting at once (all acknowledged, each stored once)."""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from clients.api import ContributorClient
from ftps.common import grpcutil
from ftps.common.errors import Unavailable
from ftps.common.settings import StorageSettings
from ftps.common.storage import ObjectStore
from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.contributor_gateway.__main__ import create_server as gateway_server
from services.contributor_gateway.config import GatewaySettings
from tests.hardening.proxy import CuttableProxy


@pytest.fixture
def proxy(s3_endpoint):
    host, port = s3_endpoint.split(":")
    p = CuttableProxy(host, int(port))
    yield p
    p.close()


def test_short_outage_is_ridden_out_with_backoff(proxy, storage_kwargs):
    kw = dict(storage_kwargs, s3_endpoint=proxy.endpoint)
    kw.pop("listen")
    store = ObjectStore(StorageSettings(**kw), retries=6, backoff_s=0.2)
    store.ensure_bucket()
    proxy.cut()
    threading.Timer(1.5, proxy.restore).start()
    t0 = time.perf_counter()
    ref = store.put_bytes("during-outage.bin", b"payload")
    assert time.perf_counter() - t0 >= 1.0  # it did wait for the store to come back
    assert store.get_ref(ref) == b"payload"


def test_long_outage_fails_clearly_and_nothing_half_written_is_read(proxy, storage_kwargs, serve):
    kw = dict(storage_kwargs, s3_endpoint=proxy.endpoint)
    kw.pop("listen")
    store = ObjectStore(StorageSettings(**kw), retries=2, backoff_s=0.05)
    store.ensure_bucket()
    proxy.cut()
    with pytest.raises(Unavailable, match="object store unreachable"):
        store.put_bytes("never.bin", b"x")
    proxy.restore()
    assert not store.exists("never.bin")
    # Through a service: the registry answers UNAVAILABLE with the cause, then recovers.
    reg_addr = serve(registry_server(RegistrySettings(**kw, listen="127.0.0.1:0")))
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(reg_addr))
    # A task is a database row; an upload is what reaches the object store.
    task = stub.CreateTask(registry_pb2.CreateTaskRequest(name="x", settings=common_pb2.TaskSettings(
        record_shape=[1])), timeout=60)
    blob = b"x = 1\n"
    upload = lambda: stub.UploadBlob(iter([  # noqa: E731
        registry_pb2.UploadBlobRequest(header=registry_pb2.UploadHeader(
            task_id=task.task_id, kind=common_pb2.BLOB_KIND_STRATEGY, size=len(blob),
            sha256=hashlib.sha256(blob).hexdigest())),
        registry_pb2.UploadBlobRequest(chunk=blob)]), timeout=60)
    proxy.cut()
    with pytest.raises(grpc.RpcError) as e:
        upload()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "object store" in e.value.details()
    assert not stub.GetTask(registry_pb2.GetTaskRequest(task_id=task.task_id), timeout=10).strategy.key
    proxy.restore()
    assert upload().version == 1


def test_fifty_concurrent_contributors_all_stored_exactly_once(storage_kwargs, serve, capsys):
    reg_addr = serve(registry_server(RegistrySettings(**storage_kwargs)))
    task = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(reg_addr)).CreateTask(
        registry_pb2.CreateTaskRequest(name="load", settings=common_pb2.TaskSettings(
            record_shape=[1, 8, 8], batch_threshold=100_000)), timeout=5)
    gw_addr = serve(gateway_server(GatewaySettings(**storage_kwargs, registry_addr=reg_addr,
                                                   scorer_addr="127.0.0.1:9")))
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    lock = threading.Lock()

    def contributor(k: int) -> list[str]:
        c = ContributorClient(gateway=gw_addr, contributor=f"c{k:02d}")
        ids = []
        for i in range(20):
            x = rng.random((1, 1, 8, 8), dtype=np.float32)
            t0 = time.perf_counter()
            sub = c.submit(task.task_id, x, np.array([i % 10]), idempotency_key=f"r{i}")
            with lock:
                latencies.append(time.perf_counter() - t0)
            if i % 5 == 0:  # a client retry of an acknowledged submit
                assert c.submit(task.task_id, x, np.array([i % 10]), idempotency_key=f"r{i}").submission_id \
                    == sub.submission_id
            ids += list(sub.record_ids)
        c.close()
        return ids

    with futures.ThreadPoolExecutor(50) as pool:
        all_ids = [rid for ids in pool.map(contributor, range(50)) for rid in ids]
    assert len(all_ids) == 1000 and len(set(all_ids)) == 1000
    last = ContributorClient(gateway=gw_addr, contributor="probe").submit(
        task.task_id, np.zeros((1, 1, 8, 8), np.float32), np.array([0]))
    assert last.pending_in_task == 1001  # every record stored once, no duplicate from the retries
    q = np.quantile(latencies, [0.5, 0.99])
    with capsys.disabled():
        print(f"\nsubmit latency, 50 concurrent contributors x 20 submits: p50 {q[0] * 1e3:.1f} ms, "
              f"p99 {q[1] * 1e3:.1f} ms, mean {statistics.mean(latencies) * 1e3:.1f} ms")
