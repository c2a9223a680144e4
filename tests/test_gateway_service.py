"""The contributor gateway as a real gRPC server, with a real registry and a scripted scorer."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from clients.api import ContributorClient
from ftps.common import grpcutil
from ftps.common.errors import NotFound
from ftps.common.registry_client import registry_getter
from ftps.common.storage import ObjectStore
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.contributor_gateway.config import GatewaySettings
from services.contributor_gateway.gateway import Gateway
from services.contributor_gateway.servicer import ContributorGatewayServicer

SHAPE = [1, 8, 8]


class ScriptedScorer:
    """Stands in for the scorer: finishes each round with score = index / m, or fails it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.rounds: dict[str, tuple[list[str], list[str]]] = {}
        self.release = threading.Event()
        self.release.set()

    def start_round(self, task_id, round_id, batch, record_ids, contributors):
        self.rounds[round_id] = (record_ids, contributors)
        return common_pb2.RoundStatus(task_id=task_id, round_id=round_id, state=common_pb2.ROUND_STATE_PENDING)

    def watch_round(self, round_id):
        if round_id not in self.rounds:
            raise NotFound(round_id)
        self.release.wait(10)
        state = common_pb2.ROUND_STATE_FAILED if self.fail else common_pb2.ROUND_STATE_DONE
        yield common_pb2.RoundStatus(round_id=round_id, state=state, message="scripted")

    def get_result(self, round_id):
        ids, who = self.rounds[round_id]
        res = common_pb2.RoundResult(status=common_pb2.RoundStatus(round_id=round_id, state=common_pb2.ROUND_STATE_DONE))
        for j, (rid, c) in enumerate(zip(ids, who)):
            res.scores.append(common_pb2.RecordScore(record_id=rid, contributor=c, round_id=round_id,
                                                     index=j, score=j / len(ids)))
        res.batch.auc = 0.75
        return res


@pytest.fixture
def env(storage_kwargs, serve):
    reg_addr = serve(registry_server(RegistrySettings(**storage_kwargs)))
    reg_ch = grpcutil.make_channel(reg_addr)
    task = registry_pb2_grpc.BuilderRegistryStub(reg_ch).CreateTask(registry_pb2.CreateTaskRequest(
        name="t", settings=common_pb2.TaskSettings(record_shape=SHAPE, batch_threshold=6, n_models=4)), timeout=5)
    scorer = ScriptedScorer()
    settings = GatewaySettings(**storage_kwargs, max_records_per_request=50, max_pending_per_contributor=60)

    def start_gateway():
        gw = Gateway(ObjectStore(settings), registry_getter(reg_ch), scorer,
                     max_records_per_request=settings.max_records_per_request,
                     max_pending_per_contributor=settings.max_pending_per_contributor)
        server = grpcutil.Security.from_settings(settings, "contributor-gateway").server()  # auth_disabled
        server.add(gateway_pb2_grpc.add_ContributorGatewayServicer_to_server, ContributorGatewayServicer(gw),
                   "ftps.v1.ContributorGateway")
        return server, serve(server)

    yield task, scorer, start_gateway
    reg_ch.close()


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 10, n)


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_submit_then_batch_threshold_starts_a_round_and_scores_fan_out(env):
    task, scorer, start = env
    _, addr = start()
    alice = ContributorClient(gateway=addr, contributor="alice")
    bob = ContributorClient(gateway=addr, contributor="bob")
    s1 = alice.submit(task.task_id, *_records(3))
    assert s1.state == gateway_pb2.SUBMISSION_STATE_PENDING and s1.pending_in_task == 3
    s2 = bob.submit(task.task_id, *_records(3, seed=1))  # reaches m = 6
    deadline = time.time() + 10
    while not alice.scores(task.task_id) and time.time() < deadline:
        time.sleep(0.05)
    mine = alice.scores(task.task_id)
    assert [s.record_id for s in mine] == list(s1.record_ids)
    assert all(s.contributor == "alice" for s in mine)
    assert {s.record_id for s in bob.scores(task.task_id)} == set(s2.record_ids)
    assert alice.get_submission(s1.submission_id).state == gateway_pb2.SUBMISSION_STATE_SCORED
    alice.close(); bob.close()


def test_watch_scores_streams_existing_and_new(env):
    task, scorer, start = env
    _, addr = start()
    alice = ContributorClient(gateway=addr, contributor="alice")
    alice.submit(task.task_id, *_records(6))
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for s in alice.watch_scores(task.task_id, timeout=3):
            got.append(s)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(got) == 6 and all(s.contributor == "alice" for s in got)


def test_retried_submit_with_same_key_does_not_duplicate(env):
    task, scorer, start = env
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="carol")
    a = c.submit(task.task_id, *_records(2), idempotency_key="k1")
    b = c.submit(task.task_id, *_records(2), idempotency_key="k1")
    assert a.submission_id == b.submission_id and b.pending_in_task == 2
    other = ContributorClient(gateway=addr, contributor="dave").submit(task.task_id, *_records(2), idempotency_key="k1")
    assert other.submission_id != a.submission_id  # keys are per contributor


