"""The scorer's store contract (services.lira_scorer.store), one class run on SQLite and PostgreSQL:
idempotent creation, leases of rounds and of preparations (claim, renew, takeover after expiry,
writes of a lost lease refused, release), offline Gaussians; and two Scorer replicas on one
database: a round whose owner dies is taken over after its lease and finished with the scores of a
normal run."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import numpy as np
import pytest

from ftps.common import archives, serde
from ftps.common.db import Database
from ftps.v1 import common_pb2, registry_pb2, scorer_pb2, worker_pb2
from services.lira_scorer import store as scorer_store
from services.lira_scorer.rounds import SELF, Scorer
from services.lira_scorer.store import NewRound, SqlOfflineStore, SqlPreparationStore, SqlRoundStore

BATCH = common_pb2.BlobRef(bucket="b", key="gateway/batches/r1.npz", sha256="ab" * 32, size=10)


def _new(round_id: str = "r1", task_id: str = "t1") -> NewRound:
    return NewRound(round_id=round_id, task_id=task_id, models_total=8, batch=BATCH,
                    record_ids=["a", "b", "c"], contributors=["alice", "bob", "alice"])


@pytest.fixture
def db(database_url):
    database = Database(database_url, name="scorer database")
    scorer_store.migrate(database)
    scorer_store.migrate(database)  # at head already: nothing to do
    yield database
    database.dispose()


def _race(claim: Callable[[str], list[str]], claimers: int = 4) -> dict[str, list[str]]:
    """What each of ``claimers`` replicas claiming at the same moment got: ``claim(owner)``."""
    got: dict[str, list[str]] = {}
    barrier = threading.Barrier(claimers)

    def run(owner: str) -> None:
        barrier.wait()
        got[owner] = claim(owner)

    threads = [threading.Thread(target=run, args=(f"s{i}",)) for i in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


class TestRoundStore:
    def test_create_is_idempotent_per_round_id(self, db):
        rounds = SqlRoundStore(db)
        row, created = rounds.create(_new(), owner="s1", lease_s=30, now=100.0)
        assert created
        assert (row.state, row.models_total, row.n_records) == (common_pb2.ROUND_STATE_PENDING, 8, 3)
        assert (row.lease_owner, row.lease_until) == ("s1", 130.0)
        assert row.batch == BATCH and row.record_ids == ["a", "b", "c"]
        assert row.contributors == ["alice", "bob", "alice"] and row.result is None
        again, created = rounds.create(_new(), owner="s2", lease_s=30, now=101.0)
        assert not created and again == row  # the first call's round, untouched
        assert rounds.get("r1") == row and rounds.get("nope") is None
        assert row.status() == common_pb2.RoundStatus(task_id="t1", round_id="r1", state=row.state,
                                                      models_total=8, n_records=3)

    def test_a_live_lease_is_not_claimed(self, db):
        rounds = SqlRoundStore(db)
        rounds.create(_new(), owner="s1", lease_s=30, now=100.0)
        assert rounds.claim_expired(owner="s2", lease_s=30, now=129.0) == []
        assert rounds.renew("r1", owner="s1", lease_s=30, now=120.0)
        assert rounds.claim_expired(owner="s2", lease_s=30, now=140.0) == []  # renewed to 150
        assert not rounds.renew("r1", owner="s2", lease_s=30, now=140.0)  # not s2's to renew

    def test_expired_lease_taken_over_and_old_owner_refused(self, db):
        rounds = SqlRoundStore(db)
        rounds.create(_new(), owner="s1", lease_s=30, now=100.0)
        assert rounds.update("r1", owner="s1", state=common_pb2.ROUND_STATE_FINETUNING, models_done=2)
        [row] = rounds.claim_expired(owner="s2", lease_s=30, now=131.0)
        assert (row.round_id, row.lease_owner, row.lease_until) == ("r1", "s2", 161.0)
        assert (row.state, row.models_done) == (common_pb2.ROUND_STATE_FINETUNING, 2)
        # The old owner (alive after all, or late) writes nothing any more.
        assert not rounds.update("r1", owner="s1", models_done=5)
        assert not rounds.renew("r1", owner="s1", lease_s=30, now=132.0)
        assert not rounds.update("r1", owner="s1", state=common_pb2.ROUND_STATE_DONE)
        assert rounds.get("r1").models_done == 2
        assert rounds.update("r1", owner="s2", models_done=1, message="again")
        assert (rounds.get("r1").models_done, rounds.get("r1").message) == (1, "again")

    def test_two_claimers_exactly_one_wins(self, db):
        rounds = SqlRoundStore(db)
        for i in range(6):
            rounds.create(_new(f"r{i}"), owner="dead", lease_s=1, now=0.0)
        got = _race(lambda owner: [r.round_id for r in rounds.claim_expired(owner=owner, lease_s=30, limit=6,
                                                                            now=10.0)])
        claimed = [rid for ids in got.values() for rid in ids]
        assert sorted(claimed) == [f"r{i}" for i in range(6)]  # each round once, none lost
        for owner, ids in got.items():
            assert all(rounds.get(rid).lease_owner == owner for rid in ids)

    def test_terminal_rounds_are_never_claimed_nor_written(self, db):
        rounds = SqlRoundStore(db)
        rounds.create(_new(), owner="s1", lease_s=30, now=100.0)
        result = common_pb2.BlobRef(bucket="b", key="scorer/rounds/r1/result.pb", sha256="cd" * 32, size=5)
        assert rounds.update("r1", owner="s1", state=common_pb2.ROUND_STATE_DONE, message="scored", result=result)
        row = rounds.get("r1")
        assert (row.state, row.result, row.lease_until) == (common_pb2.ROUND_STATE_DONE, result, None)
        assert row.terminal
        assert rounds.claim_expired(owner="s2", lease_s=30, now=1e12) == []
        assert not rounds.update("r1", owner="s1", state=common_pb2.ROUND_STATE_FAILED)
        assert not rounds.renew("r1", owner="s1", lease_s=30)
        assert rounds.get("r1") == row

    def test_only_a_done_round_grows_and_a_takeover_sees_what_it_grew_from(self, db):
        rounds = SqlRoundStore(db)
        rounds.create(_new(), owner="s1", lease_s=30, now=100.0)
        assert rounds.grow("r1", models_total=12, owner="s1", lease_s=30, message="m") is None  # not DONE
        result = common_pb2.BlobRef(bucket="b", key="scorer/rounds/r1/result.pb", sha256="cd" * 32, size=5)
        assert rounds.update("r1", owner="s1", state=common_pb2.ROUND_STATE_DONE, models_done=8, result=result)
        row = rounds.grow("r1", models_total=12, owner="s2", lease_s=30, message="growing", now=200.0)
        assert (row.state, row.models_total, row.grow_from, row.models_done) == (
            common_pb2.ROUND_STATE_FINETUNING, 12, 8, 8)
        assert (row.lease_owner, row.lease_until, row.result) == ("s2", 230.0, result)  # the result stays
        assert rounds.grow("r1", models_total=16, owner="s3", lease_s=30, message="m") is None  # one at a time
        [taken] = rounds.claim_expired(owner="s3", lease_s=30, now=231.0)  # s2 died: s3 grows it
        assert (taken.grow_from, taken.models_total) == (8, 12)
        assert rounds.update("r1", owner="s3", state=common_pb2.ROUND_STATE_DONE, models_done=12, result=result)
        assert rounds.get("r1").grow_from is None and rounds.get("r1").models_total == 12
        assert rounds.grow("r1", models_total=12, owner="s3", lease_s=30, message="m") is None  # no fewer

    def test_release_hands_rounds_over_at_once(self, db):
        rounds = SqlRoundStore(db)
        rounds.create(_new("r1"), owner="s1", lease_s=30, now=100.0)
        rounds.create(_new("r2"), owner="host-1#old", lease_s=30, now=100.0)
        rounds.create(_new("r3"), owner="host-1#new", lease_s=30, now=100.0)
        rounds.create(_new("r4"), owner="host-10#x", lease_s=30, now=100.0)
        assert rounds.release(["r1"], owner="someone-else") == 0
        assert rounds.release(["r1"], owner="s1") == 1
        assert not rounds.update("r1", owner="s1", models_done=1)  # released: no longer s1's
        assert rounds.release_owners("host-1#", keep="host-1#new") == 1
        claimed = rounds.claim_expired(owner="s9", lease_s=30, now=101.0)
        assert sorted(r.round_id for r in claimed) == ["r1", "r2"]

    def test_prefix_with_like_wildcards_is_literal(self, db):
        rounds = SqlRoundStore(db)
        rounds.create(_new("r1"), owner="a_b#1", lease_s=30, now=100.0)
        rounds.create(_new("r2"), owner="axb#1", lease_s=30, now=100.0)
        assert rounds.release_owners("a_b#", keep="a_b#2") == 1
        assert rounds.get("r2").lease_owner == "axb#1"


class TestOfflineStore:
    def test_put_get_and_refit(self, db):
        offline = SqlOfflineStore(db)
        assert offline.get("t1", "ab" * 32) is None
        g1 = common_pb2.OfflineGaussian(task_id="t1", base_model_sha256="ab" * 32, mu=1.0, sigma=2.0, k=4)
        assert offline.put(g1) == g1
        g2 = common_pb2.OfflineGaussian(task_id="t1", base_model_sha256="ab" * 32, mu=3.0, sigma=4.0, k=4)
        assert offline.put(g2) == g1  # a concurrent fit finds the stored one
        assert offline.get("t1", "ab" * 32) == g1
        assert offline.put(g2, replace=True) == g2  # a refit replaces it
        assert offline.get("t1", "ab" * 32) == g2
        other = common_pb2.OfflineGaussian(task_id="t1", base_model_sha256="cd" * 32, mu=5.0)
        offline.put(other)
        assert offline.get("t1", "cd" * 32) == other and offline.get("t2", "ab" * 32) is None


SHA = "ab" * 32
PREPARING, READY, FAILED = (scorer_pb2.PREPARATION_STATE_PREPARING, scorer_pb2.PREPARATION_STATE_READY,
                            scorer_pb2.PREPARATION_STATE_FAILED)


def _start(preps: SqlPreparationStore, prep_id: str = "p1", *, task_id: str = "t1", owner: str = "s1",
           now: float = 100.0, restart_ready: bool = False):
    return preps.start(task_id, SHA, preparation_id=prep_id, models_total=6, refit=False, owner=owner, lease_s=30,
                       restart_ready=restart_ready, now=now)


class TestPreparationStore:
    """Its leases follow the rounds' rules; a row serves every later preparation of its task and base
    model, so a lease is one run's (its preparation_id), and a replica taking one over starts at model 0."""

    def test_expired_lease_taken_over_from_model_0_and_old_owner_refused(self, db):
        preps = SqlPreparationStore(db)
        row, run_here = _start(preps)
        assert run_here and (row.state, row.lease_owner, row.lease_until) == (PREPARING, "s1", 130.0)
        assert preps.update(row, owner="s1", models_done=2, now=110.0)
        assert preps.claim_expired(owner="s2", lease_s=30, now=129.0) == []
        assert preps.renew(row, owner="s1", lease_s=30, now=120.0)
        assert preps.claim_expired(owner="s2", lease_s=30, now=140.0) == []  # renewed to 150
        assert not preps.renew(row, owner="s2", lease_s=30, now=140.0)
        [taken] = preps.claim_expired(owner="s2", lease_s=30, now=151.0)
        assert (taken.preparation_id, taken.lease_owner, taken.lease_until) == ("p1", "s2", 181.0)
        assert (taken.models_done, taken.run_started_at, taken.started_at) == (0, 151.0, 100.0)
        assert not preps.update(row, owner="s1", models_done=5)
        assert not preps.renew(row, owner="s1", lease_s=30, now=152.0)
        assert preps.get("t1", SHA) == taken
        assert preps.update(taken, owner="s2", state=READY, models_done=6, message="fitted", now=160.0)
        done = preps.get("t1", SHA)
        assert (done.state, done.models_done, done.lease_until, done.ended_at) == (READY, 6, None, 160.0)
        assert done.terminal and preps.claim_expired(owner="s3", lease_s=30, now=1e12) == []
        assert not preps.renew(taken, owner="s2", lease_s=30)
        assert not preps.update(taken, owner="s2", state=FAILED)
        assert preps.get("t1", SHA) == done

    def test_start_joins_a_live_one_and_takes_over_an_expired_one(self, db):
        preps = SqlPreparationStore(db)
        first, _ = _start(preps)
        assert _start(preps, "p2", owner="s2", now=120.0) == (first, False)  # runs elsewhere: joined
        row, run_here = _start(preps, "p2", owner="s2", now=131.0)
        assert run_here and (row.preparation_id, row.lease_owner, row.lease_until) == ("p1", "s2", 161.0)
        assert (row.models_done, row.run_started_at, row.started_at) == (0, 131.0, 100.0)
        assert not preps.update(first, owner="s1", models_done=1)

    def test_a_lease_never_reaches_a_later_run_of_the_same_row(self, db):
        preps = SqlPreparationStore(db)
        first, _ = _start(preps)
        assert preps.update(first, owner="s1", state=FAILED, message="boom", now=110.0)
        second, run_here = _start(preps, "p2", now=120.0)  # a FAILED one is replaced, same owner
        assert run_here and (second.preparation_id, second.state) == ("p2", PREPARING)
        assert not preps.update(first, owner="s1", models_done=3)
        assert not preps.renew(first, owner="s1", lease_s=30)
        assert preps.release([first], owner="s1") == 0
        assert preps.get("t1", SHA) == second

    def test_claims_take_the_longest_expired_first(self, db):
        preps = SqlPreparationStore(db)
        for i in (2, 0, 1):
            _start(preps, f"p{i}", task_id=f"t{i}", now=100.0 + i)
        assert [r.task_id for r in preps.claim_expired(owner="s9", lease_s=30, limit=2, now=200.0)] == ["t0", "t1"]
        assert [r.task_id for r in preps.claim_expired(owner="s9", lease_s=30, limit=2, now=200.0)] == ["t2"]

    def test_two_claimers_exactly_one_wins(self, db):
        preps = SqlPreparationStore(db)
        for i in range(6):
            _start(preps, f"p{i}", task_id=f"t{i}", owner="dead", now=0.0)
        got = _race(lambda owner: [r.task_id for r in preps.claim_expired(owner=owner, lease_s=30, limit=6,
                                                                          now=100.0)])
        assert sorted(t for ids in got.values() for t in ids) == [f"t{i}" for i in range(6)]
        for owner, ids in got.items():
            assert all(preps.get(t, SHA).lease_owner == owner for t in ids)

    def test_release_hands_preparations_over_at_once(self, db):
        preps = SqlPreparationStore(db)
        owners = ["s1", "s1", "host-1#old", "host-1#new", "a_b#1", "axb#1"]
        rows = [_start(preps, f"p{i}", task_id=f"t{i}", owner=o)[0] for i, o in enumerate(owners)]
        assert preps.release(rows[:2], owner="someone-else") == 0
        assert preps.release(rows[:2], owner="s1") == 2
        assert not preps.update(rows[0], owner="s1", models_done=1)  # released: no longer s1's
        assert preps.release_owners("host-1#", keep="host-1#new") == 1
        assert preps.release_owners("a_b#", keep="a_b#2") == 1  # "_" is no wildcard: axb#1 keeps its lease
        claimed = preps.claim_expired(owner="s9", lease_s=30, now=101.0)
        assert sorted(r.task_id for r in claimed) == ["t0", "t1", "t2", "t4"]
        assert preps.get("t5", SHA).lease_owner == "axb#1"


