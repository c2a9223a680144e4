"""The contributor gateway as a real gRPC server, with a real registry and a scripted scorer."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from clients.api import ContributorClient
from ftps.common import grpcutil
from ftps.common.db import Database
from ftps.common.errors import FailedPrecondition, NotFound, PermissionDenied
from ftps.common.registry_client import registry_getter
from ftps.common.storage import ObjectStore
from ftps.common.task_rules import min_records
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.contributor_gateway.config import GatewaySettings
from services.contributor_gateway.gateway import Gateway
from services.contributor_gateway.servicer import ContributorGatewayServicer
from services.contributor_gateway.store import SqlSubmissionStore

SHAPE = [1, 8, 8]


class ScriptedScorer:
    """Stands in for the scorer: finishes each round (once ``release`` is set) with score =
    index / m, or fails it. ``starts`` lists every StartRound call, in order."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.rounds: dict[str, tuple[list[str], list[str]]] = {}
        self.starts: list[str] = []
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()

    def start_round(self, task_id, round_id, batch, record_ids, contributors):
        with self._lock:
            self.starts.append(round_id)
            self.rounds.setdefault(round_id, (list(record_ids), list(contributors)))
        return common_pb2.RoundStatus(task_id=task_id, round_id=round_id, state=common_pb2.ROUND_STATE_PENDING)

    def watch_round(self, round_id):
        if round_id not in self.rounds:
            raise NotFound(round_id)
        self.release.wait(10)
        yield self.get_result(round_id).status

    def get_result(self, round_id):
        if round_id not in self.rounds:
            raise NotFound(f"round {round_id} not found")
        if not self.release.is_set():
            return common_pb2.RoundResult(status=common_pb2.RoundStatus(
                round_id=round_id, state=common_pb2.ROUND_STATE_FINETUNING))
        if self.fail:
            return common_pb2.RoundResult(status=common_pb2.RoundStatus(
                round_id=round_id, state=common_pb2.ROUND_STATE_FAILED, message="scripted"))
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
    task = registry_pb2_grpc.BuilderRegistryServiceStub(reg_ch).CreateTask(registry_pb2.CreateTaskRequest(
        name="t", settings=common_pb2.TaskSettings(record_shape=SHAPE, batch_threshold=6, n_models=4)), timeout=5)
    scorer = ScriptedScorer()
    settings = GatewaySettings(**storage_kwargs, max_records_per_request=50, max_pending_per_contributor=60)

    def start_gateway():
        # Every gateway of the test shares the database (replicas, or one restarted).
        db = Database(settings.database_url, name="gateway database")
        gw = Gateway(ObjectStore(settings), registry_getter(reg_ch), scorer, SqlSubmissionStore.open(db),
                     max_records_per_request=settings.max_records_per_request,
                     max_pending_per_contributor=settings.max_pending_per_contributor, reconcile_s=0.1)
        server = grpcutil.Security.from_settings(settings, "contributor-gateway").server()  # auth_disabled
        server.add(gateway_pb2_grpc.add_ContributorGatewayServiceServicer_to_server, ContributorGatewayServicer(gw),
                   "ftps.v1.ContributorGatewayService")
        server.on_stop(gw.close)
        server.on_stop(db.dispose)
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


