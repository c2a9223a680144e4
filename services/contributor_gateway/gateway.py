"""Submissions, batching into rounds, results fan-out: the contributor gateway's domain logic.

Object layout::

    gateway/tasks/{task_id}/submissions/{submission_id}/records.npz     written first
    gateway/tasks/{task_id}/submissions/{submission_id}/submission.json written second = the ack
    gateway/rounds/{round_id}/batch.npz     the round's records, in round order
    gateway/rounds/{round_id}/round.json    members, state
    gateway/rounds/{round_id}/result.json   the scorer's RoundResult, once done
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
from google.protobuf import json_format

from ftps.common import serde
from ftps.common.auth import Principal, authorized_task, denied
from ftps.common.errors import (FailedPrecondition, FtpsError, InvalidArgument, NotFound,
                                PermissionDenied, ResourceExhausted)
from ftps.common.records import validate_records
from ftps.common.storage import ObjectStore, check_id
from ftps.common.task_rules import min_records
from ftps.v1 import common_pb2, gateway_pb2, registry_pb2

log = logging.getLogger(__name__)

TERMINAL = (common_pb2.ROUND_STATE_DONE, common_pb2.ROUND_STATE_FAILED)
# The gateway acting on its own: the round it starts when a task's batch threshold is reached.
SELF = Principal("contributor-gateway", "service")


class ScorerPort(Protocol):
    """What the gateway needs from the scorer (gRPC in production, anything in tests)."""

    def start_round(self, task_id: str, round_id: str, batch: common_pb2.BlobRef,
                    record_ids: list[str], contributors: list[str]) -> common_pb2.RoundStatus: ...

    def watch_round(self, round_id: str) -> Iterator[common_pb2.RoundStatus]: ...

    def get_result(self, round_id: str) -> common_pb2.RoundResult: ...


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class RoundEntry:
    round_id: str
    task_id: str
    submission_ids: list[str]
    record_ids: list[str]
    contributors: list[str]
    batch: common_pb2.BlobRef
    status: common_pb2.RoundStatus
    result: common_pb2.RoundResult | None = None

    def to_json(self) -> dict:
        return {"round_id": self.round_id, "task_id": self.task_id,
                "submission_ids": self.submission_ids, "record_ids": self.record_ids,
                "contributors": self.contributors, "batch": json_format.MessageToDict(self.batch),
                "status": json_format.MessageToDict(self.status)}

    @classmethod
    def from_json(cls, d: dict) -> "RoundEntry":
        return cls(round_id=d["round_id"], task_id=d["task_id"], submission_ids=d["submission_ids"],
                   record_ids=d["record_ids"], contributors=d["contributors"],
                   batch=json_format.ParseDict(d["batch"], common_pb2.BlobRef()),
                   status=json_format.ParseDict(d["status"], common_pb2.RoundStatus()))


class Gateway:
    def __init__(self, store: ObjectStore, get_task: Callable[[str], registry_pb2.Task],
                 scorer: ScorerPort, *, max_records_per_request: int = 10_000,
                 max_pending_per_contributor: int = 100_000) -> None:
        self._store = store
        self._get_task = get_task
        self._scorer = scorer
        self._max_request = max_records_per_request
        self._max_pending = max_pending_per_contributor
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._subs: dict[str, gateway_pb2.Submission] = {}
        self._submit_locks: dict[tuple[str, str], threading.Lock] = {}
        self._rounds: dict[str, RoundEntry] = {}
        self._closed = threading.Event()
        self._load()

    def close(self) -> None:
        """Stop following rounds (the server stopped; a new gateway re-attaches from storage)."""
        self._closed.set()

    # -- persistence ---------------------------------------------------------------------------
    def _load(self) -> None:
        for key in self._store.list_keys("gateway/tasks/"):
            if key.endswith("/submission.json"):
                sub = json_format.Parse(self._store.get_bytes(key), gateway_pb2.Submission())
                self._subs[sub.submission_id] = sub
        for key in self._store.list_keys("gateway/rounds/"):
            if key.endswith("/round.json"):
                entry = RoundEntry.from_json(self._store.get_json(key))
                result_key = f"gateway/rounds/{entry.round_id}/result.json"
                if entry.status.state == common_pb2.ROUND_STATE_DONE and self._store.exists(result_key):
                    entry.result = json_format.Parse(self._store.get_bytes(result_key), common_pb2.RoundResult())
                self._rounds[entry.round_id] = entry
        log.info("gateway: %d submission(s), %d round(s) loaded", len(self._subs), len(self._rounds))
        for entry in self._rounds.values():
            if entry.status.state not in TERMINAL:
                self._follow(entry)

    def _save_sub(self, sub: gateway_pb2.Submission) -> None:
        self._store.put_bytes(f"gateway/tasks/{sub.task_id}/submissions/{sub.submission_id}/submission.json",
                              json_format.MessageToJson(sub).encode(), content_type="application/json")

    def _save_round(self, entry: RoundEntry) -> None:
        self._store.put_json(f"gateway/rounds/{entry.round_id}/round.json", entry.to_json())

    # -- submissions ---------------------------------------------------------------------------
    def submit(self, task_id: str, contributor: str, x: np.ndarray, y: np.ndarray,
               idempotency_key: str, who: Principal) -> gateway_pb2.Submission:
        check_id(task_id, "task_id")
        who.require_role("contributor", "admin", what="submit records")
        contributor = self._own_contributor(who, contributor, action="submit as")
        check_id(contributor, "contributor")
        if len(idempotency_key) > 200:
            raise InvalidArgument("idempotency_key is longer than 200 characters")
        task = authorized_task(who, task_id, self._get_task, action="submit to", contributors_may=True)
        if len(x) > self._max_request:
            raise ResourceExhausted(f"records: {len(x)} records in one request; at most {self._max_request}")
        x, y = validate_records(x, y, task.settings)
        if idempotency_key:
            digest = hashlib.sha256(f"{task_id}\0{contributor}\0{idempotency_key}".encode()).hexdigest()
            sub_id = "s-" + digest[:16]
        else:
            sub_id = "s-" + uuid.uuid4().hex[:16]
        # One contributor's submits to a task go one at a time (exact idempotency and limits);
        # different contributors write to storage in parallel.
        with self._lock:
            mine = self._submit_locks.setdefault((task_id, contributor), threading.Lock())
        with mine:
            with self._lock:
                existing = self._subs.get(sub_id)
                pending_mine = sum(len(s.record_ids) for s in self._subs.values()
                                   if s.task_id == task_id and s.contributor == contributor
                                   and s.state == gateway_pb2.SUBMISSION_STATE_PENDING)
            if existing is not None:  # a retried submit: the first acknowledgement, nothing stored twice
                return self._with_pending(existing)
            if pending_mine + len(x) > self._max_pending:
                raise ResourceExhausted(f"contributor {contributor} would have {pending_mine + len(x)} "
                                        f"records pending; at most {self._max_pending}")
            sub = gateway_pb2.Submission(
                submission_id=sub_id, task_id=task_id, contributor=contributor,
                record_ids=[f"{sub_id}-{i}" for i in range(len(x))],
                state=gateway_pb2.SUBMISSION_STATE_PENDING, created_at=now())
            # Durable before acknowledged: the records, then the submission that points at them.
            self._store.put_bytes(f"gateway/tasks/{task_id}/submissions/{sub_id}/records.npz",
                                  serde.records_to_npz(x, y))
            self._save_sub(sub)
            with self._lock:
                self._subs[sub_id] = sub
                pending = self._pending_count(task_id)
        log.info("task %s: %d record(s) from %s acknowledged (%s); %d pending", task_id, len(x),
                 contributor, sub_id, pending)
        if pending >= task.settings.batch_threshold:
            threading.Thread(target=self._auto_start, args=(task_id,), daemon=True).start()
        return self._with_pending(sub)

    @staticmethod
    def _own_contributor(who: Principal, contributor: str, *, action: str) -> str:
        """A contributor acts only as itself (an empty field means itself)."""
        if who.role != "contributor":
            return contributor
        if contributor and contributor != who.subject:
            raise PermissionDenied(f"contributor {who.subject!r} may not {action} {contributor!r}")
        return who.subject

    def _with_pending(self, sub: gateway_pb2.Submission) -> gateway_pb2.Submission:
        out = gateway_pb2.Submission()
        out.CopyFrom(sub)
        out.pending_in_task = self._pending_count(sub.task_id)
        return out

    def _pending_count(self, task_id: str) -> int:
        with self._lock:
            return sum(len(s.record_ids) for s in self._subs.values()
                       if s.task_id == task_id and s.state == gateway_pb2.SUBMISSION_STATE_PENDING)

    def get_submission(self, submission_id: str, who: Principal) -> gateway_pb2.Submission:
        check_id(submission_id, "submission_id")
        with self._lock:
            sub = self._subs.get(submission_id)
        if not who.is_privileged and (sub is None or who.role != "contributor" or sub.contributor != who.subject
                                      or not who.may_see_task(sub.task_id)):
            # The same answer whether it exists or not: nothing leaks about others' submissions.
            raise denied(who, "read", f"submission {submission_id}")
        if sub is None:
            raise NotFound(f"submission {submission_id} not found")
        return self._with_pending(sub)

    # -- rounds --------------------------------------------------------------------------------
    def _auto_start(self, task_id: str) -> None:
        try:
            self.start_round(task_id, force=False, who=SELF)
        except FailedPrecondition:
            pass  # another submit started it first
        except FtpsError as exc:
            log.warning("task %s: automatic round did not start: %s", task_id, exc)

    def start_round(self, task_id: str, *, force: bool, who: Principal) -> common_pb2.RoundStatus:
        check_id(task_id, "task_id")
        who.require_role("builder", "admin", "service", what="start rounds")
        task = authorized_task(who, task_id, self._get_task, action="start rounds of")
        with self._lock:
            subs = sorted((s for s in self._subs.values()
                           if s.task_id == task_id and s.state == gateway_pb2.SUBMISSION_STATE_PENDING),
                          key=lambda s: (s.created_at, s.submission_id))
            total = sum(len(s.record_ids) for s in subs)
            m = task.settings.batch_threshold
            least = max(2, min_records(task.settings.n_models))
            if total < least:
                raise FailedPrecondition(f"task {task_id} has {total} record(s) pending; a round of "
                                         f"{task.settings.n_models} models needs at least {least}")
            if total < m and not force:
                raise FailedPrecondition(f"task {task_id} has {total} of {m} records pending; "
                                         "start with force to score them now")
            xs, ys, record_ids, contributors = [], [], [], []
            for s in subs:
                arrays = serde.npz_arrays(self._store.get_bytes(
                    f"gateway/tasks/{task_id}/submissions/{s.submission_id}/records.npz"))
                xs.append(arrays["x"])
                ys.append(arrays["y"])
                record_ids += list(s.record_ids)
                contributors += [s.contributor] * len(s.record_ids)
            round_id = "r-" + uuid.uuid4().hex[:12]
            batch = self._store.put_bytes(f"gateway/rounds/{round_id}/batch.npz",
                                          serde.records_to_npz(np.concatenate(xs), np.concatenate(ys)))
            entry = RoundEntry(round_id=round_id, task_id=task_id,
                               submission_ids=[s.submission_id for s in subs], record_ids=record_ids,
                               contributors=contributors, batch=batch,
                               status=common_pb2.RoundStatus(task_id=task_id, round_id=round_id,
                                                             state=common_pb2.ROUND_STATE_PENDING,
                                                             models_total=task.settings.n_models,
                                                             n_records=len(record_ids)))
            self._save_round(entry)
            self._rounds[round_id] = entry
            self._set_subs(entry, gateway_pb2.SUBMISSION_STATE_IN_ROUND, round_id)
        try:
            status = self._scorer.start_round(task_id, round_id, batch, record_ids, contributors)
        except FtpsError as exc:
            self._finish(entry, common_pb2.RoundStatus(task_id=task_id, round_id=round_id,
                                                       state=common_pb2.ROUND_STATE_FAILED,
                                                       message=f"scorer refused the round: {exc}"))
            raise
        log.info("task %s: round %s started with %d records", task_id, round_id, len(record_ids))
        self._set_status(entry, status)
        self._follow(entry)
        return status

    def _set_subs(self, entry: RoundEntry, state: int, round_id: str,
                  change: Callable[[gateway_pb2.Submission], None] | None = None) -> None:
        """Every submission of the round to ``state`` (then ``change`` may adjust each one)."""
        with self._lock:
            for sid in entry.submission_ids:
                sub = gateway_pb2.Submission()
                sub.CopyFrom(self._subs[sid])
                sub.state = state
                sub.round_id = round_id
                if change is not None:
                    change(sub)
                self._save_sub(sub)
                self._subs[sid] = sub

    def _set_status(self, entry: RoundEntry, status: common_pb2.RoundStatus) -> None:
        with self._changed:
            persist = status.state != entry.status.state
            entry.status = status
            if persist:
                self._save_round(entry)
            self._changed.notify_all()

    def _finish(self, entry: RoundEntry, status: common_pb2.RoundStatus,
                result: common_pb2.RoundResult | None = None) -> None:
        with self._changed:
            if result is not None:
                self._store.put_bytes(f"gateway/rounds/{entry.round_id}/result.json",
                                      json_format.MessageToJson(result).encode(),
                                      content_type="application/json")
                entry.result = result
                self._set_subs(entry, gateway_pb2.SUBMISSION_STATE_SCORED, entry.round_id,
                               _fail_excluded(result.excluded))
            else:
                # A failed round loses no record: its submissions wait for the next round, once.
                self._set_subs(entry, gateway_pb2.SUBMISSION_STATE_PENDING, "", _count_failure(status.message))
            self._set_status(entry, status)

    def _follow(self, entry: RoundEntry) -> None:
        threading.Thread(target=self._watch_scorer, args=(entry,), name=f"follow-{entry.round_id}",
                         daemon=True).start()

    def _watch_scorer(self, entry: RoundEntry) -> None:
        delay = 0.5
        while not self._closed.is_set():
            got = False
            try:
                for status in self._scorer.watch_round(entry.round_id):
                    got = True
                    if self._closed.is_set():
                        return
                    if status.state == common_pb2.ROUND_STATE_DONE:
                        result = self._scorer.get_result(entry.round_id)
                        self._finish(entry, result.status, result)
                        return
                    if status.state == common_pb2.ROUND_STATE_FAILED:
                        self._finish(entry, status)
                        return
                    self._set_status(entry, status)
            except NotFound:
                self._finish(entry, common_pb2.RoundStatus(
                    task_id=entry.task_id, round_id=entry.round_id, state=common_pb2.ROUND_STATE_FAILED,
                    message="the scorer lost the round; its records are pending again"))
                return
            except FtpsError as exc:
                log.warning("round %s: lost the scorer (%s); reconnecting in %.1fs", entry.round_id, exc, delay)
            else:
                if got:
                    # The scorer ended the stream before a terminal state (its idle or maximum stream
                    # lifetime): follow again right away (it answers with the current status first),
                    # and from the shortest backoff, as the scorer is there.
                    delay = 0.5
                    if self._closed.wait(0.1):
                        return
                    continue
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, 10.0)

    def get_round(self, round_id: str, who: Principal) -> common_pb2.RoundResult:
        entry = self._round(round_id, who, contributors_may=False)
        if entry.result is not None:
            return entry.result
        return common_pb2.RoundResult(status=entry.status)

    def _round(self, round_id: str, who: Principal, *, contributors_may: bool) -> RoundEntry:
        """The round, if ``who`` may see it: privileged callers, the task's builder, and (where
        ``contributors_may``) a contributor with records in it. Others get PERMISSION_DENIED
        whether or not it exists."""
        check_id(round_id, "round_id")
        with self._lock:
            entry = self._rounds.get(round_id)
        if entry is not None and (
                who.is_privileged
                or (who.may_see_task(entry.task_id) and (
                    (who.role == "builder" and self._get_task(entry.task_id).owner == who.subject)
                    or (contributors_may and who.role == "contributor" and who.subject in entry.contributors)))):
            return entry
        if entry is None and who.is_privileged:
            raise NotFound(f"round {round_id} not found")
        raise denied(who, "read", f"round {round_id}")

    def watch_round(self, round_id: str, *, is_active: Callable[[], bool],
                    who: Principal) -> Iterator[common_pb2.RoundStatus]:
        entry = self._round(round_id, who, contributors_may=True)
        last = None
        while is_active():
            with self._changed:
                if entry.status == last:
                    self._changed.wait(timeout=1.0)
                status = entry.status
            if status != last:
                last = status
                yield status
                if status.state in TERMINAL:
                    return

    # -- results -------------------------------------------------------------------------------
    def get_scores(self, task_id: str, contributor: str, round_id: str,
                   who: Principal) -> gateway_pb2.GetScoresResponse:
        """A contributor gets its own records' scores; the task's builder and admins get every
        record's, and the batch metrics."""
        check_id(task_id, "task_id")
        contributor = self._own_contributor(who, contributor, action="read the scores of")
        if contributor:
            check_id(contributor, "contributor")
        authorized_task(who, task_id, self._get_task, action="read scores of", contributors_may=True)
        resp = gateway_pb2.GetScoresResponse()
        with self._lock:
            rounds = [e for e in self._rounds.values()
                      if e.task_id == task_id and e.result is not None
                      and (not round_id or e.round_id == round_id)]
        for entry in sorted(rounds, key=lambda e: e.result.status.round_id):
            resp.scores.extend(s for s in entry.result.scores if not contributor or s.contributor == contributor)
            if not contributor:
                resp.batches.append(entry.result.batch)
        return resp

    def watch_scores(self, task_id: str, contributor: str, *, is_active: Callable[[], bool],
                     who: Principal) -> Iterator[common_pb2.RecordScore]:
        check_id(task_id, "task_id")
        contributor = self._own_contributor(who, contributor, action="watch the scores of")
        check_id(contributor, "contributor")
        authorized_task(who, task_id, self._get_task, action="watch scores of", contributors_may=True)
        sent: set[str] = set()
        while is_active():
            with self._changed:
                done = [e for e in self._rounds.values()
                        if e.task_id == task_id and e.result is not None and e.round_id not in sent]
                if not done:
                    self._changed.wait(timeout=1.0)
                    continue
            for entry in done:
                sent.add(entry.round_id)
                for s in entry.result.scores:
                    if s.contributor == contributor:
                        yield s


