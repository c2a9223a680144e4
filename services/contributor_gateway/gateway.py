"""Submissions, batching into rounds, results fan-out: the contributor gateway's domain logic.

One owner per fact. The gateway owns submissions and which round holds each (its tables, see
:mod:`services.contributor_gateway.store`), and the batch it hands the scorer; the scorer owns the
rounds (state, progress, result): GetRound, WatchRound and the scores are read from it. Any number
of gateway replicas share one database: claims lock rows, and every replica runs a reconciler that
applies the outcome of rounds that ended to the submissions they hold (idempotently).

Blobs::

    gateway/tasks/{task_id}/submissions/{submission_id}/records.npz   written before the row = the ack
    gateway/rounds/{round_id}/batch.npz     the round's records, in round order (the scorer reads it)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Callable, Iterator, Protocol

import numpy as np

from ftps.common import archives, paging, serde, tracing
from ftps.common.clock import now_ts
from ftps.common.auth import Principal, authorized_task, denied
from ftps.common.db import Database
from ftps.common.metrics import GatewayMetrics
from ftps.common.errors import (FailedPrecondition, FtpsError, InvalidArgument, NotFound,
                                PermissionDenied, ResourceExhausted, Unavailable)
from ftps.records import checks
from ftps.common.storage import ObjectStore, check_id
from ftps.common.task_rules import MIN_CONTRIBUTORS, min_records
from ftps.v1 import common_pb2, gateway_pb2, registry_pb2
from services.contributor_gateway.store import RoundRef, SqlSubmissionStore, SubmissionStore

log = logging.getLogger(__name__)

TERMINAL = serde.TERMINAL_ROUND_STATES
RESULT_TTL_S = 5.0
# The gateway acting on its own: the round it starts when a task's batch threshold is reached.
SELF = Principal("contributor-gateway", "service")


class ScorerPort(Protocol):
    """What the gateway needs from the scorer (gRPC in production, anything in tests)."""

    def start_round(self, task_id: str, round_id: str, batch: common_pb2.BlobRef,
                    record_ids: list[str], contributors: list[str]) -> common_pb2.RoundStatus: ...

    def watch_round(self, round_id: str) -> Iterator[common_pb2.RoundStatus]: ...

    def get_result(self, round_id: str) -> common_pb2.RoundResult:
        """The round's result once DONE, else ``RoundResult(status=...)``; NotFound if unknown."""

    def grow_round(self, round_id: str, add_models: int) -> common_pb2.RoundStatus:
        """Add models to a DONE round (the scorer's GrowScoring); returns its status at once."""

    def compare_recipes(self, round_id: str,
                        alternatives: list[common_pb2.RecipeAlternative]) -> common_pb2.RecipeComparison:
        """Start a recipe comparison on a DONE round (CompareScoringRecipes)."""

    def get_comparison(self, round_id: str) -> common_pb2.RecipeComparison:
        """The round's recipe comparison (GetScoringComparison)."""


