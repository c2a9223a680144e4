"""The scorer's store contract (services.lira_scorer.store), one class run on SQLite and PostgreSQL:
idempotent creation, leases (claim, renew, takeover after expiry, writes of a lost lease refused),
offline Gaussians; and two Scorer replicas on one database: a round whose owner dies is taken
over after its lease and finished with the scores of a normal run."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from ftps.common import serde
from ftps.common.db import Database
from ftps.v1 import common_pb2, registry_pb2, worker_pb2
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
        got: dict[str, list[str]] = {}
        barrier = threading.Barrier(4)

        def claim(owner: str) -> None:
            barrier.wait()
            got[owner] = [r.round_id for r in rounds.claim_expired(owner=owner, lease_s=30, limit=6, now=10.0)]

        threads = [threading.Thread(target=claim, args=(f"s{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
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


# -- replicas: a round taken over after its owner died ------------------------------------------

class ScriptedPool:
    """Stands in for the worker pool: phi of model i on record j drawn from the model's seed, shifted
    up where the record trained the model (deterministic, as real jobs are given seeds and masks).
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
            rows = []
            for spec in job.models:
                member = np.frombuffer(spec.mask, dtype=np.uint8).astype(bool)
                rows.append(np.random.default_rng(spec.seed).normal(size=len(member)) + 1.5 * member)
            result = worker_pb2.RunJobResponse(job_id=job.job_id, model_indices=[s.index for s in job.models],
                                               phi=serde.tensor_from_array(np.array(rows)), seconds=0.01)
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


def _scorer(store, db, pool, replica: str, lease_s: float) -> Scorer:
    return Scorer(store, lambda task_id: _task(task_id), pool, rounds=SqlRoundStore(db),
                  offline=SqlOfflineStore(db), preparations=SqlPreparationStore(db), replica_id=replica, lease_s=lease_s, poll_s=0.05)


def _wait_done(scorer: Scorer, round_id: str, timeout: float = 30) -> common_pb2.RoundStatus:
    deadline = time.monotonic() + timeout
    for status in scorer.watch(round_id, is_active=lambda: time.monotonic() < deadline, who=SELF):
        last = status
    assert last.state == common_pb2.ROUND_STATE_DONE, last
    return last


def test_a_replica_takes_over_a_round_whose_owner_died(db, store):
    m = 12
    batch = store.put_bytes("gateway/batches/b1.npz",
                            serde.records_to_npz(np.zeros((m, 1, 8, 8), np.float32), np.zeros(m, np.int64)))
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
                            serde.records_to_npz(np.zeros((m, 1, 8, 8), np.float32), np.zeros(m, np.int64)))
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