def test_watch_scores_of_one_round_ends_after_its_records(env):
    """With round_id: the round's scores (all, or one contributor's), then the stream ends by itself;
    a round of another task, or none, is NOT_FOUND (the caller is an admin: auth is off here)."""
    task, scorer, start = env
    _, addr = start()
    alice = ContributorClient(gateway=addr, contributor="alice")
    bob = ContributorClient(gateway=addr, contributor="bob")
    scorer.release.clear()  # the round runs until released
    mine = alice.submit(task.task_id, *_records(4))
    theirs = bob.submit(task.task_id, *_records(2, seed=1))  # reaches m = 6: a round starts
    deadline = time.time() + 10
    while not alice.get_submission(mine.submission_id).round_id and time.time() < deadline:
        time.sleep(0.05)
    rid = alice.get_submission(mine.submission_id).round_id
    ch = grpcutil.make_channel(addr)
    stub = gateway_pb2_grpc.ContributorGatewayServiceStub(ch)
    got: dict[str, list] = {}

    def watch(name, **req):
        got[name] = [s.record_id for s in stub.WatchScores(
            gateway_pb2.WatchScoresRequest(task_id=task.task_id, round_id=rid, **req), timeout=20)]

    threads = [threading.Thread(target=watch, args=("alice",), kwargs={"contributor": "alice"}),
               threading.Thread(target=watch, args=("all",))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert not got  # nothing before the round is DONE
    scorer.release.set()
    for t in threads:
        t.join(15)
    assert got["alice"] == list(mine.record_ids)
    assert got["all"] == [*mine.record_ids, *theirs.record_ids]
    # Every record of the task, no contributor named (builders and admins).
    every = []
    with pytest.raises(grpc.RpcError) as e:
        for s in stub.WatchScores(gateway_pb2.WatchScoresRequest(task_id=task.task_id), timeout=2):
            every.append(s.record_id)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and len(every) == 6
    code, _ = _code(lambda: list(stub.WatchScores(gateway_pb2.WatchScoresRequest(
        task_id=task.task_id, round_id="r-000000000000"), timeout=5)))
    assert code == grpc.StatusCode.NOT_FOUND
    # The client library's one-round watch returns when the stream ends by itself.
    assert [s.record_id for s in bob.watch_scores(task.task_id, round_id=rid, timeout=20)] == list(theirs.record_ids)
    ch.close(); alice.close(); bob.close()


def test_watch_scores_of_a_failed_round_ends_at_once(env):
    task, scorer, start = env
    scorer.fail = True
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="ivy")
    sub = c.submit(task.task_id, *_records(6))  # reaches m = 6: the round starts, and fails
    deadline = time.time() + 10
    while not scorer.rounds and time.time() < deadline:
        time.sleep(0.05)
    rid = next(iter(scorer.rounds))
    t0 = time.time()
    assert list(c.watch_scores(task.task_id, round_id=rid, timeout=30)) == []
    assert time.time() - t0 < 5
    final = list(c.watch_round(rid, timeout=10))
    assert final[-1].state == common_pb2.ROUND_STATE_FAILED and final[-1].message == "scripted"
    assert sub.record_ids
    c.close()


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
    stub = gateway_pb2_grpc.ContributorGatewayServiceStub(ch)
    ContributorClient(gateway=addr, contributor="hal").submit(task.task_id, *_records(3))
    code, details = _code(lambda: stub.StartRound(gateway_pb2.StartRoundRequest(task_id=task.task_id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "3 of 6" in details
    status = stub.StartRound(gateway_pb2.StartRoundRequest(task_id=task.task_id, force=True), timeout=5)
    final = list(stub.WatchRound(gateway_pb2.WatchRoundRequest(round_id=status.round_id), timeout=10))
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
    gw = gateway_pb2_grpc.ContributorGatewayServiceStub(grpcutil.make_channel(addr))

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


def test_list_submissions_and_scores_page_through(env):
    task, scorer, start = env
    _, addr = start()
    alice = ContributorClient(gateway=addr, contributor="alice")
    subs = [alice.submit(task.task_id, *_records(3, seed=i)) for i in range(4)]  # two rounds of 6
    assert [s.submission_id for s in alice.list_submissions(task.task_id, page_size=3)] == \
        [s.submission_id for s in subs]
    page = alice.stub.ListSubmissions(gateway_pb2.ListSubmissionsRequest(page_size=3), timeout=5)
    assert len(page.submissions) == 3 and page.next_page_token
    deadline = time.time() + 10
    while len(alice.scores(task.task_id)) < 12 and time.time() < deadline:
        time.sleep(0.05)
    want = [r for s in subs for r in s.record_ids]
    assert sorted(s.record_id for s in alice.scores(task.task_id, page_size=5)) == sorted(want)
    first = alice.stub.GetScores(gateway_pb2.GetScoresRequest(task_id=task.task_id, page_size=5), timeout=5)
    assert len(first.scores) == 5 and first.next_page_token
    bob = ContributorClient(gateway=addr, contributor="bob")
    assert bob.list_submissions(task.task_id) == []  # (auth is off here: the field picks whose)
    alice.close(); bob.close()


def test_a_round_the_scorer_never_got_gives_its_records_back_without_a_failure(env, storage_kwargs):
    """The gateway died between claiming the records and StartRound: after the grace period the
    reconciler puts them back in the queue, counting no failed round."""
    task, scorer, start = env
    settings = GatewaySettings(**storage_kwargs)
    db = Database(settings.database_url)
    subs = SqlSubmissionStore.open(db)
    _, addr = start()
    c = ContributorClient(gateway=addr, contributor="jay")
    sub = c.submit(task.task_id, *_records(2))
    assert subs.claim(task.task_id, "r-orphan", at_least=2, now=time.time() - 1000).submissions
    deadline = time.time() + 10
    while c.get_submission(sub.submission_id).state != gateway_pb2.SUBMISSION_STATE_PENDING and time.time() < deadline:
        time.sleep(0.05)
    s = c.get_submission(sub.submission_id)
    assert (s.state, s.round_id, s.failed_rounds) == (gateway_pb2.SUBMISSION_STATE_PENDING, "", 0)
    assert "r-orphan" not in scorer.rounds
    c.close(); db.dispose()


def test_two_replicas_at_the_threshold_put_each_record_in_exactly_one_round(database_url):
    """Two gateways share one database and one scorer; contributors submit concurrently to both,
    each submit able to reach the batch threshold: no record in two rounds, no round started
    twice, none lost."""
    import tempfile

    from ftps.common.auth import Principal
    from ftps.common.settings import StorageSettings
    from ftps.common.storage import open_blob_store

    task = registry_pb2.Task(task_id="t-replicas", owner="acme", settings=common_pb2.TaskSettings(
        record_shape=SHAPE, batch_threshold=6, n_models=4, num_classes=10))
    blobs = open_blob_store(StorageSettings(s3_endpoint=f"file://{tempfile.mkdtemp()}"))
    blobs.ensure_bucket()
    scorer = ScriptedScorer()
    dbs = [Database(database_url, name="gateway database") for _ in range(2)]
    gws = [Gateway(blobs, lambda _id: task, scorer, SqlSubmissionStore.open(db), reconcile_s=0.1) for db in dbs]
    acked, errors = [], []

    def contributor(k: int) -> None:
        who = Principal(f"c{k}", "contributor")
        try:
            for j in range(6):
                sub = gws[(k + j) % 2].submit(task.task_id, who.subject, *_records(1 + (j % 2), seed=k * 10 + j),
                                              "", who)
                acked.extend(sub.record_ids)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=contributor, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    admin = Principal("root", "admin")
    least = max(2, min_records(task.settings.n_models))

    def in_state(state):
        return [r for s in _all_subs(gws[0], task.task_id, admin) if s.state == state for r in s.record_ids]

    deadline = time.time() + 30
    # Whatever is left below the threshold, while a round can hold it. A claim skips rows another
    # claim holds (SKIP LOCKED), so while automatic starts are still deciding it may see fewer: again.
    while time.time() < deadline and len(in_state(gateway_pb2.SUBMISSION_STATE_PENDING)) >= least:
        try:
            gws[0].start_round(task.task_id, force=True, who=admin)
        except FailedPrecondition:
            time.sleep(0.1)
    while time.time() < deadline and in_state(gateway_pb2.SUBMISSION_STATE_IN_ROUND):
        time.sleep(0.1)
    assert len(scorer.starts) == len(set(scorer.starts))  # no round started twice
    in_rounds = [r for ids, _ in scorer.rounds.values() for r in ids]
    assert len(in_rounds) == len(set(in_rounds))  # no record in two rounds
    left = in_state(gateway_pb2.SUBMISSION_STATE_PENDING)
    assert len(left) < least and sorted(in_rounds + left) == sorted(acked)  # none lost
    assert sorted(in_state(gateway_pb2.SUBMISSION_STATE_SCORED)) == sorted(in_rounds)
    with pytest.raises(PermissionDenied):  # a contributor lists only its own submissions
        gws[0].list_submissions(task.task_id, "c1", 0, "", Principal("c2", "contributor"))
    assert gws[0].list_submissions(task.task_id, "", 0, "", Principal("c2", "contributor")).submissions
    for gw, db in zip(gws, dbs):
        gw.close()
        db.dispose()


def _all_subs(gw, task_id, who):
    out, token = [], ""
    while True:
        page = gw.list_submissions(task_id, "", 1000, token, who)
        out += page.submissions
        token = page.next_page_token
        if not token:
            return out
