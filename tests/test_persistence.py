"""`ftps-stack up` keeps its data: the embedded stack in its kept mode (SQLite + blob files in the
data dir), stopped and started again on the same dir, shows the same tasks, submissions and scores
through the public RPCs, and goes on serving (real fine-tuning on digits)."""

from __future__ import annotations


import pytest

from clients.api import ContributorClient
from ftps.common import archives
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2, gateway_pb2
from tests.conftest import digits_records
from tests.stacks import builder, force_round, settled as _settled

SHAPE = [1, 8, 8]
PORTS = {k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")}


def _kept_stack(data_dir) -> EmbeddedStack:
    stack = EmbeddedStack(ports=dict(PORTS), data_dir=data_dir, persistent=True)
    stack.start()
    return stack


def _seen(addresses: dict, tokens: dict, task_id: str, round_id: str, submission_ids: dict) -> dict:
    """Everything a builder and the contributors can read of the task, through the public RPCs."""
    b = builder(addresses, tokens["acme"])
    try:
        out = {"tasks": [t.SerializeToString(deterministic=True) for t in b.list_tasks()],
               "task": b.get_task(task_id).SerializeToString(deterministic=True),
               "round": b.get_round(round_id).SerializeToString(deterministic=True),
               "batch_scores": b.scores(task_id, round_id=round_id).SerializeToString(deterministic=True)}
    finally:
        b.close()
    for who, sub_id in submission_ids.items():
        c = ContributorClient(gateway=addresses["gateway"], token=tokens[who])
        try:
            out[f"{who}/submission"] = c.get_submission(sub_id).SerializeToString(deterministic=True)
            out[f"{who}/scores"] = [s.SerializeToString(deterministic=True) for s in c.scores(task_id)]
        finally:
            c.close()
    return out


@pytest.mark.timeout(300)
def test_a_restarted_kept_stack_shows_the_same_tasks_submissions_and_scores(
        tmp_path, digits_splits, digits_strategy, digits_base_weights):
    data_dir = tmp_path / "data"
    stack = _kept_stack(data_dir)
    try:
        assert stack.addresses["s3"].startswith("file://")  # no store server: blobs are files
        signer = stack.signer()
        tokens = {"acme": signer.issue("acme", "builder"), "alice": signer.issue("alice", "contributor"),
                  "bob": signer.issue("bob", "contributor")}
        b = builder(stack.addresses, tokens["acme"])
        task = b.create_task("kept", common_pb2.TaskSettings(record_shape=SHAPE, num_classes=10, seed=5,
                                                              n_models=4, batch_threshold=1000))
        b.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
        b.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
        b.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
        b.close()
        x, y = digits_records(digits_splits, 8, seed=2)
        submission_ids = {}
        for who, sl in (("alice", slice(0, 4)), ("bob", slice(4, 8))):
            c = ContributorClient(gateway=stack.addresses["gateway"], token=tokens[who])
            submission_ids[who] = c.submit(task.task_id, x[sl], y[sl]).submission_id
            c.close()
        status, scores = force_round(stack.addresses, tokens["acme"], task.task_id)
        assert status.state == common_pb2.ROUND_STATE_DONE, status.message
        assert len(scores) == 8
        c = ContributorClient(gateway=stack.addresses["gateway"], token=tokens["alice"])
        assert _settled(c, submission_ids["alice"]).state == gateway_pb2.SUBMISSION_STATE_SCORED
        c.close()
        before = _seen(stack.addresses, tokens, task.task_id, status.round_id, submission_ids)
    finally:
        stack.stop()
    assert (data_dir / "metadata.db").is_file() and any((data_dir / "blobs").rglob("*"))

    stack = _kept_stack(data_dir)  # new ports, same data dir: the same signing key, so the same tokens
    try:
        after = _seen(stack.addresses, tokens, task.task_id, status.round_id, submission_ids)
        assert after.keys() == before.keys()
        for what in before:
            assert after[what] == before[what], f"{what} changed across the restart"
        # And it goes on serving: the stored blobs are read again (a second round on the kept task).
        c = ContributorClient(gateway=stack.addresses["gateway"], token=tokens["alice"])
        again = c.submit(task.task_id, *digits_records(digits_splits, 4, seed=3))
        c.close()
        status2, scores2 = force_round(stack.addresses, tokens["acme"], task.task_id)
        assert status2.state == common_pb2.ROUND_STATE_DONE, status2.message
        assert status2.round_id != status.round_id and len(scores2) == 4
        assert {s.record_id for s in scores2} == set(again.record_ids)
    finally:
        stack.stop()
