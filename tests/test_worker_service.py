"""The fine-tune worker as a real gRPC server: real fine-tuning (digits) in its sandbox."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from ftps.common import archives, grpcutil, serde
from ftps.v1 import worker_pb2, worker_pb2_grpc
from services.finetune_worker.__main__ import create_server
from services.finetune_worker.config import WorkerSettings
from tests.conftest import digits_records


@pytest.fixture
def env(storage_kwargs, serve, store, digits_splits, digits_strategy, digits_base_weights):
    addr = serve(create_server(WorkerSettings(**storage_kwargs, job_timeout_s=120)))
    ch = grpcutil.make_channel(addr)
    x, y = digits_records(digits_splits, 12)
    refs = dict(
        base_model=store.put_bytes("w.safetensors", digits_base_weights),
        strategy=store.put_bytes("s.py", digits_strategy.encode()),
        records=store.put_bytes("r.npz", archives.records_to_npz(x, y)),
        builder_data=store.put_bytes("b.npz", archives.records_to_npz(*digits_splits["builder"])),
    )
    yield worker_pb2_grpc.FinetuneWorkerServiceStub(ch), refs, store
    ch.close()


def _job(refs, masks, **kw):
    return worker_pb2.RunJobRequest(job=worker_pb2.FinetuneJob(task_id="t-1", job_id="j-1", models=[
        worker_pb2.ModelSpec(index=i, seed=100 + i, mask=m.astype(np.uint8).tobytes()) for i, m in enumerate(masks)],
        **refs, **kw))


def test_run_job_returns_phi_per_model_and_record_deterministically(env):
    stub, refs, _ = env
    masks = np.array([[1, 0] * 6, [0, 1] * 6], dtype=bool)
    res = stub.RunJob(_job(refs, masks), timeout=120)
    phi = serde.array_from_tensor(res.phi)
    assert phi.shape == (2, 12) and np.isfinite(phi).all()
    assert list(res.model_indices) == [0, 1] and res.device == "cpu" and res.seconds > 0
    # Fine-tuned-on records score higher than the others, on average.
    assert phi[masks].mean() > phi[~masks].mean()
    again = serde.array_from_tensor(stub.RunJob(_job(refs, masks), timeout=120).phi)
    np.testing.assert_array_equal(phi, again)


def test_eval_records_and_builder_mix(env):
    stub, refs, store = env
    held = store.put_bytes("h.npz", archives.records_to_npz(*digits_records_from(refs, store)))
    res = stub.RunJob(_job(refs, np.ones((1, 12), bool), eval_records=held, builder_mix=5), timeout=120)
    assert serde.array_from_tensor(res.phi).shape == (1, 7)


def digits_records_from(refs, store):
    arrays = archives.npz_arrays(store.get_ref(refs["builder_data"]))
    return arrays["x"][:7], arrays["y"][:7]


def test_bad_jobs_get_precise_statuses(env):
    stub, refs, store = env
    with pytest.raises(grpc.RpcError) as e:
        stub.RunJob(_job(refs, np.ones((1, 5), bool)), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mask" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.RunJob(worker_pb2.RunJobRequest(job=worker_pb2.FinetuneJob(task_id="t-1", job_id="empty", **refs)),
                   timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "models" in e.value.details()
    bad = dict(refs, strategy=store.put_bytes("bad.py", b"RECIPE = {}\n"))
    with pytest.raises(grpc.RpcError) as e:
        stub.RunJob(_job(bad, np.ones((1, 12), bool)), timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "build_model" in e.value.details()
    wrong = dict(refs, strategy=refs["strategy"])
    wrong["base_model"] = store.put_bytes("w2.safetensors", __import__("safetensors.numpy").numpy.save(
        {"nothing": np.zeros(1, np.float32)}))
    with pytest.raises(grpc.RpcError) as e:
        stub.RunJob(_job(wrong, np.ones((1, 12), bool)), timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The worker still serves the next job.
    info = stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
    assert info.device == "cpu" and info.started_at.seconds > 0
    assert (info.engine, info.precision) == ("auto", "auto")  # as the settings ask


def test_corrupt_blob_is_data_loss(env):
    stub, refs, store = env
    refs2 = dict(refs)
    ref = refs["records"].__class__()
    ref.CopyFrom(refs["records"])
    ref.sha256 = "0" * 64
    refs2["records"] = ref
    with pytest.raises(grpc.RpcError) as e:
        stub.RunJob(_job(refs2, np.ones((1, 12), bool)), timeout=30)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS


def test_jobs_of_a_task_share_a_warm_sandbox_child(store, digits_splits, digits_strategy,
                                                   digits_base_weights):
    from services.finetune_worker.worker import Worker

    x, y = digits_records(digits_splits, 12)
    refs = dict(
        base_model=store.put_bytes("w.safetensors", digits_base_weights),
        strategy=store.put_bytes("s.py", digits_strategy.encode()),
        records=store.put_bytes("r.npz", archives.records_to_npz(x, y)),
    )
    with pytest.raises(ValueError, match="engine must be one of"):
        Worker(store, device="cpu", max_concurrent_jobs=1, timeout_s=60, memory_mb=8192,
               cache_bytes=1 << 26, engine="fastest")
    with pytest.raises(ValueError, match="precision must be one of"):
        Worker(store, device="cpu", max_concurrent_jobs=1, timeout_s=60, memory_mb=8192,
               cache_bytes=1 << 26, precision="fp16")
    # bf16 asked for on CPU: the GPU's default precision, through the sandbox child.
    worker = Worker(store, device="cpu", max_concurrent_jobs=1, timeout_s=120, memory_mb=8192,
                    cache_bytes=1 << 26, spare_sandbox=False, precision="bf16")
    try:
        masks = np.array([[1, 0] * 6, [0, 1] * 6], dtype=bool)
        first = worker.run_job(_job(refs, masks).job)
        second = worker.run_job(_job(refs, masks).job)
        assert worker._pool.stats == {"started": 1, "reused": 1, "spare_used": 0}
        assert first.precision == second.precision == "bf16"
        np.testing.assert_array_equal(serde.array_from_tensor(first.phi),
                                      serde.array_from_tensor(second.phi))
        other = _job(refs, masks).job
        other.task_id = "t-2"
        worker.run_job(other)
        assert worker._pool.stats["started"] == 2  # another task, another child
    finally:
        worker.close()
    assert worker._pool.idle_children() == []


def test_the_worker_validates_each_records_blob_once(store, digits_splits, digits_strategy,
                                                    digits_base_weights, validations):
    """Decoded once here (the job's statuses need it), then sent to the sandbox child as they came:
    never encoded and validated again in this process."""
    from services.finetune_worker.worker import Worker

    x, y = digits_records(digits_splits, 12)
    bx, by = digits_splits["builder"]
    refs = dict(base_model=store.put_bytes("w.safetensors", digits_base_weights),
                strategy=store.put_bytes("s.py", digits_strategy.encode()),
                records=store.put_bytes("r.npz", archives.records_to_npz(x, y)),
                eval_records=store.put_bytes("h.npz", archives.records_to_npz(bx[:7], by[:7])),
                builder_data=store.put_bytes("b.npz", archives.records_to_npz(bx, by)))
    validations.clear()  # writing the blobs above is not the worker's doing
    # A fresh child per job: the worker's other path to the sandbox.
    worker = Worker(store, device="cpu", max_concurrent_jobs=1, timeout_s=120, memory_mb=8192,
                    cache_bytes=1 << 26, warm_sandboxes=False)
    try:
        res = worker.run_job(_job(refs, np.ones((2, 12), bool), builder_mix=5).job)
    finally:
        worker.close()
    assert sorted(validations) == sorted([12, 7, len(bx)])
    assert serde.array_from_tensor(res.phi).shape == (2, 7) and res.engine == "sequential"
    assert res.precision == "fp32"  # the rule on CPU
    assert list(res.model_indices) == [0, 1] and res.seconds > 0


def test_connection_age_never_cuts_a_job_in_flight(storage_kwargs, serve, store, digits_splits, digits_strategy,
                                                   digits_base_weights):
    """Workers close connections after max_connection_age (so dns:/// clients re-resolve and reach
    pods added since); a job longer than that age still completes, and the next call reconnects."""
    addr = serve(create_server(WorkerSettings(**storage_kwargs, job_timeout_s=120, max_connection_age_s=0.5)))
    ch = grpcutil.make_channel(addr)
    stub = worker_pb2_grpc.FinetuneWorkerServiceStub(ch)
    x, y = digits_records(digits_splits, 12)
    refs = dict(base_model=store.put_bytes("w.safetensors", digits_base_weights),
                strategy=store.put_bytes("s.py", digits_strategy.encode()),
                records=store.put_bytes("r.npz", archives.records_to_npz(x, y)))
    masks = [np.arange(12) % 2 == i % 2 for i in range(4)]
    try:
        first = stub.RunJob(_job(refs, masks), timeout=120)  # sandbox start-up + 4 models: well over 0.5 s
        assert first.seconds > 0.5 and first.engine
        again = stub.RunJob(_job(refs, masks), timeout=120)
        np.testing.assert_array_equal(serde.array_from_tensor(again.phi), serde.array_from_tensor(first.phi))
    finally:
        ch.close()


def test_threads_per_job_share_the_cpus_among_concurrent_jobs(monkeypatch, storage_kwargs):
    from services.finetune_worker.__main__ import threads_per_job
    from ftps.common.cpus import usable_cpus

    kw = dict(storage_kwargs)
    assert threads_per_job(WorkerSettings(**kw, job_threads=3)) == 3
    monkeypatch.setenv("FTPS_TORCH_THREADS", "1")
    assert threads_per_job(WorkerSettings(**kw, max_concurrent_jobs=2)) is None  # the children inherit it
    monkeypatch.delenv("FTPS_TORCH_THREADS")
    assert threads_per_job(WorkerSettings(**kw)) is None  # one job: it takes every CPU
    assert threads_per_job(WorkerSettings(**kw, max_concurrent_jobs=2)) == max(1, usable_cpus() // 2)
    with pytest.raises(ValueError):
        WorkerSettings(**kw, job_threads=-1)