def test_acknowledged_records_survive_a_gateway_restart(env):
    task, scorer, start = env
    server, addr = start()
    c = ContributorClient(gateway=addr, contributor="erin")
    sub = c.submit(task.task_id, *_records(4))
    c.close()
    server.stop(0)
    _, addr2 = start()
    c2 = ContributorClient(gateway=addr2, contributor="erin")
    again = c2.get_submission(sub.submission_id)
    assert list(again.record_ids) == list(sub.record_ids) and again.pending_in_task == 4
    c2.close()


@pytest.mark.parametrize("mutate,code,needle", [
    (lambda x, y: (x[:, :, :4], y), grpc.StatusCode.INVALID_ARGUMENT, "records.x has shape"),
    (lambda x, y: (np.where(x > 0.5, np.nan, x).astype(np.float32), y), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    (lambda x, y: (x, y + 10), grpc.StatusCode.INVALID_ARGUMENT, "labels outside"),
    (lambda x, y: (x, y[:-1]), grpc.StatusCode.INVALID_ARGUMENT, "records.y"),
    (lambda x, y: (x[:0], y[:0]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
])
def test_bad_records_are_refused_and_not_stored(env, mutate, code, needle):
    task, scorer, start = env
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="frank")
    x, y = mutate(*_records(4))
    got, details = _code(lambda: c.submit(task.task_id, x, y))
    assert got == code and needle in details
    assert c.submit(task.task_id, *_records(1)).pending_in_task == 1  # nothing of the bad one pending


def test_limits_and_unknown_task(env):
    task, scorer, start = env
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="gina")
    assert _code(lambda: c.submit(task.task_id, *_records(51)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(lambda: c.submit("t-unknown", *_records(2)))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: c.submit("../t", *_records(2)))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_start_round_below_threshold_needs_force(env):
    task, scorer, start = env
    _, addr = start()
    ch = grpcutil.make_channel(addr)
    stub = gateway_pb2_grpc.ContributorGatewayStub(ch)
    ContributorClient(gateway=addr, contributor="hal").submit(task.task_id, *_records(3))
    code, details = _code(lambda: stub.StartRound(gateway_pb2.StartRoundRequest(task_id=task.task_id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "3 of 6" in details
    status = stub.StartRound(gateway_pb2.StartRoundRequest(task_id=task.task_id, force=True), timeout=5)
    final = list(stub.WatchRound(gateway_pb2.GetRoundRequest(round_id=status.round_id), timeout=10))
    assert final[-1].state == common_pb2.ROUND_STATE_DONE
    assert len(stub.GetRound(gateway_pb2.GetRoundRequest(round_id=status.round_id), timeout=5).scores) == 3
    ch.close()


def test_failed_round_puts_records_back_to_pending(env):
    task, scorer, start = env
    scorer.fail = True
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="ivy")
    sub = c.submit(task.task_id, *_records(6))
    deadline = time.time() + 10
    while time.time() < deadline:
        s = c.get_submission(sub.submission_id)
        if s.state == gateway_pb2.SUBMISSION_STATE_PENDING and not s.round_id and scorer.rounds:
            break
        time.sleep(0.05)
    assert s.state == gateway_pb2.SUBMISSION_STATE_PENDING and s.pending_in_task == 6
    assert s.failed_rounds == 1 and not s.failure_reason


def test_a_submission_in_two_failed_rounds_is_not_retried_again(env):
    """Nothing is re-queued forever: the second failed round ends the submission FAILED, with
    a reason its contributor reads, and the task's queue is free for the others."""
    task, scorer, start = env
    scorer.fail = True
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="ivy")
    sub = c.submit(task.task_id, *_records(6))  # reaches m = 6: the first round starts by itself
    gw = gateway_pb2_grpc.ContributorGatewayStub(grpcutil.make_channel(addr))

    def settled(failed_rounds: int) -> gateway_pb2.Submission:
        deadline = time.time() + 10
        while time.time() < deadline:
            s = c.get_submission(sub.submission_id)
            if s.failed_rounds == failed_rounds and not s.round_id:
                return s
            time.sleep(0.05)
        raise AssertionError(f"submission never reached {failed_rounds} failed round(s): {s}")

    assert settled(1).state == gateway_pb2.SUBMISSION_STATE_PENDING
    gw.StartRound(gateway_pb2.StartRoundRequest(task_id=task.task_id, force=True), timeout=5)
    s = settled(2)
    assert s.state == gateway_pb2.SUBMISSION_STATE_FAILED
    assert s.failure_reason == ("2 rounds holding these records failed; not retried automatically "
                                "(submit again to retry). Last: scripted")
    assert s.pending_in_task == 0
    code, details = _code(lambda: gw.StartRound(gateway_pb2.StartRoundRequest(task_id=task.task_id, force=True),
                                                timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "0 record(s) pending" in details
    c.close()
