"""Kill a worker process in the middle of a round: the round completes on the remaining worker with
exactly the scores of an undisturbed run (same task seed, same batch -> same masks and models)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from clients.api import BuilderClient, ContributorClient
from ftps.common import archives
from stack.processes import ProcessStack
from ftps.v1 import common_pb2
from tests.conftest import digits_records

SETTINGS = dict(n_models=8, batch_threshold=16, models_per_job=1, seed=5, record_shape=[1, 8, 8], num_classes=10)


def _round(tmp_path, name, workers, splits, strategy, weights, *, kill_one: bool):
    with ProcessStack(workers=workers, data_dir=tmp_path / name, worker_env={"FTPS_TORCH_THREADS": "1"}) as stack:
        signer = stack.signer()
        a = stack.addresses
        builder = BuilderClient(registry=a["registry"], gateway=a["gateway"], scorer=a["scorer"],
                                token=signer.issue("acme", "builder"))
        task = builder.create_task("kill", common_pb2.TaskSettings(**SETTINGS))
        builder.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, weights)
        builder.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, strategy.encode())
        builder.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*splits["builder"]))
        alice = ContributorClient(gateway=a["gateway"], token=signer.issue("alice", "contributor"))
        sub = alice.submit(task.task_id, *digits_records(splits, 16, seed=9))
        deadline = time.time() + 30
        while not (s := alice.get_submission(sub.submission_id)).round_id and time.time() < deadline:
            time.sleep(0.1)
        killed = None
        for status in builder.watch_round(s.round_id, timeout=240):
            if kill_one and killed is None and status.models_done >= 1:
                killed = stack.children["worker-0"]
                os.kill(killed.proc.pid, signal.SIGKILL)  # mid-round, jobs in flight on it
        result = builder.get_round(s.round_id)
        assert result.status.state == common_pb2.ROUND_STATE_DONE, result.status.message
        if kill_one:
            assert killed is not None and killed.proc.wait(10) == -signal.SIGKILL
        builder.close()
        alice.close()
        return {sc.index: sc for sc in result.scores}


@pytest.mark.slow
def test_round_survives_a_killed_worker_with_identical_scores(tmp_path, digits_splits, digits_strategy,
                                                             digits_base_weights):
    disturbed = _round(tmp_path, "two", 2, digits_splits, digits_strategy, digits_base_weights, kill_one=True)
    calm = _round(tmp_path, "one", 1, digits_splits, digits_strategy, digits_base_weights, kill_one=False)
    assert sorted(disturbed) == sorted(calm) == list(range(16))
    for j in calm:
        for field in ("counted_p", "counted_p_ci_low", "counted_p_ci_high", "score", "mu_in", "mu_out", "auc"):
            assert getattr(disturbed[j], field) == getattr(calm[j], field), (j, field)
    assert len({round(s.score, 6) for s in calm.values()}) > 1  # not trivially equal
