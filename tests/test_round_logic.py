"""The scorer's round logic on its own (issue 20): services.lira_scorer.rounds.Scorer over a SQLite
database and a blob folder, with scripted pools (tests/test_scorer_store.py) or the real worker pool
talking gRPC to a stand-in worker on 127.0.0.1:0. No registry, gateway or real fine-tuning: a round's
states and progress, task errors, a lost lease, a missing batch and a replica stopping, in seconds."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import pytest

from ftps.common import archives, rpc_status, serde
from ftps.common.db import Database
from ftps.common.errors import FailedPrecondition, FtpsError
from ftps.common.storage import FileBlobStore
from ftps.privacy import scoring
from ftps.privacy.masks import derive_seed, make_masks, model_seeds
from ftps.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.lira_scorer import store as scorer_store
from services.lira_scorer.rounds import SELF
from services.lira_scorer.store import SqlRoundStore
from tests.test_scorer_store import (ScriptedPool, _bury, _scorer, _task, _wait_done, _wait_end,
                                     scripted_result)
from tests.test_worker_pool import _pool, serve  # noqa: F401 - serve is a fixture

PENDING, FINETUNING, SCORING = (common_pb2.ROUND_STATE_PENDING, common_pb2.ROUND_STATE_FINETUNING,
                                common_pb2.ROUND_STATE_SCORING)
DONE, FAILED = common_pb2.ROUND_STATE_DONE, common_pb2.ROUND_STATE_FAILED
M = 12
IDS = [f"rec{j}" for j in range(M)]
WHO = [f"c{j % 3}" for j in range(M)]
N = _task().settings.n_models

# grpc's connectivity poller may outlive pool.close() and raise "Channel closed!" in its own thread
# (as in tests/test_worker_pool.py): harmless.
grpc_pool = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/scorer.db", name="scorer database")
    scorer_store.migrate(database)
    yield database
    database.dispose()


@pytest.fixture
def blobs(tmp_path):
    store = FileBlobStore(tmp_path / "blobs", "b")
    store.ensure_bucket()
    return store


def _batch(blobs, key: str = "gateway/batches/b1.npz") -> common_pb2.BlobRef:
    x = np.random.default_rng(0).normal(size=(M, 1, 8, 8)).astype(np.float32)
    return blobs.put_bytes(key, archives.records_to_npz(x, np.arange(M) % 10))


class RecordedRounds(SqlRoundStore):
    """The round store, keeping every progress write asked of it: (owner, fields set, written)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.writes: list[tuple[str, dict, bool]] = []

    def update(self, round_id, *, owner, **fields):
        written = super().update(round_id, owner=owner, **fields)
        self.writes.append((owner, {k: v for k, v in fields.items() if v is not None}, written))
        return written


class StagedPool(ScriptedPool):
    """A scripted pool that pauses before its job number ``pause_after`` until ``resume`` is set (a
    slow replica, not a dead one), and fails each job ``fails(job)`` gives a reason for with that
    task error, as a worker whose strategy raised does."""

    def __init__(self, *, pause_after: int | None = None,
                 fails: Callable[[worker_pb2.FinetuneJob], str | None] = lambda job: None) -> None:
        super().__init__()
        self.pause_after, self.fails = pause_after, fails
        self.paused, self.resume = threading.Event(), threading.Event()

    def run_all(self, jobs, on_done, *, on_task_error=None):
        results = []
        for job in jobs:
            if self.done == self.pause_after:
                self.paused.set()
                self.resume.wait(30)
            reason = self.fails(job)
            if reason is None:
                results += super().run_all([job], on_done)
                continue
            exc = FailedPrecondition(reason, reason="STRATEGY_FAILED")
            if on_task_error is None:
                raise exc
            on_task_error(job, exc)
        return results


class BatchWorker(worker_pb2_grpc.FinetuneWorkerServiceServicer):
    """A stand-in fine-tune worker: reads the job's records from the blob store as a real worker does
    (a missing blob is its NOT_FOUND), holds the job until ``go`` is set, then answers with
    :func:`scripted_result`. ``seen``: the job ids it was sent."""

    def __init__(self, blobs) -> None:
        self.blobs = blobs
        self.seen: list[str] = []
        self.go = threading.Event()
        self.go.set()

    def RunJob(self, request, context):
        job = request.job
        self.seen.append(job.job_id)
        self.go.wait(30)
        try:
            self.blobs.get_ref(job.records)
        except FtpsError as exc:
            rpc_status.abort(context, exc)
        return scripted_result(job)