class Gateway:
    def __init__(self, store: ObjectStore, get_task: Callable[[str], registry_pb2.Task],
                 scorer: ScorerPort, submissions: SubmissionStore | None = None, *,
                 max_records_per_request: int = 10_000, max_pending_per_contributor: int = 100_000,
                 reconcile_s: float = 1.0, round_grace_s: float = 300.0, result_cache: int = 256,
                 metrics: GatewayMetrics | None = None) -> None:
        """``submissions``: the shared store (None: a private in-memory SQLite one, for tools and
        tests). ``reconcile_s``: how often this replica asks the scorer about rounds that hold
        submissions; ``round_grace_s``: how long a round the scorer does not know may take to reach
        it (claimed, batch being written, StartRound under way) before its records are pending again."""
        self._store = store
        self._get_task = get_task
        self._scorer = scorer
        self._subs = submissions if submissions is not None else SqlSubmissionStore.open(
            Database("sqlite://", name="gateway database"))
        self._metrics = metrics
        if metrics is not None:  # pending work per task, read from the shared store at scrape time
            metrics.watch_pending(self._subs.pending_by_task)
        self._max_request = max_records_per_request
        self._max_pending = max_pending_per_contributor
        self._reconcile_s = reconcile_s
        self._grace_s = round_grace_s
        # DONE results by round, with when they were cached: a round can grow (GrowRound) on any
        # replica, so a cached result is asked for again after RESULT_TTL_S.
        self._results: OrderedDict[str, tuple[common_pb2.RoundResult, float]] = OrderedDict()
        self._result_cap = result_cache
        self._results_lock = threading.Lock()
        self._changed = threading.Condition()  # an outcome was applied here: wake local watchers
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="gateway-reconciler", daemon=True)
        self._reconciler.start()

    def close(self) -> None:
        """Stop reconciling (the server stopped; any replica carries on from the database)."""
        self._closed.set()
        self._wake.set()

    # -- submissions ---------------------------------------------------------------------------
    def submit(self, task_id: str, contributor: str, x: np.ndarray, y: np.ndarray,
               idempotency_key: str, who: Principal) -> gateway_pb2.Submission:
        try:
            # Ids and a count on the span; never a record's values.
            with tracing.span("gateway.submit", ftps__task=task_id, ftps__records=len(x)) as span:
                out = self._submit(task_id, contributor, x, y, idempotency_key, who)
                span.set_attribute("ftps.submission", out.submission_id)
        except FtpsError:
            if self._metrics is not None:
                self._metrics.submits.labels("refused").inc()
            raise
        if self._metrics is not None:
            self._metrics.submits.labels("acknowledged").inc()
        return out

    def _submit(self, task_id: str, contributor: str, x: np.ndarray, y: np.ndarray,
                idempotency_key: str, who: Principal) -> gateway_pb2.Submission:
        check_id(task_id, "task_id")
        who.require_role("contributor", "admin", what="submit records")
        contributor = self._own_contributor(who, contributor, action="submit as")
        check_id(contributor, "contributor")
        if len(idempotency_key) > 200:
            raise InvalidArgument("idempotency_key is longer than 200 characters", field="idempotency_key")
        task = authorized_task(who, task_id, self._get_task, action="submit to", contributors_may=True)
        if len(x) > self._max_request:
            raise ResourceExhausted(f"records: {len(x)} records in one request; at most {self._max_request}",
                                    reason="TOO_MANY_RECORDS", field="records")
        x, y = checks.for_task(x, y, task.settings)
        if idempotency_key:
            digest = hashlib.sha256(f"{task_id}\0{contributor}\0{idempotency_key}".encode()).hexdigest()
            sub_id = "s-" + digest[:16]
            existing = self._subs.get(sub_id)
            if existing is not None:  # a retried submit: the first acknowledgement, nothing stored twice
                return self._with_pending(existing)
        else:
            sub_id = "s-" + uuid.uuid4().hex[:16]
        # Checked here to spare the blob, and again atomically with the insert.
        pending_mine = self._subs.pending_records(task_id, contributor)
        if pending_mine + len(x) > self._max_pending:
            raise ResourceExhausted(f"contributor {contributor} would have {pending_mine + len(x)} "
                                    f"records pending; at most {self._max_pending}", reason="QUOTA_EXCEEDED")
        sub = gateway_pb2.Submission(
            submission_id=sub_id, task_id=task_id, contributor=contributor,
            record_ids=[f"{sub_id}-{i}" for i in range(len(x))],
            state=gateway_pb2.SUBMISSION_STATE_PENDING, created_at=now_ts())
        # Durable before acknowledged: the records, then the row that points at them.
        self._store.put_bytes(f"gateway/tasks/{task_id}/submissions/{sub_id}/records.npz",
                              archives.records_to_npz(x, y))
        sub = self._subs.add(sub, max_pending=self._max_pending)
        out = self._with_pending(sub)
        log.info("task %s: %d record(s) from %s acknowledged (%s); %d pending", task_id, len(x),
                 contributor, sub_id, out.pending_in_task)
        if out.pending_in_task >= task.settings.batch_threshold:
            threading.Thread(target=self._auto_start, args=(task_id,), daemon=True).start()
        return out

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
        out.pending_in_task = self._subs.pending_records(sub.task_id)
        return out

    def get_submission(self, submission_id: str, who: Principal) -> gateway_pb2.Submission:
        check_id(submission_id, "submission_id")
        sub = self._subs.get(submission_id)
        if not who.is_privileged and (sub is None or who.role != "contributor" or sub.contributor != who.subject
                                      or not who.may_see_task(sub.task_id)):
            # The same answer whether it exists or not: nothing leaks about others' submissions.
            raise denied(who, "read", f"submission {submission_id}")
        if sub is None:
            raise NotFound(f"submission {submission_id} not found", reason="SUBMISSION_NOT_FOUND",
                           field="submission_id")
        return self._with_pending(sub)

    def list_submissions(self, task_id: str, contributor: str, page_size: int, page_token: str,
                         who: Principal) -> gateway_pb2.ListSubmissionsResponse:
        """A contributor's own submissions in arrival order (admins: anyone's, or everyone's)."""
        who.require_role("contributor", "admin", what="list submissions")
        contributor = self._own_contributor(who, contributor, action="list the submissions of")
        if contributor:
            check_id(contributor, "contributor")
        if task_id:
            check_id(task_id, "task_id")
            if not who.may_see_task(task_id):
                raise denied(who, "list submissions of", f"task {task_id}")
        elif who.tasks and not who.is_privileged:
            raise InvalidArgument("this token is limited to some tasks: give task_id", reason="FIELD_REQUIRED",
                                  field="task_id")
        subs, token = self._subs.list_submissions(contributor=contributor, task_id=task_id,
                                                  page_size=page_size, page_token=page_token)
        pending = {t: self._subs.pending_records(t) for t in {s.task_id for s in subs}}
        for s in subs:
            s.pending_in_task = pending[s.task_id]
        return gateway_pb2.ListSubmissionsResponse(submissions=subs, next_page_token=token)

    # -- rounds --------------------------------------------------------------------------------
    def _auto_start(self, task_id: str) -> None:
        try:
            self.start_round(task_id, force=False, who=SELF)
        except FailedPrecondition:
            pass  # another submit (or replica) started it first
        except FtpsError as exc:
            log.warning("task %s: automatic round did not start: %s", task_id, exc)

    def start_round(self, task_id: str, *, force: bool, who: Principal) -> common_pb2.RoundStatus:
        # The round's trace starts here (the StartRound call, or a submit that filled the batch):
        # the scorer's round and every worker's jobs are its children.
        with tracing.span("gateway.start_round", ftps__task=task_id, ftps__force=force) as span:
            return self._start_round(task_id, force=force, who=who, span=span)

    def _start_round(self, task_id: str, *, force: bool, who: Principal, span) -> common_pb2.RoundStatus:
        check_id(task_id, "task_id")
        who.require_role("builder", "admin", "service", what="start rounds")
        task = authorized_task(who, task_id, self._get_task, action="start rounds of")
        m = task.settings.batch_threshold
        least = max(2, min_records(task.settings.n_models))
        round_id = "r-" + uuid.uuid4().hex[:12]
        # Contributor-level masks draw whole contributions: the batch waits for enough of them.
        need = MIN_CONTRIBUTORS if task.settings.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR else 0
        claim = self._subs.claim(task_id, round_id, at_least=least if force else max(least, m),
                                 at_least_contributors=need)
        if not claim.submissions and claim.pending >= (least if force else max(least, m)):
            raise FailedPrecondition(
                f"task {task_id} has records of {claim.contributors} contributor(s) pending; its rounds draw "
                f"whole contributions (contributor-level masks) and need at least {need}",
                reason="TOO_FEW_CONTRIBUTORS")
        if not claim.submissions:
            if claim.pending < least:
                raise FailedPrecondition(f"task {task_id} has {claim.pending} record(s) pending; a round of "
                                         f"{task.settings.n_models} models needs at least {least}",
                                         reason="TOO_FEW_RECORDS")
            raise FailedPrecondition(f"task {task_id} has {claim.pending} of {m} records pending; "
                                     "start with force to score them now", reason="TOO_FEW_RECORDS")
        subs = claim.submissions
        record_ids = [r for s in subs for r in s.record_ids]
        contributors = [s.contributor for s in subs for _ in s.record_ids]
        span.set_attribute("ftps.round", round_id)
        span.set_attribute("ftps.records", len(record_ids))
        try:
            # Storage I/O with no lock held: other tasks' submits and rounds go on meanwhile.
            xs, ys = [], []
            for s in subs:
                arrays = archives.npz_arrays(self._store.get_bytes(
                    f"gateway/tasks/{task_id}/submissions/{s.submission_id}/records.npz"))
                xs.append(arrays["x"])
                ys.append(arrays["y"])
            batch = self._store.put_bytes(f"gateway/rounds/{round_id}/batch.npz",
                                          archives.records_to_npz(np.concatenate(xs), np.concatenate(ys)))
        except BaseException:
            # The scorer never saw it: the records wait for the next round, no failure counted.
            self._subs.release(round_id, not_since=float("inf"))
            raise
        if not self._subs.hand_over(round_id, batch):
            raise Unavailable(f"round {round_id} took longer than {self._grace_s:.0f}s to start; "
                              "its records are pending again, retry", reason="ROUND_START_DELAYED")
        try:
            status = self._scorer.start_round(task_id, round_id, batch, record_ids, contributors)
        except Unavailable:
            # The scorer may or may not have it: the reconciler asks it, and gives the records back
            # after the grace period if it never got the round.
            self._wake.set()
            raise
        except FtpsError as exc:
            self._subs.apply_failed(round_id, f"scorer refused the round: {exc}")
            self._subs.release(round_id, not_since=float("inf"))
            raise
        log.info("task %s: round %s started with %d records", task_id, round_id, len(record_ids))
        self._wake.set()
        return status

    def _round(self, round_id: str, who: Principal, *, contributors_may: bool) -> RoundRef:
        """The round, if ``who`` may see it: privileged callers, the task's builder, and (where
        ``contributors_may``) a contributor with records in it. Others get PERMISSION_DENIED
        whether or not it exists."""
        check_id(round_id, "round_id")
        ref = self._subs.round(round_id)
        if ref is not None and (
                who.is_privileged
                or (who.may_see_task(ref.task_id) and (
                    (who.role == "builder" and self._get_task(ref.task_id).owner == who.subject)
                    or (contributors_may and who.role == "contributor"
                        and self._subs.has_records_in(round_id, who.subject))))):
            return ref
        if ref is None and who.is_privileged:
            raise NotFound(f"round {round_id} not found", reason="ROUND_NOT_FOUND", field="round_id")
        raise denied(who, "read", f"round {round_id}")

    def _result(self, round_id: str) -> common_pb2.RoundResult:
        """The round's result: a cached DONE one, else the scorer's word (its outcome applied here
        if it ended). NotFound when the scorer does not know the round."""
        with self._results_lock:
            cached = self._results.get(round_id)
            if cached is not None and time.monotonic() - cached[1] < RESULT_TTL_S:
                self._results.move_to_end(round_id)
                return cached[0]
        result = self._scorer.get_result(round_id)
        self._settle(round_id, result)
        return result

    def _read_round(self, ref: RoundRef) -> common_pb2.RoundResult:
        try:
            return self._result(ref.round_id)
        except NotFound:
            return common_pb2.RoundResult(status=self._unknown_status(ref))

    def _unknown_status(self, ref: RoundRef) -> common_pb2.RoundStatus:
        """A round the gateway claimed but the scorer does not know: starting, or never started."""
        status = common_pb2.RoundStatus(task_id=ref.task_id, round_id=ref.round_id, n_records=ref.n_records,
                                        state=common_pb2.ROUND_STATE_PENDING)
        since = ref.handed_at if ref.handed_at is not None else ref.claimed_at
        if ref.released_at is not None or time.time() - since > self._grace_s:
            status.state = common_pb2.ROUND_STATE_FAILED
            status.message = f"round {ref.round_id} never reached the scorer; its records are pending again"
        return status

    def get_round(self, round_id: str, who: Principal) -> common_pb2.RoundResult:
        return self._read_round(self._round(round_id, who, contributors_may=False))

    def watch_round(self, round_id: str, *, is_active: Callable[[], bool],
                    who: Principal) -> Iterator[common_pb2.RoundStatus]:
        """The scorer's status of the round, each change once, until DONE or FAILED. Read from the
        scorer every half second (no stream held open to it per watcher)."""
        ref = self._round(round_id, who, contributors_may=True)
        last = None
        while is_active():
            status = self._read_round(ref).status
            if status != last:
                last = status
                yield status
                if status.state in TERMINAL:
                    return
            with self._changed:
                self._changed.wait(timeout=0.5)

    # -- reconciling submissions with the scorer's rounds --------------------------------------
    def _settle(self, round_id: str, result: common_pb2.RoundResult) -> None:
        """Apply an ended round's outcome to the submissions still IN_ROUND of it (idempotent)."""
        state = result.status.state
        if state == common_pb2.ROUND_STATE_DONE:
            with self._results_lock:
                self._results[round_id] = (result, time.monotonic())
                self._results.move_to_end(round_id)
                while len(self._results) > self._result_cap:
                    self._results.popitem(last=False)
            changed = self._subs.apply_done(round_id, result.excluded)
        elif state == common_pb2.ROUND_STATE_FAILED:
            changed = self._subs.apply_failed(round_id, result.status.message)
        else:
            return
        if changed:
            log.info("round %s %s: %d submission(s) updated", round_id,
                     common_pb2.RoundState.Name(state), changed)
            with self._changed:
                self._changed.notify_all()

    def reconcile(self) -> None:
        """One pass: ask the scorer about every round holding IN_ROUND submissions."""
        for ref in self._subs.open_rounds():
            if self._closed.is_set():
                return
            try:
                result = self._scorer.get_result(ref.round_id)
            except NotFound:
                if self._subs.release(ref.round_id, not_since=time.time() - self._grace_s):
                    log.warning("round %s never reached the scorer; its records are pending again", ref.round_id)
                continue
            self._settle(ref.round_id, result)

    def _reconcile_loop(self) -> None:
        delay = self._reconcile_s
        while not self._closed.is_set():
            try:
                self.reconcile()
                delay = self._reconcile_s
            except FtpsError as exc:  # the scorer or the database away: try again, backing off
                delay = min(max(delay, 0.5) * 2, 10.0)
                log.warning("reconciling rounds: %s; again in %.1fs", exc, delay)
            except Exception:  # the reconciler must outlive any one bad pass
                log.exception("reconciling rounds failed")
            self._wake.wait(delay)
            self._wake.clear()

    # -- results -------------------------------------------------------------------------------
    def _done_result(self, round_id: str) -> common_pb2.RoundResult | None:
        """The round's result once it has scores: DONE, or growing (its scores so far)."""
        try:
            result = self._result(round_id)
        except NotFound:
            return None
        state = result.status.state
        return result if state == common_pb2.ROUND_STATE_DONE or (
            result.scores and state != common_pb2.ROUND_STATE_FAILED) else None

    def grow_round(self, round_id: str, add_models: int, who: Principal) -> common_pb2.RoundStatus:
        """Add models to a DONE round (GrowRound): the task's builder or an admin, or a contributor
        with records in it up to the task's contributor_growth_limit; the scorer runs it."""
        ref = self._round(round_id, who, contributors_may=True)
        if who.role == "contributor":
            limit = self._get_task(ref.task_id).settings.contributor_growth_limit
            total = self._result(round_id).status.models_total + add_models
            if not limit or total > limit:
                raise PermissionDenied(
                    f"contributor {who.subject!r} may not grow round {round_id} to {total} models: the builder "
                    + (f"allows contributors at most {limit}" if limit else "has not allowed contributors to "
                       "grow rounds"))
        else:
            who.require_role("builder", "admin", what="grow rounds")
        status = self._scorer.grow_round(ref.round_id, add_models)
        with self._results_lock:  # this replica's readers see the growth at once
            self._results.pop(round_id, None)
        with self._changed:
            self._changed.notify_all()
        log.info("round %s: growing by %d models", round_id, add_models)
        return status

    def compare_recipes(self, round_id: str, alternatives: list[common_pb2.RecipeAlternative],
                        who: Principal) -> common_pb2.RecipeComparison:
        """The task's builder or an admin: the round's batch under other recipes (the scorer runs it)."""
        ref = self._round(round_id, who, contributors_may=False)
        who.require_role("builder", "admin", what="compare recipes")
        return self._scorer.compare_recipes(ref.round_id, alternatives)

    def get_comparison(self, round_id: str, who: Principal) -> common_pb2.RecipeComparison:
        ref = self._round(round_id, who, contributors_may=False)
        who.require_role("builder", "admin", what="read recipe comparisons")
        return self._scorer.get_comparison(ref.round_id)

    def get_scores(self, task_id: str, contributor: str, round_id: str, who: Principal, *,
                   page_size: int = 0, page_token: str = "") -> gateway_pb2.GetScoresResponse:
        """A contributor gets its own records' scores; the task's builder and admins get every
        record's, and the batch metrics (each round's with the page holding its first score).
        Rounds in id order, records in round order, ``page_size`` scores a page."""
        check_id(task_id, "task_id")
        contributor = self._own_contributor(who, contributor, action="read the scores of")
        if contributor:
            check_id(contributor, "contributor")
        authorized_task(who, task_id, self._get_task, action="read scores of", contributors_may=True)
        n = paging.page_size(page_size)
        after = paging.decode_token(page_token, 2, rpc="GetScores")
        rounds = self._subs.scored_rounds(task_id, contributor=contributor)
        if round_id:
            rounds = [r for r in rounds if r == round_id]
        if after is not None:
            rounds = [r for r in rounds if r >= after[0]]
        resp = gateway_pb2.GetScoresResponse()
        for rid in rounds:
            result = self._done_result(rid)
            if result is None:
                continue
            scores = [s for s in result.scores if not contributor or s.contributor == contributor]
            start = int(after[1]) if after is not None and rid == after[0] else 0
            if len(resp.scores) >= n:
                resp.next_page_token = paging.encode_token([rid, start])
                break
            take = scores[start:start + n - len(resp.scores)]
            if start == 0:
                if not contributor:
                    resp.batches.append(result.batch)
                resp.contributor_scores.extend(c for c in result.contributor_scores
                                               if not contributor or c.contributor == contributor)
            resp.scores.extend(take)
            if start + len(take) < len(scores):
                resp.next_page_token = paging.encode_token([rid, start + len(take)])
                break
        return resp

    def watch_scores(self, task_id: str, contributor: str, *, is_active: Callable[[], bool],
                     who: Principal, round_id: str = "") -> Iterator[common_pb2.RecordScore]:
        """Scores as rounds finish, existing ones first. A contributor gets its own records; the
        task's builder and admins every record (or ``contributor``'s). Without ``round_id`` it follows
        the task while ``is_active``; with it, it ends once that round's scores the caller may see are
        sent (the round DONE), or at once when the round ended FAILED."""
        check_id(task_id, "task_id")
        contributor = self._own_contributor(who, contributor, action="watch the scores of")
        if contributor:
            check_id(contributor, "contributor")
        authorized_task(who, task_id, self._get_task, action="watch scores of", contributors_may=True)
        if round_id:
            yield from self._watch_round_scores(task_id, contributor, round_id, is_active=is_active, who=who)
            return
        sent: set[str] = set()
        while is_active():
            for rid in self._subs.scored_rounds(task_id, contributor=contributor):
                if rid in sent:
                    continue
                result = self._done_result(rid)
                if result is None:
                    continue
                sent.add(rid)
                for s in result.scores:
                    if not contributor or s.contributor == contributor:
                        yield s
            # Woken at once by this replica's reconciler; another replica's within a second.
            with self._changed:
                self._changed.wait(timeout=1.0)

    def _watch_round_scores(self, task_id: str, contributor: str, round_id: str, *,
                            is_active: Callable[[], bool], who: Principal) -> Iterator[common_pb2.RecordScore]:
        """One round's scores (``contributor``'s, or all): sent once the round is DONE, then the
        stream ends; nothing, and the end at once, if it FAILED. Records the round excluded have no
        score and are not waited for. The round is checked like GetRound (a contributor needs records
        in it); a round of another task is as unknown as one that does not exist."""
        ref = self._round(round_id, who, contributors_may=True)
        if ref.task_id != task_id:
            if who.is_privileged:
                raise NotFound(f"round {round_id} is not a round of task {task_id}", reason="ROUND_NOT_FOUND",
                               field="round_id")
            raise denied(who, "read", f"round {round_id}")
        if contributor and who.role != "contributor" and not self._subs.has_records_in(round_id, contributor):
            return  # a builder or admin asking for someone with no records in it: nothing will come
        while is_active():
            result = self._read_round(ref)
            if result.status.state == common_pb2.ROUND_STATE_FAILED:
                return
            if result.status.state == common_pb2.ROUND_STATE_DONE:
                for s in result.scores:
                    if not contributor or s.contributor == contributor:
                        yield s
                return
            with self._changed:
                self._changed.wait(timeout=0.5)
