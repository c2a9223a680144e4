"""Helpers for tests that drive the whole embedded stack: start it on free ports, force a round."""

from __future__ import annotations

from pathlib import Path

import time

from clients.api import BuilderClient, ContributorClient
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2, gateway_pb2


def embedded_stack(data_dir: Path) -> EmbeddedStack:
    """The embedded stack (S3-protocol store + four services, auth on) on 127.0.0.1 port 0; started."""
    stack = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                          data_dir=data_dir)
    stack.start()
    return stack


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