# A submission in this many failed rounds is not retried automatically: no batch is re-queued forever.
MAX_FAILED_ROUNDS = 2


def _count_failure(message: str) -> Callable[[gateway_pb2.Submission], None]:
    def change(sub: gateway_pb2.Submission) -> None:
        sub.failed_rounds += 1
        if sub.failed_rounds >= MAX_FAILED_ROUNDS:
            sub.state = gateway_pb2.SUBMISSION_STATE_FAILED
            sub.failure_reason = (f"{sub.failed_rounds} rounds holding these records failed; not retried "
                                  f"automatically (submit again to retry). Last: {message}")
    return change


def _fail_excluded(excluded: Iterable[common_pb2.ExcludedRecord]) -> Callable[[gateway_pb2.Submission], None]:
    """Submissions holding records the scorer left out end FAILED, naming those records."""
    by_sub: dict[str, list[common_pb2.ExcludedRecord]] = {}
    for e in excluded:
        by_sub.setdefault(e.record_id.rsplit("-", 1)[0], []).append(e)

    def change(sub: gateway_pb2.Submission) -> None:
        mine = by_sub.get(sub.submission_id)
        if mine:
            sub.state = gateway_pb2.SUBMISSION_STATE_FAILED
            sub.failure_reason = "; ".join(f"record {e.record_id} (#{e.record_id.rsplit('-', 1)[1]} of the "
                                           f"submission) left out of round {sub.round_id}: {e.reason}"
                                           for e in mine[:5]) + (f"; and {len(mine) - 5} more" if len(mine) > 5 else "")
    return change
