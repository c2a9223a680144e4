"""The contract of the gateway's SubmissionStore, on every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest

from ftps.common.clock import to_ts
from ftps.common.db import Database
from ftps.common.errors import InvalidArgument, ResourceExhausted
from ftps.v1 import common_pb2, gateway_pb2
from services.contributor_gateway.store import SqlSubmissionStore, record_ids

PENDING = gateway_pb2.SUBMISSION_STATE_PENDING
IN_ROUND = gateway_pb2.SUBMISSION_STATE_IN_ROUND
SCORED = gateway_pb2.SUBMISSION_STATE_SCORED
FAILED = gateway_pb2.SUBMISSION_STATE_FAILED


def _sub(sid: str, n: int = 2, *, task: str = "t-1", who: str = "alice", at: str = "") -> gateway_pb2.Submission:
    return gateway_pb2.Submission(submission_id=sid, task_id=task, contributor=who, record_ids=record_ids(sid, n),
                                  state=PENDING, created_at=to_ts(at or f"2024-01-01T00:00:00.{sid[-3:]}Z"))


class TestSubmissionStoreContract:
    @pytest.fixture
    def store(self, database_url):
        db = Database(database_url, name="gateway database")
        yield SqlSubmissionStore.open(db)
        db.dispose()

    def test_add_is_idempotent_and_get_returns_it(self, store):
        first = store.add(_sub("s-001", 3))
        again = store.add(_sub("s-001", 5))  # a retry: the first acknowledgement stands
        assert again == first and len(again.record_ids) == 3
        assert store.get("s-001") == first and store.get("s-404") is None

    def test_pending_counts_and_the_contributor_limit(self, store):
        store.add(_sub("s-001", 3))
        store.add(_sub("s-002", 4, who="bob"))
        store.add(_sub("s-003", 1, task="t-2"))
        assert store.pending_records("t-1") == 7 and store.pending_records("t-1", "bob") == 4
        assert store.pending_records("t-9") == 0
        with pytest.raises(ResourceExhausted, match="would have 9 records pending; at most 8"):
            store.add(_sub("s-004", 5, who="bob"), max_pending=8)
        assert store.get("s-004") is None

    def test_claim_takes_every_pending_submission_in_arrival_order_or_nothing(self, store):
        for i in range(3):
            store.add(_sub(f"s-00{i}", 2, who=f"c{i}"))
        assert store.claim("t-1", "r-a", at_least=7).submissions == []  # too few: nothing changes
        few = store.claim("t-1", "r-a", at_least=6, at_least_contributors=4)  # records enough, people not
        assert few.submissions == [] and (few.pending, few.contributors) == (6, 3)
        claim = store.claim("t-1", "r-a", at_least=6, now=100.0)
        assert claim.pending == 6 and [s.submission_id for s in claim.submissions] == ["s-000", "s-001", "s-002"]
        assert store.get("s-001").state == IN_ROUND and store.get("s-001").round_id == "r-a"
        assert store.pending_records("t-1") == 0 and store.claim("t-1", "r-b", at_least=1).pending == 0
        ref = store.round("r-a")
        assert (ref.task_id, ref.n_records, ref.claimed_at, ref.handed_at) == ("t-1", 6, 100.0, None)
        assert [r.round_id for r in store.open_rounds()] == ["r-a"]
        assert store.has_records_in("r-a", "c2") and not store.has_records_in("r-a", "zed")

    def test_done_round_scores_its_submissions_and_fails_excluded_ones(self, store):
        store.add(_sub("s-001", 2))
        store.add(_sub("s-002", 2, who="bob"))
        store.claim("t-1", "r-a", at_least=2)
        excluded = [common_pb2.ExcludedRecord(record_id="s-002-1", reason="NaN loss")]
        assert store.apply_done("r-a", excluded) == 2
        assert store.apply_done("r-a", excluded) == 0  # idempotent
        assert store.get("s-001").state == SCORED
        bob = store.get("s-002")
        assert bob.state == FAILED and bob.round_id == "r-a"
        assert bob.failure_reason == "record s-002-1 (#1 of the submission) left out of round r-a: NaN loss"
        assert store.scored_rounds("t-1") == ["r-a"] and store.scored_rounds("t-1", contributor="carol") == []
        assert store.open_rounds() == []

    def test_failed_rounds_requeue_once_then_fail(self, store):
        store.add(_sub("s-001", 2))
        store.claim("t-1", "r-a", at_least=2)
        assert store.apply_failed("r-a", "boom") == 1 and store.apply_failed("r-a", "boom") == 0
        s = store.get("s-001")
        assert (s.state, s.round_id, s.failed_rounds, s.failure_reason) == (PENDING, "", 1, "")
        store.claim("t-1", "r-b", at_least=2)
        store.apply_failed("r-b", "again")
        s = store.get("s-001")
        assert (s.state, s.round_id, s.failed_rounds) == (FAILED, "", 2)
        assert s.failure_reason == ("2 rounds holding these records failed; not retried automatically "
                                    "(submit again to retry). Last: again")
        assert store.scored_rounds("t-1") == [] and store.pending_records("t-1") == 0

    def test_an_unstarted_round_is_released_after_the_grace_and_cannot_start_then(self, store):
        store.add(_sub("s-001", 2))
        store.claim("t-1", "r-a", at_least=2, now=100.0)
        assert store.release("r-a", not_since=50.0) == 0  # still within its grace
        assert store.hand_over("r-a", common_pb2.BlobRef(key="k", sha256="x"), now=200.0)
        assert store.release("r-a", not_since=150.0) == 0  # handed over since: the grace starts again
        assert store.release("r-a", not_since=250.0) == 1
        s = store.get("s-001")
        assert (s.state, s.round_id, s.failed_rounds) == (PENDING, "", 0)  # no failure counted
        assert not store.hand_over("r-a", common_pb2.BlobRef(key="k", sha256="x"))
        assert store.round("r-a").released_at is not None and store.open_rounds() == []

    def test_list_submissions_pages_in_arrival_order(self, store):
        for i in range(5):
            store.add(_sub(f"s-00{i}", 1, task="t-1" if i % 2 else "t-2"))
        store.add(_sub("s-009", 1, who="bob"))
        seen, token = [], ""
        while True:
            page, token = store.list_submissions(contributor="alice", page_size=2, page_token=token)
            seen += [s.submission_id for s in page]
            if not token:
                break
        assert seen == [f"s-00{i}" for i in range(5)]
        page, token = store.list_submissions(contributor="alice", task_id="t-1")
        assert [s.submission_id for s in page] == ["s-001", "s-003"] and token == ""
        with pytest.raises(InvalidArgument):
            store.list_submissions(page_token="not-a-token")

    def test_concurrent_claims_put_every_submission_in_exactly_one_round(self, store):
        for i in range(60):
            store.add(_sub(f"s-{i:03d}", 1, who=f"c{i % 7}"))
        claims, errors = {}, []

        def claim(k: int) -> None:
            try:
                for j in range(5):
                    got = store.claim("t-1", f"r-{k}-{j}", at_least=1)
                    if got.submissions:
                        claims[f"r-{k}-{j}"] = [s.submission_id for s in got.submissions]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=claim, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        held = [sid for ids in claims.values() for sid in ids]
        assert sorted(held) == [f"s-{i:03d}" for i in range(60)]  # each once: none twice, none lost
        for rid, ids in claims.items():
            assert {store.get(sid).round_id for sid in ids} == {rid}