# -- replicas: a round taken over after its owner died ------------------------------------------

def scripted_result(job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
    """A job's answer without fine-tuning: phi of model i on record j drawn from the model's seed,
    shifted up where the record trained the model (deterministic, as real jobs are given seeds and masks)."""
    rows = []
    for spec in job.models:
        member = np.frombuffer(spec.mask, dtype=np.uint8).astype(bool)
        rows.append(np.random.default_rng(spec.seed).normal(size=len(member)) + 1.5 * member)
    return worker_pb2.RunJobResponse(job_id=job.job_id, model_indices=[s.index for s in job.models],
                                     phi=serde.tensor_from_array(np.array(rows)), seconds=0.01)


class ScriptedPool:
    """Stands in for the worker pool, answering each job in turn with :func:`scripted_result`.
    ``hang_after``: jobs this pool finishes before it hangs for good (its replica died)."""

    parallelism = 1

    def __init__(self, hang_after: int | None = None) -> None:
        self.hang_after = hang_after
        self.done = 0
        self.hung = threading.Event()
        self.never = threading.Event()

    def run_all(self, jobs, on_done, *, on_task_error=None):
        results = []
        for job in jobs:
            if self.hang_after is not None and self.done >= self.hang_after:
                self.hung.set()
                self.never.wait()
                raise RuntimeError("this replica is dead")
            result = scripted_result(job)
            self.done += 1
            results.append(result)
            on_done(result)
        return results


def _task(task_id: str = "t1") -> registry_pb2.Task:
    ref = common_pb2.BlobRef(bucket="b", key="k", sha256="ee" * 32, size=1)
    return registry_pb2.Task(task_id=task_id, owner="acme", ready=True, base_model=ref, strategy=ref,
                             builder_data=ref, settings=common_pb2.TaskSettings(
                                 n_models=8, models_per_job=1, seed=7, alpha=0.05,
                                 method=common_pb2.METHOD_ONLINE_PER_RECORD))


def _scorer(store, db, pool, replica: str, lease_s: float, *, rounds: SqlRoundStore | None = None) -> Scorer:
    return Scorer(store, lambda task_id: _task(task_id), pool, rounds=rounds or SqlRoundStore(db),
                  offline=SqlOfflineStore(db), preparations=SqlPreparationStore(db), replica_id=replica,
                  lease_s=lease_s, poll_s=0.05)


def _wait_end(scorer: Scorer, round_id: str, timeout: float = 30) -> common_pb2.RoundStatus:
    """The round's status once DONE or FAILED (or as it is after ``timeout``)."""
    deadline = time.monotonic() + timeout
    for status in scorer.watch(round_id, is_active=lambda: time.monotonic() < deadline, who=SELF):
        last = status
    return last


def _wait_done(scorer: Scorer, round_id: str, timeout: float = 30) -> common_pb2.RoundStatus:
    last = _wait_end(scorer, round_id, timeout)
    assert last.state == common_pb2.ROUND_STATE_DONE, last
    return last


def test_a_replica_takes_over_a_round_whose_owner_died(db, store):
    m = 12
    batch = store.put_bytes("gateway/batches/b1.npz",
                            archives.records_to_npz(np.zeros((m, 1, 8, 8), np.float32), np.zeros(m, np.int64)))
    ids, who = [f"rec{j}" for j in range(m)], [f"c{j % 3}" for j in range(m)]

    # The reference: one replica, no trouble.
    normal = _scorer(store, db, ScriptedPool(), "normal", lease_s=30)
    normal.start_round("t1", "ref", batch, ids, who, SELF)
    _wait_done(normal, "ref")
    expected = normal.get_result("ref", SELF)

    # Replica a stores and runs the round, then dies after 3 of 8 models (no renewals, no more writes).
    dead_pool = ScriptedPool(hang_after=3)
    a = _scorer(store, db, dead_pool, "replica-a", lease_s=1.0)
    b = _scorer(store, db, ScriptedPool(), "replica-b", lease_s=1.0)
    a.start_round("t1", "r1", batch, ids, who, SELF)
    assert dead_pool.hung.wait(10)
    assert b.start_round("t1", "r1", batch, ids, who, SELF).models_done == 3  # stored once, a's
    b.start()  # b's lease loop: it claims the round once a's lease has run out
    try:
        status = _wait_done(b, "r1")
        row = SqlRoundStore(db).get("r1")
        assert row.lease_owner == b.owner and status.models_done == 8
        # Any replica serves the result from the database; the scores are those of a normal run.
        result = a.get_result("r1", SELF)
        assert result == b.get_result("r1", SELF)
        assert [(s.record_id, s.contributor, s.counted_p, s.counted_p_ci_low, s.counted_p_ci_high, s.auc) for s in result.scores] == \
            [(s.record_id, s.contributor, s.counted_p, s.counted_p_ci_low, s.counted_p_ci_high, s.auc) for s in expected.scores]
        assert result.batch.auc == expected.batch.auc
        # a, back from the dead, writes nothing any more.
        assert not SqlRoundStore(db).update("r1", owner=a.owner, models_done=1)
    finally:
        b.close()
        _bury(a, dead_pool)
    assert SqlRoundStore(db).get("r1").state == common_pb2.ROUND_STATE_DONE


def test_stopping_a_replica_hands_its_rounds_over_at_once(db, store):
    m = 12
    batch = store.put_bytes("gateway/batches/b2.npz",
                            archives.records_to_npz(np.zeros((m, 1, 8, 8), np.float32), np.zeros(m, np.int64)))
    pool = ScriptedPool(hang_after=2)
    a = _scorer(store, db, pool, "replica-a", lease_s=600)
    a.start_round("t1", "r2", batch, [f"rec{j}" for j in range(m)], ["c"] * m, SELF)
    assert pool.hung.wait(10)
    a.close()  # graceful stop: the lease is released, not left to run out
    b = _scorer(store, db, ScriptedPool(), "replica-b", lease_s=600)
    b.start()
    try:
        assert _wait_done(b, "r2").models_done == 8
    finally:
        b.close()
        _bury(a, pool)


def _bury(dead, pool: ScriptedPool) -> None:
    """Let a "dead" replica's hung threads end (they fail and log) while the test still captures
    their log lines, instead of after it, into a closed stream."""
    pool.never.set()
    deadline = time.monotonic() + 10
    while (dead._runs or dead._preps) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_an_unreachable_database_is_unavailable():
    from ftps.common.errors import Unavailable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Database(f"postgresql+psycopg://nobody@127.0.0.1:{port}/none", name="scorer database")
    with pytest.raises(Unavailable, match="scorer database unavailable"):
        SqlRoundStore(db).get("r1")
    with pytest.raises(Unavailable):
        SqlOfflineStore(db).put(common_pb2.OfflineGaussian(task_id="t1", base_model_sha256="ab" * 32))