def _until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (asked every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _scores(result: common_pb2.RoundResult) -> list[tuple]:
    return [(s.record_id, s.contributor, s.score, s.counted_p, s.auc) for s in result.scores]


def test_a_round_runs_pending_finetuning_scoring_done_writing_its_progress(db, blobs):
    rounds = RecordedRounds(db)
    scorer = _scorer(blobs, db, ScriptedPool(), "replica-a", lease_s=30, rounds=rounds)
    batch = _batch(blobs)
    started = scorer.start_round("t1", "r1", batch, IDS, WHO, SELF)
    assert (started.state, started.models_done, started.models_total, started.n_records) == (PENDING, 0, N, M)
    final = _wait_done(scorer, "r1")
    assert final.models_done == N and final.message == f"done: scored {M} of {M} records with {N} models"

    assert all(owner == scorer.owner and written for owner, _, written in rounds.writes)
    assert [f["state"] for _, f, _ in rounds.writes if "state" in f] == [FINETUNING, SCORING, DONE]
    # One progress write per model fine-tuned, after the FINETUNING write that resets the count.
    assert [f["models_done"] for _, f, _ in rounds.writes if "models_done" in f] == list(range(N + 1))
    row = rounds.get("r1")
    assert (row.state, row.lease_until) == (DONE, None) and row.result.key.startswith("scorer/rounds/r1/result-")

    # PHI as the jobs answered it, one row per model in model order, with Algorithm 1's masks seeded
    # by the batch's content.
    seed = derive_seed(_task().settings.seed, batch.sha256)
    masks = make_masks(N, M, seed=seed)
    stored = archives.npz_arrays(blobs.get_bytes("scorer/rounds/r1/phi.npz"))
    np.testing.assert_array_equal(stored["y"], masks)
    expected_phi = np.concatenate([serde.array_from_tensor(scripted_result(worker_pb2.FinetuneJob(models=[
        worker_pb2.ModelSpec(index=i, seed=s, mask=masks[i].astype(np.uint8).tobytes())])).phi)
        for i, s in enumerate(model_seeds(seed, N))])
    np.testing.assert_allclose(stored["x"], expected_phi)
    # The headline scores are the maths' on that PHI, record by record in the batch's order.
    result = scorer.get_result("r1", SELF)
    headline = scoring.score(expected_phi, masks, method="online-per-record", alpha=0.05).records
    assert [(s.record_id, s.contributor, s.index) for s in result.scores] == list(zip(IDS, WHO, range(M)))
    np.testing.assert_allclose([s.counted_p for s in result.scores], headline.counted_p)
    np.testing.assert_allclose([s.score for s in result.scores], headline.score)
    assert result.status.state == DONE and result.batch.n_models == N and not result.excluded


def test_a_task_error_on_every_model_fails_the_round_with_its_reason(db, blobs):
    pool = StagedPool(fails=lambda job: f"the strategy raised ValueError: no gradient in {job.job_id}")
    rounds = RecordedRounds(db)
    scorer = _scorer(blobs, db, pool, "replica-a", lease_s=30, rounds=rounds)
    scorer.start_round("t1", "r1", _batch(blobs), IDS, WHO, SELF)
    final = _wait_end(scorer, "r1")
    assert final.state == FAILED
    assert final.message.startswith(f"fine-tuning failed on {N} of {N} models, not traced to particular records")
    assert "the strategy raised ValueError: no gradient in r1-j0" in final.message
    assert rounds.writes[-1] == (scorer.owner, {"state": FAILED, "message": final.message}, True)
    row = rounds.get("r1")
    assert (row.lease_until, row.result) == (None, None)
    assert scorer.get_result("r1", SELF) == common_pb2.RoundResult(status=final)  # a status, no scores


def test_a_task_error_traced_to_a_record_leaves_it_out_and_scores_the_rest(db, blobs):
    batch = _batch(blobs)

    def fails(job):  # the models record 0 trained, in the first pass (on the batch as it came)
        spec = job.models[0]
        if job.records.key == batch.key and np.frombuffer(spec.mask, np.uint8)[0]:
            return f"model {spec.index}: loss is NaN"
        return None

    scorer = _scorer(blobs, db, StagedPool(fails=fails), "replica-a", lease_s=30)
    scorer.start_round("t1", "r1", batch, IDS, WHO, SELF)
    final = _wait_done(scorer, "r1")
    result = scorer.get_result("r1", SELF)
    # Blamed: record 0, and any record that trained exactly the models it trained (none sound).
    masks = make_masks(N, M, seed=derive_seed(_task().settings.seed, batch.sha256))
    blamed = [j for j in range(M) if (masks[:, j] == masks[:, 0]).all()]
    assert [e.record_id for e in result.excluded] == [IDS[j] for j in blamed]
    assert all(e.reason.endswith("loss is NaN") for e in result.excluded)
    kept = [IDS[j] for j in range(M) if j not in blamed]
    assert [s.record_id for s in result.scores] == kept and final.message.startswith(f"done: scored {len(kept)} of")
    # The second pass ran on the batch without them, stored under this run's name.
    [again] = blobs.list_keys("scorer/rounds/r1/batch-a1-")
    x = archives.npz_arrays(blobs.get_ref(batch))["x"]
    np.testing.assert_array_equal(archives.npz_arrays(blobs.get_bytes(again))["x"], np.delete(x, blamed, axis=0))


def test_a_lost_lease_stops_the_old_owners_writes_and_another_replica_finishes_the_round(db, blobs, caplog):
    batch = _batch(blobs)
    normal = _scorer(blobs, db, ScriptedPool(), "normal", lease_s=30)
    normal.start_round("t1", "ref", batch, IDS, WHO, SELF)
    _wait_done(normal, "ref")
    expected = normal.get_result("ref", SELF)

    rounds = RecordedRounds(db)
    slow, b_pool = StagedPool(pause_after=3), StagedPool(pause_after=2)
    # No lease loop on a: its short lease is never renewed and runs out while its pool is slow.
    a = _scorer(blobs, db, slow, "replica-a", lease_s=0.2, rounds=rounds)
    b = _scorer(blobs, db, b_pool, "replica-b", lease_s=30)
    a.start_round("t1", "r1", batch, IDS, WHO, SELF)
    try:
        assert slow.paused.wait(10)

        def taken_over() -> bool:
            b.tick()  # b's lease loop, one pass: it claims the round once a's lease ran out
            return SqlRoundStore(db).get("r1").lease_owner == b.owner

        assert _until(taken_over)
        # a wakes up while b runs the round again (b's pool paused after 2 models) and reports a model.
        assert b_pool.paused.wait(10)
        with caplog.at_level(logging.WARNING, logger="services.lira_scorer.rounds"):
            slow.resume.set()
            assert _until(lambda: not a._runs)
        assert "round r1: no longer this replica's (lease lost)" in caplog.text
        row = SqlRoundStore(db).get("r1")
        assert (row.state, row.models_done, row.lease_owner) == (FINETUNING, 2, b.owner)  # b's progress
        b_pool.resume.set()
        status = _wait_done(b, "r1")
    finally:
        slow.resume.set()
        b_pool.resume.set()
        _bury(a, slow)
    # a's first write after b took over was refused, and a wrote nor fine-tuned anything after it.
    mine = [(f, written) for owner, f, written in rounds.writes if owner == a.owner]
    assert mine[-1] == ({"models_done": 4}, False) and all(written for _, written in mine[:-1])
    assert slow.done == 4
    row = SqlRoundStore(db).get("r1")
    assert (row.state, row.lease_owner, status.models_done) == (DONE, b.owner, N)
    result = a.get_result("r1", SELF)
    assert result == b.get_result("r1", SELF) and _scores(result) == _scores(expected)
    assert result.batch.auc == expected.batch.auc


@grpc_pool
def test_a_round_whose_batch_is_missing_fails_saying_which(db, blobs, serve):  # noqa: F811
    worker = BatchWorker(blobs)
    pool = _pool([serve(worker)])
    scorer = _scorer(blobs, db, pool, "replica-a", lease_s=30)
    gone = common_pb2.BlobRef(bucket="b", key="gateway/batches/gone.npz", sha256="ab" * 32, size=10)
    try:
        scorer.start_round("t1", "r1", gone, IDS, WHO, SELF)
        final = _wait_end(scorer, "r1")
    finally:
        pool.close()
    assert final.state == FAILED and "gateway/batches/gone.npz is no longer in object storage" in final.message
    # the scorer saw it before fanning out: no worker was asked for a batch that is not there
    assert not worker.seen and SqlRoundStore(db).get("r1").lease_until is None


def test_closing_a_replica_stops_its_round_and_hands_it_over_at_once(db, blobs):
    slow = StagedPool(pause_after=3)
    a = _scorer(blobs, db, slow, "replica-a", lease_s=600)
    a.start_round("t1", "r1", _batch(blobs), IDS, WHO, SELF)
    b = _scorer(blobs, db, ScriptedPool(), "replica-b", lease_s=600)
    try:
        assert slow.paused.wait(10)
        a.close()
        row = SqlRoundStore(db).get("r1")
        assert (row.state, row.models_done, row.lease_owner, row.lease_until) == (FINETUNING, 3, None, None)
        slow.resume.set()
        assert _until(lambda: not a._runs)
        # The job running at close ended; a wrote nothing more and started none of the jobs queued.
        assert slow.done == 4 and SqlRoundStore(db).get("r1") == row
        b.tick()  # released: claimed at once, not after a's 600 s lease
        assert _wait_done(b, "r1").models_done == N
    finally:
        slow.resume.set()
        _bury(a, slow)


@grpc_pool
def test_closing_a_replica_cancels_the_jobs_queued_in_its_worker_pool(db, blobs, serve):  # noqa: F811
    worker = BatchWorker(blobs)
    worker.go.clear()
    pool = _pool([serve(worker)], jobs_per_worker=1)  # one job at a time: the others wait in the queue
    a = _scorer(blobs, db, pool, "replica-a", lease_s=600)
    try:
        a.start_round("t1", "r1", _batch(blobs), IDS, WHO, SELF)
        assert _until(lambda: len(worker.seen) == 1)
        a.close()
        worker.go.set()
        assert _until(lambda: not a._runs)
    finally:
        worker.go.set()
        pool.close()
    assert len(worker.seen) < N  # the queued jobs were cancelled, never sent
    row = SqlRoundStore(db).get("r1")
    assert (row.state, row.models_done, row.lease_owner) == (FINETUNING, 0, None)
