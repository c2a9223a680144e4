"""Helpers for tests that drive the whole embedded stack: start it on free ports, force a round."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clients.api import BuilderClient, ContributorClient
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2, gateway_pb2


def embedded_stack(data_dir: Path) -> EmbeddedStack:
    """The embedded stack (S3-protocol store + four services, auth on) on 127.0.0.1 port 0; started."""
    stack = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                          data_dir=data_dir)
    stack.start()
    return stack


@contextmanager
def running_stack(data_dir: Path) -> Iterator[dict]:
    """The embedded stack's addresses with its token ``signer`` and ``bucket``, stopped at the end
    (a module's stack: ``with running_stack(tmp_path_factory.mktemp("data")) as s: yield s``)."""
    stack = embedded_stack(data_dir)
    try:
        yield dict(stack.addresses, signer=stack.signer(), bucket=stack.bucket)
    finally:
        stack.stop()


def digits_round(stack: dict, splits, strategy: str, weights: bytes, *, name: str, seed: int, n_models: int = 4,
                 m: int = 24, **settings) -> tuple[BuilderClient, ContributorClient, str, str]:
    """A ready digits task (builder "acme") and one DONE round of ``m`` of alice's records ->
    (builder client, alice's client, task id, round id); the caller closes the clients."""
    from ftps.common import archives
    from tests.conftest import digits_records

    signer = stack["signer"]
    b = builder(stack, signer.issue("acme", "builder"))
    task = b.create_task(name, common_pb2.TaskSettings(record_shape=[1, 8, 8], n_models=n_models,
                                                       batch_threshold=m, **settings))
    b.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, weights)
    b.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, strategy.encode())
    b.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*splits["builder"]))
    alice = ContributorClient(gateway=stack["gateway"], contributor="alice", token=signer.issue("alice", "contributor"))
    round_id = submit_and_finish_round(b, alice, task.task_id, *digits_records(splits, m, seed=seed))
    return b, alice, task.task_id, round_id


def submit_and_finish_round(b: BuilderClient, contributor: ContributorClient, task_id: str, x, y) -> str:
    """Submit records that reach the task's batch threshold, wait for the round they start to end
    DONE (asserted) -> its id."""
    sub = contributor.submit(task_id, x, y)
    deadline = time.time() + 30
    while not sub.round_id and time.time() < deadline:
        time.sleep(0.1)
        sub = contributor.get_submission(sub.submission_id)
    assert sub.round_id, "the batch threshold was reached but no round started"
    for status in b.watch_round(sub.round_id, timeout=300):
        pass
    assert status.state == common_pb2.ROUND_STATE_DONE, status.message
    return sub.round_id


def builder(addresses: dict, token: str) -> BuilderClient:
    return BuilderClient(registry=addresses["registry"], gateway=addresses["gateway"],
                         scorer=addresses["scorer"], token=token)


def force_round(addresses: dict, token: str, task_id: str) -> tuple[common_pb2.RoundStatus, list[common_pb2.RecordScore]]:
    """Start a round with the task's pending records now and follow it to its end: its final status
    and every record's score, in batch order."""
    b = builder(addresses, token)
    try:
        status = b.start_round(task_id, force=True)
        for status in b.watch_round(status.round_id, timeout=300):
            pass
        return status, sorted(b.scores(task_id, round_id=status.round_id).scores, key=lambda s: s.index)
    finally:
        b.close()


def settled(client: ContributorClient, submission_id: str, timeout: float = 30) -> gateway_pb2.Submission:
    """The submission once its round has ended for it (SCORED or FAILED), or as it is at ``timeout``."""
    deadline = time.time() + timeout
    while True:
        sub = client.get_submission(submission_id)
        if sub.state in (gateway_pb2.SUBMISSION_STATE_SCORED, gateway_pb2.SUBMISSION_STATE_FAILED) \
                or time.time() > deadline:
            return sub
        time.sleep(0.1)
