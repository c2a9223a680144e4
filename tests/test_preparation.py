"""The preparation stage as a long-running operation (LiraScorerService.StartPreparation /
GetPreparation / WatchPreparation), against the real embedded stack (real worker, digits): it returns
at once, reports progress, ends READY with the Gaussian GetPreparation answers, is idempotent while
it runs, is cached once READY, a refit is a new operation, a failing strategy ends it FAILED with a
readable message; and, on two Scorer replicas over one database, a preparation whose replica died
does not stay PREPARING."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from clients.api import preparation_dict
from ftps.common import archives
from ftps.common.rpc_status import error_details
from ftps.v1 import common_pb2, scorer_pb2
from services.lira_scorer.rounds import SELF
from services.lira_scorer.store import SqlPreparationStore
from tests.stacks import builder, embedded_stack
from tests.test_scorer_store import ScriptedPool, _bury, _scorer, db  # noqa: F401 - db is a fixture

PREPARING = scorer_pb2.PREPARATION_STATE_PREPARING
READY = scorer_pb2.PREPARATION_STATE_READY
FAILED = scorer_pb2.PREPARATION_STATE_FAILED

FAILING_STRATEGY = '''
import torch
from torch import nn


def build_model():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def finetune(model, x, y, *, seed, device):
    raise ValueError("this strategy cannot fine-tune")
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = embedded_stack(tmp_path_factory.mktemp("data"))
    signer = s.signer()
    yield dict(s.addresses, builder=signer.issue("acme", "builder"), other=signer.issue("umbrella", "builder"))
    s.stop()


def _task(stack, weights: bytes, strategy: str, data: tuple, *, k: int = 6) -> str:
    b = builder(stack, stack["builder"])
    try:
        task = b.create_task("prep", common_pb2.TaskSettings(record_shape=[1, 8, 8], num_classes=10, seed=3,
                                                              n_models=8, batch_threshold=16, shadow_models=k,
                                                              models_per_job=1))
        b.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, weights)
        b.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, strategy.encode())
        b.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*data))
        return task.task_id
    finally:
        b.close()


def test_preparation_is_a_long_running_operation(stack, digits_splits, digits_strategy, digits_base_weights):
    tid = _task(stack, digits_base_weights, digits_strategy, digits_splits["builder"])
    b = builder(stack, stack["builder"])
    try:
        with pytest.raises(grpc.RpcError) as e:
            b.get_preparation(tid)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(e.value).reason == "PREPARATION_NOT_FOUND"

        t0 = time.monotonic()
        started = b.start_preparation(tid)
        assert time.monotonic() - t0 < 5
        assert started.state == PREPARING and started.models_total == 6 and started.models_done < 6
        assert started.preparation_id and started.task_id == tid and started.base_model_sha256
        assert started.started_at.seconds > 0 and not started.HasField("gaussian")
        # Idempotent while it runs: the running one, even when asked to refit.
        again = b.start_preparation(tid, refit=True)
        assert again.preparation_id == started.preparation_id and again.state == PREPARING

        seen = list(b.watch_preparation(tid, timeout=300))
        assert seen[-1].state == READY and all(p.state == PREPARING for p in seen[:-1])
        assert {p.preparation_id for p in seen} == {started.preparation_id}
        done = [p.models_done for p in seen]
        assert done == sorted(done) and done[-1] == 6 and len(set(done)) > 1
        assert any(p.remaining_s > 0 for p in seen if 0 < p.models_done < 6)
        final = seen[-1]
        assert final.remaining_s == 0 and final.elapsed_s > 0
        got = b.get_preparation(tid)
        assert got.gaussian == final.gaussian and got.gaussian.k == 6 and got.gaussian.sigma > 0
        assert got.state == READY and got.preparation_id == started.preparation_id
        assert got.elapsed_s == pytest.approx(final.elapsed_s, abs=1e-3)  # frozen once terminal
        # A watch of a READY preparation: READY alone, then the end.
        assert [p.state for p in b.watch_preparation(tid, timeout=30)] == [READY]

        # Cached: READY at once, the same operation.
        t0 = time.monotonic()
        cached = b.start_preparation(tid)
        assert time.monotonic() - t0 < 5
        assert cached.state == READY and cached.preparation_id == started.preparation_id
        assert cached.gaussian == final.gaussian
        # A refit is a new operation; same seeds, so the same Gaussian numbers.
        refit = b.start_preparation(tid, refit=True)
        assert refit.state == PREPARING and refit.preparation_id != started.preparation_id
        last = b.prepare(tid)  # joins the running refit and follows it
        assert last.state == READY and last.preparation_id == refit.preparation_id
        assert last.gaussian.mu == pytest.approx(final.gaussian.mu)
        d = preparation_dict(last)
        assert d["state"] == "READY" and d["gaussian"]["k"] == 6

        # Another builder sees nothing of it.
        other = builder(stack, stack["other"])
        try:
            for call in (lambda: other.get_preparation(tid), lambda: other.start_preparation(tid)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            other.close()
    finally:
        b.close()


def test_a_failing_strategy_ends_the_preparation_failed(stack, digits_splits, digits_base_weights):
    tid = _task(stack, digits_base_weights, FAILING_STRATEGY, digits_splits["builder"], k=2)
    b = builder(stack, stack["builder"])
    try:
        started = b.start_preparation(tid)
        assert started.state == PREPARING
        final = b.prepare(tid)
        assert final.state == FAILED and final.preparation_id == started.preparation_id
        assert "this strategy cannot fine-tune" in final.message and not final.HasField("gaussian")
        assert b.get_preparation(tid).state == FAILED
        # Started again: a new operation (it fails again, the same way).
        again = b.start_preparation(tid)
        assert again.preparation_id != started.preparation_id and again.state == PREPARING
        assert b.prepare(tid).state == FAILED
    finally:
        b.close()


def test_a_preparation_whose_replica_died_does_not_stay_preparing(db, store):  # noqa: F811
    x = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
    data = store.put_bytes("registry/data.npz", archives.records_to_npz(x, np.zeros(40, np.int64)))

    def task(task_id):
        from tests.test_scorer_store import _task

        t = _task(task_id)
        t.builder_data.CopyFrom(data)
        t.settings.shadow_models = 6
        t.settings.batch_threshold = 16
        return t

    dead_pool = ScriptedPool(hang_after=2)
    a = _scorer(store, db, dead_pool, "replica-a", lease_s=1.0)
    b = _scorer(store, db, ScriptedPool(), "replica-b", lease_s=1.0)
    a._get_task = b._get_task = task
    started = a.start_preparation("t1", who=SELF)
    assert started.state == PREPARING and started.models_total == 6
    assert dead_pool.hung.wait(10)  # a died after 2 of 6 shadow models: no renewals, no more writes
    # Another replica answers from the database, and joins (does not restart) the running one.
    assert b.get_preparation("t1", SELF).models_done == 2
    assert b.start_preparation("t1", who=SELF).preparation_id == started.preparation_id
    b.start()  # b's lease loop takes it over once a's lease ran out
    try:
        deadline = time.monotonic() + 30
        final = list(b.watch_preparation("t1", is_active=lambda: time.monotonic() < deadline, who=SELF))[-1]
        assert final.state == READY and final.preparation_id == started.preparation_id
        assert final.models_done == 6 and final.gaussian.k == 6
        row = SqlPreparationStore(db).get("t1", task("t1").base_model.sha256)
        assert row.state == READY and row.lease_owner == b.owner
        assert a.get_preparation("t1", SELF) == b.get_preparation("t1", SELF)
    finally:
        b.close()
        _bury(a, dead_pool)


def test_an_offline_global_round_runs_the_preparation_it_needs(db, store):  # noqa: F811
    """The round path waits for the preparation stage as an operation: it is then visible as READY."""
    from tests.test_scorer_store import _task, _wait_done

    x = np.random.default_rng(1).normal(size=(40, 1, 8, 8)).astype(np.float32)
    data = store.put_bytes("registry/data2.npz", archives.records_to_npz(x, np.zeros(40, np.int64)))

    def task(task_id):
        t = _task(task_id)
        t.builder_data.CopyFrom(data)
        t.settings.shadow_models = 4
        t.settings.batch_threshold = 16
        t.settings.method = common_pb2.METHOD_OFFLINE_GLOBAL
        return t

    scorer = _scorer(store, db, ScriptedPool(), "replica-a", lease_s=30)
    scorer._get_task = task
    m = 12
    batch = store.put_bytes("gateway/batches/og.npz",
                            archives.records_to_npz(np.zeros((m, 1, 8, 8), np.float32), np.zeros(m, np.int64)))
    scorer.start_round("t1", "r-og", batch, [f"rec{j}" for j in range(m)], ["c"] * m, SELF)
    _wait_done(scorer, "r-og")
    result = scorer.get_result("r-og", SELF)
    prep = scorer.get_preparation("t1", SELF)
    assert prep.state == READY and prep.models_done == 4 and result.offline == prep.gaussian
    assert result.batch.method == common_pb2.METHOD_OFFLINE_GLOBAL
