"""Rounds survive restarts: a scorer stopped mid-round releases its lease and the next one takes
the round over at once and runs it again (its seeds are derived from the batch's content, so the
re-run computes the same models); the gateway re-attaches to rounds in flight; no acknowledged
record is lost or doubled. Takeover after a lease runs out: tests/test_scorer_store.py."""

from __future__ import annotations

import socket
import time

import pytest

from clients.api import BuilderClient, ContributorClient
from ftps.common import archives
from ftps.v1 import common_pb2
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.contributor_gateway.__main__ import create_server as gateway_server
from services.contributor_gateway.config import GatewaySettings
from services.finetune_worker.__main__ import create_server as worker_server
from services.finetune_worker.config import WorkerSettings
from services.lira_scorer.__main__ import create_server as scorer_server
from services.lira_scorer.config import ScorerSettings
from tests.conftest import digits_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stack(storage_kwargs, digits_splits, digits_strategy, digits_base_weights):
    kw = dict(storage_kwargs)
    kw.pop("listen")
    ports = {name: _free_port() for name in ("registry", "worker", "scorer", "gateway")}
    addr = {name: f"127.0.0.1:{p}" for name, p in ports.items()}
    makers = {
        "registry": lambda: registry_server(RegistrySettings(**kw)),
        "worker": lambda: worker_server(WorkerSettings(**kw)),
        "scorer": lambda: scorer_server(ScorerSettings(**kw, registry_addr=addr["registry"],
                                                       worker_addrs=addr["worker"])),
        "gateway": lambda: gateway_server(GatewaySettings(**kw, registry_addr=addr["registry"],
                                                          scorer_addr=addr["scorer"])),
    }
    running = {}

    def start(name):
        server = makers[name]()
        server.start(addr[name])
        running[name] = server

    def stop(name):
        running.pop(name).stop(grace=0)

    for name in ("registry", "worker", "scorer", "gateway"):
        start(name)
    builder = BuilderClient(registry=addr["registry"], gateway=addr["gateway"], scorer=addr["scorer"])
    task = builder.create_task("restart", common_pb2.TaskSettings(
        record_shape=[1, 8, 8], n_models=8, batch_threshold=16, models_per_job=1, seed=7))
    builder.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    builder.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    builder.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
    yield dict(addr=addr, start=start, stop=stop, builder=builder, task=task, splits=digits_splits)
    builder.close()
    for server in running.values():
        server.stop(grace=0)


def _submit_and_get_round(env):
    c = ContributorClient(gateway=env["addr"]["gateway"], contributor="alice")
    x, y = digits_records(env["splits"], 16, seed=5)
    sub = c.submit(env["task"].task_id, x, y, idempotency_key="once")
    deadline = time.time() + 30
    while not (s := c.get_submission(sub.submission_id)).round_id and time.time() < deadline:
        time.sleep(0.1)
    return c, sub, s.round_id


def _wait_models(env, round_id, n):
    deadline = time.time() + 60
    while time.time() < deadline:
        status = env["builder"].get_round(round_id).status
        if status.models_done >= n or status.state in (common_pb2.ROUND_STATE_DONE, common_pb2.ROUND_STATE_FAILED):
            return status
        time.sleep(0.1)
    raise AssertionError("round made no progress")


def _final(env, round_id):
    for status in env["builder"].watch_round(round_id, timeout=180):
        pass
    return env["builder"].get_round(round_id)


def test_scorer_restart_mid_round_resumes_the_round(stack):
    c, sub, round_id = _submit_and_get_round(stack)
    assert _wait_models(stack, round_id, 2).state == common_pb2.ROUND_STATE_FINETUNING
    stack["stop"]("scorer")
    time.sleep(0.5)
    stack["start"]("scorer")
    result = _final(stack, round_id)
    assert result.status.state == common_pb2.ROUND_STATE_DONE, result.status.message
    scores = c.scores(stack["task"].task_id)
    assert [s.record_id for s in scores] == list(sub.record_ids)  # each record once
    assert all(-1 <= s.counted_p_ci_low <= s.counted_p <= s.counted_p_ci_high <= 1 for s in scores)
    c.close()


def test_gateway_restart_mid_round_reattaches(stack):
    c, sub, round_id = _submit_and_get_round(stack)
    _wait_models(stack, round_id, 1)
    c.close()
    stack["stop"]("gateway")
    stack["start"]("gateway")
    result = _final(stack, round_id)
    assert result.status.state == common_pb2.ROUND_STATE_DONE, result.status.message
    c2 = ContributorClient(gateway=stack["addr"]["gateway"], contributor="alice")
    assert [s.record_id for s in c2.scores(stack["task"].task_id)] == list(sub.record_ids)
    again = c2.submit(stack["task"].task_id, *digits_records(stack["splits"], 16, seed=5), idempotency_key="once")
    assert again.submission_id == sub.submission_id  # a retry after the restart is still not a duplicate
    c2.close()
