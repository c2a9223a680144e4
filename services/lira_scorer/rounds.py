"""Rounds and the preparation stage: the scorer's domain logic (no gRPC servicer code here).

A round: masks (Algorithm 1's balanced complementary halves), n models fine-tuned by the worker
pool, the statistic matrix PHI[n, m], then every score variant from :mod:`scoring`.

State (:mod:`services.lira_scorer.store`): a round is one row of ``scorer_rounds`` (state, progress,
lease, batch and result references), an offline Gaussian one row of ``scorer_offline``. Blobs::

    scorer/tasks/{task_id}/offline/{base_sha[:16]}/{pool,heldout}.npz   the preparation stage's records
    scorer/rounds/{round_id}/phi.npz              phi [n, m] and member [n, m]
    scorer/rounds/{round_id}/phi-n{N}.npz         the same once grown to N models (GrowScoring)
    scorer/rounds/{round_id}/batch-a1-{run}.npz   the batch without the records left out (a second pass)
    scorer/rounds/{round_id}/result-{run}.pb      the RoundResult (serialized protobuf)

``{run}`` names one replica's run of the round: a replica that lost the round (its lease ran out
while it was slow, not dead) and writes late never overwrites a blob the row already points at.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from ftps.common import archives, serde, tracing
from ftps.common.auth import Principal, authorize_task, authorized_task, denied
from ftps.common.clock import now_ts
from ftps.common.errors import (
    DataLoss,
    FailedPrecondition,
    FtpsError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from ftps.common.metrics import ScorerMetrics
from ftps.common.registry_client import require_ready
from ftps.common.storage import ObjectStore, check_id
from ftps.common.task_rules import (
    MAX_MODELS,
    MAX_RECORDS,
    min_records,
    valid_batch_size,
    valid_n_models,
)
from ftps.ml.strategy import check_source
from ftps.privacy import dp, scoring
from ftps.privacy.masks import (
    derive_seed,
    group_index,
    make_group_masks,
    make_masks,
    model_seeds,
    shadow_masks,
    trace_failures,
)
from ftps.records import RecordsError
from ftps.records.builder import builder_data
from ftps.v1 import common_pb2, registry_pb2, scorer_pb2, worker_pb2
from services.lira_scorer import costs
from services.lira_scorer.store import (
    NewRound,
    OfflineStore,
    PreparationRow,
    PreparationStore,
    RoundRow,
    RoundStore,
    Variant,
)
from services.lira_scorer.workers import WorkerPool

log = logging.getLogger(__name__)

# A recipe comparison: at most this many alternatives to the task's own recipe, each a strategy of
# at most this many bytes (what the registry takes by default).
MAX_ALTERNATIVES = 4
MAX_STRATEGY_BYTES = 256 * 1024

GetTask = Callable[[str], registry_pb2.Task]
# The scorer acting on its own: rounds it resumes, the preparation stage an offline-global round needs.
SELF = Principal("lira-scorer", "service")
_RESULTS_CACHED = 64  # finished results kept in memory (they never change)


def make_jobs(task: registry_pb2.Task, job_prefix: str, records: common_pb2.BlobRef,
              masks: np.ndarray, seeds: list[int], *, eval_records: common_pb2.BlobRef | None = None,
              builder_mix: int = 0) -> list[worker_pb2.FinetuneJob]:
    per_job = max(1, task.settings.models_per_job)
    jobs = []
    for start in range(0, len(masks), per_job):
        specs = [worker_pb2.ModelSpec(index=i, seed=seeds[i], mask=masks[i].astype(np.uint8).tobytes())
                 for i in range(start, min(start + per_job, len(masks)))]
        jobs.append(worker_pb2.FinetuneJob(
            task_id=task.task_id, job_id=f"{job_prefix}-j{start // per_job}",
            base_model=task.base_model, strategy=task.strategy, builder_data=task.builder_data,
            records=records, eval_records=eval_records, models=specs, builder_mix=builder_mix))
    return jobs


class RoundAbandoned(Exception):
    """This replica stops running the round without ending it: its lease ends and a replica (maybe
    this one) runs it again from its batch."""


class LeaseLost(RoundAbandoned):
    """Another replica took the round over (this one's lease ran out) or this one released it."""


@dataclass
class Run:
    """A round running on this replica: its row as claimed, its status as last written here, and
    whether this replica still holds it."""

    row: RoundRow
    status: common_pb2.RoundStatus
    lost: threading.Event = field(default_factory=threading.Event)
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def round_id(self) -> str:
        return self.row.round_id


@dataclass
class PrepRun:
    """A preparation stage running on this replica: its row as claimed, and whether it still holds it."""

    row: PreparationRow
    task: registry_pb2.Task
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, str]:
        return self.row.task_id, self.row.base_model_sha256


_PREP_READY = scorer_pb2.PREPARATION_STATE_READY
_PREP_FAILED = scorer_pb2.PREPARATION_STATE_FAILED
_PREP_INTERNAL = "internal error in the preparation stage (the scorer's log has the details); start it again"


def _ready_message(gaussian: common_pb2.OfflineGaussian) -> str:
    return (f"offline Gaussian fitted from {gaussian.k} shadow models: mu={gaussian.mu:.4g}, "
            f"sigma={gaussian.sigma:.4g}")


def _write_held(lost: threading.Event, what: str, update: Callable[[], bool]) -> None:
    """One write of leased work (a round, a preparation) by its lease holder: ``update()`` returns
    whether the lease was still ours. A lease lost now or before is :class:`LeaseLost` (``lost`` set);
    a database out of reach is :class:`RoundAbandoned` (the lease runs out, another replica resumes)."""
    if lost.is_set():
        raise LeaseLost(what)
    try:
        held = update()
    except Unavailable as exc:
        raise RoundAbandoned(f"{what}: {exc}") from exc
    if not held:
        lost.set()
        raise LeaseLost(what)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Scorer:
    """Rounds and the preparation stage over the scorer's stores.

    Replicas: every replica serves every round from the database; the replica that stored a round
    (StartRound) runs it under a lease it renews every ``lease_s / 3``; :meth:`tick` (the lease loop,
    :meth:`start`) also claims rounds whose lease ran out, their owner having died, and runs them
    again. A lease is held by ``owner`` = replica id + '#' + this incarnation, so that a replica
    restarted under the same id (a pod's hostname, pid 1) takes its predecessor's rounds at once.
    """

    def __init__(self, store: ObjectStore, get_task: GetTask, pool: WorkerPool, *, rounds: RoundStore,
                 offline: OfflineStore, preparations: PreparationStore, heldout_max: int = 500,
                 replica_id: str = "",
                 lease_s: float = 30.0, poll_s: float = 0.5, claim_limit: int = 4,
                 metrics: ScorerMetrics | None = None) -> None:
        self._store = store
        self._get_task = get_task
        self._pool = pool
        self._rounds = rounds
        self._offline = offline
        self._preparations = preparations
        self._heldout_max = heldout_max
        self.replica_id = replica_id or default_replica_id()
        self.owner = f"{self.replica_id}#{secrets.token_hex(4)}"
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._claim_limit = claim_limit
        # Guards the dicts below only; never held around storage or database I/O.
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._preps: dict[tuple[str, str], PrepRun] = {}  # preparation stages running here
        self._results: OrderedDict[str, common_pb2.RoundResult] = OrderedDict()  # finished: immutable
        # Notified on every write of a round running here: watchers re-read at once, not at the poll.
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_rounds(self._running_by_state)

    def _running_by_state(self) -> dict[str, int]:
        """Rounds running on this replica by state name ("finetuning", ...): the metrics' gauge."""
        with self._lock:
            states = [run.status.state for run in self._runs.values()]
        counts: dict[str, int] = {}
        for state in states:
            name = common_pb2.RoundState.Name(state).removeprefix("ROUND_STATE_").lower()
            counts[name] = counts.get(name, 0) + 1
        return counts

    def _finished(self, state: str, t0: float) -> None:
        if self._metrics is not None:
            self._metrics.rounds_finished.labels(state).inc()
            self._metrics.round_duration.observe(time.perf_counter() - t0)

    # -- leases ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the lease loop: the rounds of this replica's earlier incarnation are released, then
        every ``lease_s / 3`` leases are renewed and expired rounds claimed (the first pass at once)."""
        try:
            released = self._rounds.release_owners(f"{self.replica_id}#", keep=self.owner)
            if released:
                log.info("released %d round(s) of an earlier run of replica %s", released, self.replica_id)
            self._preparations.release_owners(f"{self.replica_id}#", keep=self.owner)
        except Unavailable as exc:  # the expired leases are claimed later all the same
            log.warning("could not release earlier rounds: %s", exc)
        self._loop = threading.Thread(target=self._lease_loop, name="scorer-leases", daemon=True)
        self._loop.start()

    def close(self) -> None:
        """Stop the lease loop and stop writing the rounds running here; their leases are released
        so that another replica takes them over at its next pass instead of after the lease."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=10)
        with self._lock:
            runs = list(self._runs.values())
            preps = list(self._preps.values())
        for run in runs:
            run.lost.set()
        for prep in preps:
            prep.lost.set()
        try:
            self._rounds.release([run.round_id for run in runs], owner=self.owner)
            self._preparations.release([prep.row for prep in preps], owner=self.owner)
        except Unavailable as exc:
            log.warning("could not release %d round(s) and %d preparation(s) at stop (they are taken over "
                        "after the lease): %s", len(runs), len(preps), exc)

    def _lease_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Unavailable as exc:  # leases not renewed may run out: the rounds move, scores do not
                log.warning("lease loop: %s", exc)
            except Exception:  # noqa: BLE001 - the loop outlives whatever one pass ran into
                log.exception("lease loop")
            self._stop.wait(self._lease_s / 3)

    def tick(self) -> None:
        """One pass of the lease loop: renew the leases of the rounds running here, then claim
        rounds whose lease ran out and run them."""
        with self._lock:
            runs = list(self._runs.values())
            preps = list(self._preps.values())
        for prep in preps:
            if not prep.lost.is_set() and not self._preparations.renew(prep.row, owner=self.owner,
                                                                       lease_s=self._lease_s):
                prep.lost.set()
                log.warning("preparation %s: lease lost (taken over or ended elsewhere)", prep.row.preparation_id)
        for run in runs:
            if not run.lost.is_set() and not self._rounds.renew(run.round_id, owner=self.owner,
                                                                 lease_s=self._lease_s):
                run.lost.set()
                log.warning("round %s: lease lost (taken over or finished elsewhere)", run.round_id)
        if self._stop.is_set():
            return
        for row in self._rounds.claim_expired(owner=self.owner, lease_s=self._lease_s, limit=self._claim_limit):
            log.info("round %s: its lease ran out (owner %s); running it here again", row.round_id,
                     row.lease_owner or "none")
            self._launch(row)
        for prep_row in self._preparations.claim_expired(owner=self.owner, lease_s=self._lease_s,
                                                         limit=self._claim_limit):
            log.info("preparation %s of task %s: its lease ran out (owner %s); running it here again",
                     prep_row.preparation_id, prep_row.task_id, prep_row.lease_owner or "none")
            try:
                task = self._get_task(prep_row.task_id)
            except Unavailable as exc:  # claimed again once this lease runs out
                log.warning("preparation %s: task not readable now: %s", prep_row.preparation_id, exc)
                continue
            except FtpsError as exc:
                self._preparations.update(prep_row, owner=self.owner, state=_PREP_FAILED,
                                          message=f"the task cannot be read: {exc}")
                continue
            self._launch_preparation(prep_row, task)

    def _launch(self, row: RoundRow) -> None:
        run = Run(row=row, status=row.status())
        with self._lock:
            if row.round_id in self._runs:
                return
            self._runs[row.round_id] = run
        # The trace goes on in the round's thread: a child of the StartScoring call that stored it
        # (one trace from the gateway to every worker); a round claimed by the lease loop starts
        # a trace of its own.
        threading.Thread(target=self._traced_round, args=(run, tracing.capture()), name=f"round-{row.round_id}",
                         daemon=True).start()

    def _traced_round(self, run: Run, captured: tracing.Captured) -> None:
        with tracing.attached(captured), tracing.span("scorer.round", ftps__task=run.row.task_id,
                                                      ftps__round=run.round_id,
                                                      ftps__models=run.row.models_total,
                                                      ftps__records=len(run.row.record_ids)):
            self._run_round(run)

    def _write(self, run: Run, **fields) -> None:
        """Write the round's progress, as its owner: a lost lease, or a database that cannot be
        reached, ends this replica's run of the round (:class:`RoundAbandoned`)."""
        _write_held(run.lost, f"round {run.round_id}",
                    lambda: self._rounds.update(run.round_id, owner=self.owner, **fields))
        status = common_pb2.RoundStatus()
        status.CopyFrom(run.status)
        for k in ("state", "models_done", "message", "models_total"):
            if fields.get(k) is not None:
                setattr(status, k, fields[k])
        run.status = status
        with self._progress:
            self._progress.notify_all()

    # -- preparation stage -------------------------------------------------------------------
    def _offline_prefix(self, task: registry_pb2.Task) -> str:
        return f"scorer/tasks/{task.task_id}/offline/{task.base_model.sha256[:16]}"

    def _builder_data(self, task: registry_pb2.Task) -> tuple[np.ndarray, np.ndarray]:
        """The task's builder records (npz or .beton, as uploaded and checked by the registry)."""
        try:
            records = builder_data(self._store.get_ref(task.builder_data))
        except RecordsError as exc:
            raise InvalidArgument(str(exc), reason="ARCHIVE_INVALID", field="builder_data") from exc
        return records.x, records.y

    def get_offline(self, task_id: str, who: Principal) -> common_pb2.OfflineGaussian:
        task = self._ready_task(task_id, who, action="read the offline Gaussian of")
        gaussian = self._offline.get(task_id, task.base_model.sha256)
        if gaussian is None:
            raise NotFound(f"task {task_id} has no offline Gaussian for base model "
                           f"v{task.base_model.version}; run the preparation stage", reason="PREPARATION_NOT_FOUND")
        return gaussian

    def prepare_offline(self, task_id: str, *, refit: bool = False, who: Principal,
                        progress: Callable[[int, int], None] | None = None) -> common_pb2.OfflineGaussian:
        """The preparation stage, waited for: started (or joined, when one runs on any replica) as
        :meth:`start_preparation`, followed to its end. FAILED_PRECONDITION (PREPARATION_FAILED) with
        its message when it fails. An offline-global round needs it this way."""
        prep = self.start_preparation(task_id, refit=refit, who=who)
        for prep in self.watch_preparation(task_id, is_active=lambda: not self._stop.is_set(), who=who):
            if progress:
                progress(prep.models_done, prep.models_total)
        if prep.state == _PREP_READY and prep.HasField("gaussian"):
            return prep.gaussian
        if prep.state == _PREP_FAILED:
            raise FailedPrecondition(f"the preparation stage failed: {prep.message}", reason="PREPARATION_FAILED")
        raise Unavailable(f"the preparation stage of task {task_id} did not end (the scorer is stopping)")

    def start_preparation(self, task_id: str, *, refit: bool = False, who: Principal) -> scorer_pb2.Preparation:
        """Start the preparation stage (k shadow fine-tunes, then the offline Gaussian) in the
        background and return at once: PREPARING, or READY when a Gaussian for the task's current
        base model is stored and not ``refit``. While one runs (on any replica) it is the one
        returned. Runs under a lease like a round's: a replica that dies mid-way leaves it to another."""
        task = self._ready_task(task_id, who, action="prepare")
        sha = task.base_model.sha256
        stored = None if refit else self._offline.get(task_id, sha)
        if stored is not None:
            row = self._preparations.get(task_id, sha)
            if row is None or row.terminal:  # READY (or a stale FAILED, superseded by the Gaussian)
                if self._metrics is not None:
                    self._metrics.preparations.labels("cached").inc()
                return self._preparation_message(row if row is not None and row.state == _PREP_READY else None,
                                                 stored, task_id=task_id, sha=sha)
        row, run_here = self._preparations.start(
            task_id, sha, preparation_id=f"prep-{secrets.token_hex(8)}",
            models_total=task.settings.shadow_models, refit=refit, owner=self.owner, lease_s=self._lease_s,
            restart_ready=refit or stored is None)
        if run_here:
            log.info("preparation %s of task %s started (%d shadow models)", row.preparation_id, task_id,
                     row.models_total)
            self._launch_preparation(row, task)
        elif row.state == _PREP_READY and self._metrics is not None:
            self._metrics.preparations.labels("cached").inc()
        return self._preparation_message(row, task_id=task_id, sha=sha)

    def get_preparation(self, task_id: str, who: Principal) -> scorer_pb2.Preparation:
        """The task's preparation for its current base model; READY when only its Gaussian is stored
        (fitted before preparations were operations). NOT_FOUND (PREPARATION_NOT_FOUND) otherwise."""
        check_id(task_id, "task_id")
        task = authorized_task(who, task_id, self._get_task, action="read the preparation of")
        sha = task.base_model.sha256
        row = self._preparations.get(task_id, sha) if sha else None
        if row is None:
            stored = self._offline.get(task_id, sha) if sha else None
            if stored is None:
                raise NotFound(f"task {task_id} has no preparation for its current base model"
                               + (f" (v{task.base_model.version})" if sha else "") + "; start the preparation stage",
                               reason="PREPARATION_NOT_FOUND", field="task_id")
            return self._preparation_message(None, stored, task_id=task_id, sha=sha)
        return self._preparation_message(row, task_id=task_id, sha=sha)

    def watch_preparation(self, task_id: str, *, is_active: Callable[[], bool],
                          who: Principal) -> Iterator[scorer_pb2.Preparation]:
        """The preparation's state first, then each change (state, models done, message), until READY
        or FAILED: read every ``poll_s`` (any replica's progress), or at once when one running here moves."""
        prep = self.get_preparation(task_id, who)
        last = None
        while True:
            key = (prep.preparation_id, prep.state, prep.models_done, prep.message)
            if key != last:
                last = key
                yield prep
                if prep.state in (_PREP_READY, _PREP_FAILED):
                    return
            if not is_active():
                return
            with self._progress:
                self._progress.wait(timeout=self._poll_s)
            row = self._preparations.get(task_id, prep.base_model_sha256)
            if row is not None:
                prep = self._preparation_message(row, task_id=task_id, sha=prep.base_model_sha256)

    def _preparation_message(self, row: PreparationRow | None, gaussian: common_pb2.OfflineGaussian | None = None,
                             *, task_id: str, sha: str) -> scorer_pb2.Preparation:
        """The Preparation of a row (the Gaussian read when READY), or, without a row, of a stored Gaussian."""
        if row is None:
            assert gaussian is not None
            pid = "prep-" + hashlib.sha256(f"{task_id}:{sha}:{gaussian.fitted_at.ToJsonString()}".encode()).hexdigest()[:16]
            out = scorer_pb2.Preparation(
                task_id=task_id, preparation_id=pid, state=_PREP_READY, models_done=gaussian.k,
                models_total=gaussian.k, elapsed_s=float(gaussian.timings.get("total_s", 0.0)),
                message=_ready_message(gaussian), gaussian=gaussian, base_model_sha256=sha)
            out.started_at.CopyFrom(gaussian.fitted_at)
            return out
        now = time.time()
        out = scorer_pb2.Preparation(
            task_id=row.task_id, preparation_id=row.preparation_id, state=row.state, models_done=row.models_done,
            models_total=row.models_total, message=row.message, base_model_sha256=row.base_model_sha256,
            elapsed_s=max(0.0, (row.ended_at if row.ended_at is not None else now) - row.started_at))
        out.started_at.FromMilliseconds(int(row.started_at * 1000))
        if not row.terminal and 0 < row.models_done < row.models_total:
            pace = max(0.0, now - row.run_started_at) / row.models_done
            out.remaining_s = pace * (row.models_total - row.models_done)
        if row.state == _PREP_READY:
            gaussian = gaussian or self._offline.get(row.task_id, row.base_model_sha256)
            if gaussian is not None:
                out.gaussian.CopyFrom(gaussian)
        return out

    def _launch_preparation(self, row: PreparationRow, task: registry_pb2.Task) -> None:
        run = PrepRun(row=row, task=task)
        with self._lock:
            running = self._preps.get(run.key)
            if running is not None and running.row.preparation_id == row.preparation_id and not running.lost.is_set():
                return
            self._preps[run.key] = run
        threading.Thread(target=self._traced_preparation, args=(run, tracing.capture()),
                         name=f"prepare-{row.task_id}", daemon=True).start()

    def _prep_write(self, run: PrepRun, **fields) -> None:
        """Write the preparation's progress as its lease holder, as :meth:`_write` does a round's."""
        _write_held(run.lost, f"preparation {run.row.preparation_id}",
                    lambda: self._preparations.update(run.row, owner=self.owner, **fields))
        with self._progress:
            self._progress.notify_all()

    def _traced_preparation(self, run: PrepRun, captured: tracing.Captured) -> None:
        with tracing.attached(captured), tracing.span("scorer.preparation", ftps__task=run.row.task_id,
                                                      ftps__preparation=run.row.preparation_id,
                                                      ftps__models=run.row.models_total):
            self._run_preparation(run)

    def _run_preparation(self, run: PrepRun) -> None:
        row, task = run.row, run.task
        k = row.models_total

        def progress(done: int, total: int) -> None:
            try:
                self._prep_write(run, models_done=done, message=f"fine-tuned {done} of {total} shadow models")
            except RoundAbandoned as exc:  # the pool's callback must not fail the jobs: the end write tells
                log.warning("preparation %s: progress not written: %s", row.preparation_id, exc)

        try:
            try:
                if task.base_model.sha256 != row.base_model_sha256:
                    raise FailedPrecondition("the task's base model changed while it was being prepared; "
                                             "start the preparation stage again", reason="TASK_NOT_READY")
                gaussian = self._prepare(task, refit=row.refit, progress=progress)
                self._prep_write(run, state=_PREP_READY, models_done=k, message=_ready_message(gaussian))
                if self._metrics is not None:
                    self._metrics.preparations.labels("done").inc()
            except RoundAbandoned:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure ends the preparation with a reason
                if isinstance(exc, (FtpsError, ValueError)) and getattr(exc, "reason", "") != "INTERNAL":
                    message = str(exc)
                    log.warning("preparation %s of task %s failed: %s", row.preparation_id, row.task_id, message)
                else:
                    message = _PREP_INTERNAL
                    log.exception("preparation %s of task %s failed", row.preparation_id, row.task_id)
                self._prep_write(run, state=_PREP_FAILED, message=message)
                if self._metrics is not None:
                    self._metrics.preparations.labels("failed").inc()
        except LeaseLost:
            log.warning("preparation %s: no longer this replica's (lease lost); stopped", row.preparation_id)
        except RoundAbandoned as exc:
            log.warning("%s; the preparation runs again once its lease ends", exc)
        finally:
            with self._lock:
                if self._preps.get(run.key) is run:
                    del self._preps[run.key]

    def _prepare(self, task: registry_pb2.Task, *, refit: bool,
                 progress: Callable[[int, int], None] | None) -> common_pb2.OfflineGaussian:
        task_id = task.task_id
        prefix = self._offline_prefix(task)
        t0 = time.perf_counter()
        x, y = self._builder_data(task)
        seed = derive_seed(task.settings.seed, task.base_model.sha256, "offline")
        perm = np.random.default_rng(seed).permutation(len(x))
        n_heldout = min(len(x) // 2, self._heldout_max)
        # Shadow models see as many records as a round's models do (about m/2 each).
        n_pool = min(len(x) - n_heldout, task.settings.batch_threshold)
        heldout, pool = perm[:n_heldout], perm[n_heldout:n_heldout + n_pool]
        pool_ref = self._store.put_bytes(f"{prefix}/pool.npz", archives.records_to_npz(x[pool], y[pool]))
        heldout_ref = self._store.put_bytes(f"{prefix}/heldout.npz",
                                            archives.records_to_npz(x[heldout], y[heldout]))
        k = task.settings.shadow_models
        masks = shadow_masks(k, n_pool, seed=seed)
        jobs = make_jobs(task, f"offline-{task.task_id}", pool_ref, masks, model_seeds(seed, k),
                         eval_records=heldout_ref)
        done = [0]

        def on_done(result: worker_pb2.RunJobResponse) -> None:
            done[0] += len(result.model_indices)
            if progress:
                progress(done[0], k)

        t_ft = time.perf_counter()
        results = self._pool.run_all(jobs, on_done)
        finetune_s = time.perf_counter() - t_ft
        phi = np.concatenate([serde.array_from_tensor(r.phi, field="phi") for r in results])
        mu, sigma = scoring.fit_offline_gaussian(phi)
        gaussian = common_pb2.OfflineGaussian(
            task_id=task_id, mu=mu, sigma=sigma, k=k, n_values=int(phi.size), fitted_at=now_ts(),
            base_model_sha256=task.base_model.sha256,
            timings={"finetune_s": finetune_s, "worker_jobs_s": float(sum(r.seconds for r in results)),
                     "total_s": time.perf_counter() - t0})
        gaussian = self._offline.put(gaussian, replace=refit)
        log.info("task %s: offline Gaussian mu=%.3f sigma=%.3f from k=%d shadow models (%.1fs)",
                 task_id, gaussian.mu, gaussian.sigma, k, time.perf_counter() - t0)
        return gaussian

    def _ready_task(self, task_id: str, who: Principal, *, action: str = "use") -> registry_pb2.Task:
        """The task, once ``who`` may ``action`` it and all its uploads are in."""
        check_id(task_id, "task_id")
        task = authorized_task(who, task_id, self._get_task, action=action)
        require_ready(task)
        return task

    # -- cost before you pay --------------------------------------------------------------------
    def estimate_round(self, task_id: str, *, n_models: int = 0, n_records: int = 0,
                       who: Principal) -> scorer_pb2.RoundEstimate:
        """What a round of ``n_models`` models on ``n_records`` records (0: the task's settings)
        would cost, from the task's last finished round, else its preparation (:mod:`costs`)."""
        check_id(task_id, "task_id")
        task = authorized_task(who, task_id, self._get_task, action="estimate rounds of")
        s = task.settings
        n, m = n_models or s.n_models, n_records or s.batch_threshold
        if not valid_n_models(n):
            raise InvalidArgument(f"n_models must be even and in [4, {MAX_MODELS}], got {n}",
                                  reason="INVALID_SETTINGS", field="n_models")
        if not valid_batch_size(m):
            raise InvalidArgument(f"n_records must be in [2, {MAX_RECORDS}], got {m}", reason="INVALID_SETTINGS",
                                  field="n_records")
        basis = self._cost_basis(task)
        if basis is None:
            raise NotFound(f"nothing of task {task_id} was measured yet: run the preparation stage first "
                           "(its shadow fine-tunes time the workers)", reason="PREPARATION_NOT_FOUND",
                           field="task_id")
        est = costs.estimate(basis, n_models=n, n_records=m, models_per_job=s.models_per_job or 4,
                             builder_mix=s.builder_mix, parallel_jobs=self._pool.parallelism)
        return scorer_pb2.RoundEstimate(task_id=task_id, **asdict(est))  # same field names

    def _cost_basis(self, task: registry_pb2.Task) -> costs.Basis | None:
        row = self._rounds.latest_done(task.task_id)
        if row is not None and row.result is not None:
            try:
                result = common_pb2.RoundResult.FromString(self._store.get_ref(row.result))
            except (NotFound, DataLoss) as exc:  # the result blob is gone: fall back to the preparation
                log.warning("round %s: its result is unreadable for a cost basis: %s", row.round_id, exc)
            else:
                worker_s = result.timings.get("worker_jobs_s", 0.0)
                models = result.batch.n_models or row.models_total
                if worker_s > 0 and models:
                    return costs.Basis(what=f"round {row.round_id} of this task ({models} models, "
                                            f"{row.n_records} records)", models=models, worker_s=worker_s,
                                       records=row.n_records, scoring_s=result.timings.get("scoring_s", 0.0))
        gaussian = self._offline.get(task.task_id, task.base_model.sha256) if task.base_model.sha256 else None
        if gaussian is not None and gaussian.timings.get("worker_jobs_s", 0.0) > 0 and gaussian.k:
            return costs.Basis(what=f"the preparation stage's {gaussian.k} shadow fine-tunes on the builder's data",
                               models=gaussian.k, worker_s=gaussian.timings["worker_jobs_s"])
        return None

    # -- rounds --------------------------------------------------------------------------------
    def start_round(self, task_id: str, round_id: str, batch: common_pb2.BlobRef,
                    record_ids: list[str], contributors: list[str],
                    who: Principal) -> common_pb2.RoundStatus:
        who.require_role("service", "admin", what="start scoring rounds (the gateway does)")
        check_id(round_id, "round_id")
        existing = self._rounds.get(round_id)
        if existing is not None:
            return existing.status()
        task = self._ready_task(task_id, who, action="score rounds of")
        if not batch.key or not batch.sha256:
            raise InvalidArgument("batch is required (key and sha256)", reason="FIELD_REQUIRED", field="batch")
        if len(record_ids) != len(contributors):
            raise InvalidArgument(f"record_ids ({len(record_ids)}) and contributors "
                                  f"({len(contributors)}) differ in length", field="contributors")
        if len(record_ids) < 2:
            raise InvalidArgument("a round needs at least 2 records", field="record_ids")
        row, created = self._rounds.create(
            NewRound(round_id=round_id, task_id=task_id, models_total=task.settings.n_models, batch=batch,
                     record_ids=list(record_ids), contributors=list(contributors)),
            owner=self.owner, lease_s=self._lease_s)
        if created:  # this replica stored it and holds its lease: it runs it
            self._launch(row)
        return row.status()

    def _run_round(self, run: Run) -> None:
        t0 = time.perf_counter()
        try:
            try:
                result = self._score_round(run)
                result.timings["total_s"] = time.perf_counter() - t0
                # The result is stored before the row points at it; both say the round is done.
                result.status.message = (f"done: scored {len(result.scores)} of {len(run.row.record_ids)} "
                                         f"records with {result.batch.n_models} models" + (
                                             f" (grown from {run.row.grow_from})"
                                             if run.row.grow_from is not None else ""))
                ref = self._store.put_bytes(f"scorer/rounds/{run.round_id}/result-{run.nonce}.pb",
                                            result.SerializeToString())
                self._write(run, state=common_pb2.ROUND_STATE_DONE, result=ref, message=result.status.message)
                self._finished("done", t0)
                log.info("round %s done in %.1fs", run.round_id, time.perf_counter() - t0)
            except RoundAbandoned:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure ends the round with a reason
                reason = str(exc) if isinstance(exc, (FtpsError, ValueError)) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, (FtpsError, ValueError)):
                    log.exception("round %s failed", run.round_id)
                else:
                    log.warning("round %s failed: %s", run.round_id, reason)
                if run.row.grow_from is not None:
                    # A growth that failed leaves the round as it was: DONE, its scores so far.
                    self._write(run, state=common_pb2.ROUND_STATE_DONE, result=run.row.result,
                                models_done=run.row.grow_from, models_total=run.row.grow_from,
                                message=f"growing to {run.row.models_total} models failed: {reason}; the "
                                        f"scores are those of its {run.row.grow_from} models")
                    self._finished("done", t0)
                    return
                self._write(run, state=common_pb2.ROUND_STATE_FAILED, message=reason)
                self._finished("failed", t0)
        except LeaseLost:
            log.warning("round %s: no longer this replica's (lease lost); stopped running it", run.round_id)
        except RoundAbandoned as exc:
            log.warning("%s; the round runs again once its lease ends", exc)
        finally:
            with self._lock:
                self._runs.pop(run.round_id, None)

    def _score_round(self, run: Run) -> common_pb2.RoundResult:
        task = self._ready_task(run.row.task_id, SELF)
        s = task.settings
        method = serde.method_name(s.method)
        offline = None
        if s.method == common_pb2.METHOD_OFFLINE_GLOBAL:
            self._write(run, state=common_pb2.ROUND_STATE_PREPARING, message="fitting the offline Gaussian")
            offline = self.prepare_offline(run.row.task_id, who=SELF)
        else:
            try:
                offline = self.get_offline(run.row.task_id, SELF)
            except NotFound:
                offline = None
        if run.row.grow_from is not None:
            return self._grow(run, task, method, offline)
        if run.row.variant is not None:
            return self._score_variant(run, task, method, offline)
        n = run.row.models_total  # the task's n_models when the round was started
        batch, record_ids, contributors = run.row.batch, list(run.row.record_ids), list(run.row.contributors)
        # Checked here rather than left to the workers: their NOT_FOUND would read as "workers
        # unavailable" after every worker was tried, and name no cause a builder can act on.
        if not self._store.exists(batch.key):
            raise NotFound(f"the round's batch {batch.key} is no longer in object storage",
                           reason="OBJECT_NOT_FOUND")
        excluded: list[common_pb2.ExcludedRecord] = []
        t_ft = time.perf_counter()
        answers: list[worker_pb2.RunJobResponse] = []  # every finished job's answer, phi taken out
        # At most two passes: the batch, then once more without the records traced as the cause
        # of failed models. One contributor's records never fail the round for everyone.
        for attempt in range(2):
            m = len(record_ids)
            # Seeded by the batch's content, not the round id: the same batch of the same task always
            # gets the same masks and models, on any stack, after any restart or takeover.
            seed = derive_seed(s.seed, batch.sha256)
            if s.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR:
                masks = make_group_masks(n, group_index(contributors)[1], seed=seed)
            else:
                masks = make_masks(n, m, seed=seed)
            jobs = make_jobs(task, run.round_id if attempt == 0 else f"{run.round_id}-a{attempt}", batch,
                             masks, model_seeds(seed, n), builder_mix=s.builder_mix)
            self._write(run, state=common_pb2.ROUND_STATE_FINETUNING, models_done=0,
                        message=f"fine-tuning {n} models on {m} records" + (
                            f" (again, without {len(excluded)} record(s) that made fine-tuning fail)"
                            if attempt else ""))
            phi, failed = self._finetune(run, jobs, n, m, answers)
            causes, broken, unexplained = trace_failures(phi, masks, failed)
            if unexplained:
                raise FailedPrecondition(f"fine-tuning failed on {broken} of {n} models, not traced to "
                                         f"particular records: {unexplained}", reason="STRATEGY_FAILED")
            if not causes:
                break
            if attempt == 1:
                raise FailedPrecondition("fine-tuning failed again after leaving out the records traced "
                                         f"as its cause: {next(iter(causes.values()))}", reason="STRATEGY_FAILED")
            keep = np.setdiff1d(np.arange(m), list(causes))
            if len(keep) < max(2, min_records(n)):
                raise FailedPrecondition(f"{len(causes)} of {m} records made fine-tuning fail; too few are "
                                         f"left to score ({len(keep)})", reason="STRATEGY_FAILED")
            for j, reason in sorted(causes.items()):
                excluded.append(common_pb2.ExcludedRecord(record_id=record_ids[j], contributor=contributors[j],
                                                          reason=reason))
                log.warning("round %s: record %s of %s excluded: %s", run.round_id, record_ids[j],
                            contributors[j], reason)
            record_ids = [record_ids[j] for j in keep]
            contributors = [contributors[j] for j in keep]
            if not broken:  # only statistics of those records were bad: every model is sound
                phi, masks = phi[:, keep], masks[:, keep]
                break
            arrays = archives.npz_arrays(self._store.get_ref(batch))
            batch = self._store.put_bytes(f"scorer/rounds/{run.round_id}/batch-a{attempt + 1}-{run.nonce}.npz",
                                          archives.records_to_npz(arrays["x"][keep], arrays["y"][keep]))
        finetune_s = time.perf_counter() - t_ft
        self._store.put_bytes(f"scorer/rounds/{run.round_id}/phi.npz",
                              archives.records_to_npz(phi, masks))  # x=phi, y=member
        self._write(run, state=common_pb2.ROUND_STATE_SCORING, message="scoring")
        with tracing.span("scorer.score", ftps__method=method, ftps__models=int(phi.shape[0]),
                          ftps__records=len(record_ids)):
            result = self._scored(run, s, phi, masks, record_ids, contributors, method=method, offline=offline,
                                  answers=answers, finetune_s=finetune_s)
        result.excluded.extend(excluded)
        return result

    def _scored(self, run: Run, s: common_pb2.TaskSettings, phi: np.ndarray, masks: np.ndarray,
                record_ids: list[str], contributors: list[str], *, method: str,
                offline: common_pb2.OfflineGaussian | None, answers: list[worker_pb2.RunJobResponse],
                finetune_s: float) -> common_pb2.RoundResult:
        """A round's result from its statistics: every method's scores (and each contribution's
        under contributor-level masks), the status DONE, the timings and the DP-SGD guarantee."""
        t_sc = time.perf_counter()
        delta = s.dp_delta or dp.DEFAULT_DELTA  # tasks created before dp_delta
        result = score_all(phi, masks, method=method, alpha=s.alpha, fixed_variance=s.fixed_variance,
                           delta=delta, offline=offline, record_ids=record_ids, contributors=contributors,
                           round_id=run.round_id)
        if s.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR:
            result.contributor_scores.extend(contributor_scores(phi, masks, contributors, round_id=run.round_id,
                                                                delta=delta))
        result.status.CopyFrom(run.status)
        result.status.state = common_pb2.ROUND_STATE_DONE
        result.status.models_done = result.status.models_total = int(phi.shape[0])
        result.timings["finetune_s"] = finetune_s
        # The workers' own seconds (sandbox, summed over jobs): finetune_s minus this is the fan-out.
        result.timings["worker_jobs_s"] = float(sum(a.seconds for a in answers))
        # DP-SGD: the round's guarantee is its weakest model's (all 0 without DP-SGD).
        weakest = max(answers, key=lambda a: a.dp_epsilon, default=worker_pb2.RunJobResponse())
        result.dp_epsilon, result.dp_delta = weakest.dp_epsilon, weakest.dp_delta
        result.dp_noise_multiplier = weakest.dp_noise_multiplier
        result.timings["scoring_s"] = time.perf_counter() - t_sc
        return result

    def _grow(self, run: Run, task: registry_pb2.Task, method: str,
              offline: common_pb2.OfflineGaussian | None) -> common_pb2.RoundResult:
        """A DONE round grown to ``models_total`` models: its statistics so far reused, the added
        models in complementary pairs with their own masks and seeds (seeded by the batch and the
        size grown from, so a replica taking the growth over fine-tunes the same models), then every
        score computed again from all of them."""
        s, row = task.settings, run.row
        old_n, n = row.grow_from, row.models_total
        before = archives.npz_arrays(self._store.get_bytes(self._phi_key(run.round_id, old_n)))
        phi_old, masks_old = before["x"], before["y"].astype(bool)
        m = phi_old.shape[1]
        record_ids, contributors = list(row.record_ids), list(row.contributors)
        if phi_old.shape != (old_n, len(record_ids)):
            raise FailedPrecondition(f"round {run.round_id}: its stored statistics are {list(phi_old.shape)}, "
                                     f"not [{old_n}, {len(record_ids)}]; it cannot grow", reason="FAILED_PRECONDITION")
        seed = derive_seed(s.seed, row.batch.sha256, "grow", old_n)
        if s.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR:
            added = make_group_masks(max(n - old_n, 4), group_index(contributors)[1], seed=seed)[:n - old_n]
        else:
            # make_masks draws at least two pairs; a growth by one pair takes the first
            added = make_masks(max(n - old_n, 4), m, seed=seed)[:n - old_n]
        jobs = make_jobs(task, f"{run.round_id}-g{old_n}", row.batch, added, model_seeds(seed, n - old_n),
                         builder_mix=s.builder_mix)
        self._write(run, state=common_pb2.ROUND_STATE_FINETUNING, models_done=old_n,
                    message=f"growing from {old_n} to {n} models: fine-tuning {n - old_n} more on {m} records")
        t_ft = time.perf_counter()
        answers: list[worker_pb2.RunJobResponse] = []
        phi_new, failed = self._finetune(run, jobs, n - old_n, m, answers, done_before=old_n)
        if failed:
            raise FailedPrecondition(f"fine-tuning failed on {len(failed)} of the {n - old_n} added models: "
                                     f"{next(iter(failed.values()))}", reason="STRATEGY_FAILED")
        phi, masks = np.concatenate([phi_old, phi_new]), np.concatenate([masks_old, added])
        finetune_s = time.perf_counter() - t_ft
        self._store.put_bytes(f"scorer/rounds/{run.round_id}/phi-n{n}.npz", archives.records_to_npz(phi, masks))
        self._write(run, state=common_pb2.ROUND_STATE_SCORING, message=f"scoring with {n} models")
        # finetune_s: of the added models only, what growing cost
        return self._scored(run, s, phi, masks, record_ids, contributors, method=method, offline=offline,
                            answers=answers, finetune_s=finetune_s)

    def _score_variant(self, run: Run, task: registry_pb2.Task, method: str,
                       offline: common_pb2.OfflineGaussian | None) -> common_pb2.RoundResult:
        """A recipe comparison's variant: its round's batch fine-tuned with the same masks and
        seeds (seeded by the batch, as the round was) under the variant's strategy, statistics on
        the batch scored as the round's, and on the held-out builder records the utility."""
        s, row, variant = task.settings, run.row, run.row.variant
        if variant.strategy is not None:
            task = registry_pb2.Task.FromString(task.SerializeToString())
            task.strategy.CopyFrom(variant.strategy)
        n, m = row.models_total, len(row.record_ids)
        seed = derive_seed(s.seed, row.batch.sha256)
        if s.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR:
            masks = make_group_masks(n, group_index(list(row.contributors))[1], seed=seed)
        else:
            masks = make_masks(n, m, seed=seed)
        jobs = make_jobs(task, run.round_id, row.batch, masks, model_seeds(seed, n),
                         eval_records=variant.eval_records, builder_mix=s.builder_mix)
        self._write(run, state=common_pb2.ROUND_STATE_FINETUNING, models_done=0,
                    message=f"recipe {variant.name!r}: fine-tuning {n} models on {m} records")
        t_ft = time.perf_counter()
        answers: list[worker_pb2.RunJobResponse] = []
        evaluated = archives.npz_arrays(self._store.get_ref(variant.eval_records))["y"]
        phi_all, failed = self._finetune(run, jobs, n, len(evaluated), answers)
        if failed:
            raise FailedPrecondition(f"recipe {variant.name!r}: fine-tuning failed on {len(failed)} of {n} models: "
                                     f"{next(iter(failed.values()))}", reason="STRATEGY_FAILED")
        phi, heldout = phi_all[:, :m], phi_all[:, m:]
        finetune_s = time.perf_counter() - t_ft
        self._write(run, state=common_pb2.ROUND_STATE_SCORING, message=f"recipe {variant.name!r}: scoring")
        result = self._scored(run, s, phi, masks, list(row.record_ids), list(row.contributors), method=method,
                              offline=offline, answers=answers, finetune_s=finetune_s)
        # phi > 0: the true class gets more than half of the probability (a correct prediction).
        result.heldout_accuracy = float(np.mean(np.nan_to_num(heldout, nan=-1.0) > 0)) if heldout.size else 0.0
        result.heldout_records = heldout.shape[1]
        return result

    def compare_recipes(self, round_id: str, alternatives: list[common_pb2.RecipeAlternative],
                        who: Principal) -> common_pb2.RecipeComparison:
        """Run a DONE round's batch under the task's recipe ("current") and each alternative,
        with the round's masks and seeds, as rounds of their own (``{round}-c{k}``); returns the
        comparison at once."""
        who.require_role("service", "admin", what="compare recipes (the gateway does)")
        row = self.get(round_id, who)
        if not 1 <= len(alternatives) <= MAX_ALTERNATIVES:
            raise InvalidArgument(f"alternatives: 1 to {MAX_ALTERNATIVES} recipes, got {len(alternatives)}",
                                  field="alternatives")
        names = ["current"]
        for k, alt in enumerate(alternatives):
            where = f"alternatives[{k}]"
            if not (0 < len(alt.name) <= 40 and alt.name.isprintable()) or alt.name in names:
                raise InvalidArgument(f"{where}.name must be 1-40 printable characters, unique and not 'current', "
                                      f"got {alt.name[:40]!r}", field=f"{where}.name")
            names.append(alt.name)
            if len(alt.strategy) > MAX_STRATEGY_BYTES:
                raise InvalidArgument(f"{where}.strategy is {len(alt.strategy)} bytes; at most {MAX_STRATEGY_BYTES}",
                                      reason="STRATEGY_INVALID", field=f"{where}.strategy")
            check_source(alt.strategy, what=f"{where}.strategy")
        if row.state != common_pb2.ROUND_STATE_DONE or row.result is None or row.variant is not None:
            raise FailedPrecondition(f"round {round_id} is not a DONE round: only one can be compared",
                                     reason="FAILED_PRECONDITION")
        earlier = self._rounds.variants(round_id)
        running = [v for v in earlier if not v.terminal]
        if running:
            raise FailedPrecondition(f"round {round_id} is being compared already ({len(running)} recipe(s) "
                                     "running): wait for GetComparison to show them done", reason="FAILED_PRECONDITION")
        if self.get_result(round_id, who).excluded:
            raise FailedPrecondition(f"round {round_id} left records out; its batch is not the one it scored: "
                                     "compare recipes on a round without exclusions", reason="FAILED_PRECONDITION")
        task = self._ready_task(row.task_id, SELF)
        # The batch, then held-out builder records: one evaluation set, phi on both per model.
        batch = archives.npz_arrays(self._store.get_ref(row.batch))
        builder_x, builder_y = self._builder_data(task)
        rng = np.random.default_rng(derive_seed(task.settings.seed, row.batch.sha256, "heldout"))
        held = rng.permutation(len(builder_y))[:self._heldout_max]
        nonce = secrets.token_hex(4)
        eval_ref = self._store.put_bytes(
            f"scorer/rounds/{round_id}/compare-{nonce}/eval.npz",
            archives.records_to_npz(np.concatenate([batch["x"], builder_x[held]]),
                                 np.concatenate([batch["y"], builder_y[held]])))
        rows = []
        start = len(earlier)  # variants of earlier comparisons keep their ids
        for k, (name, alt) in enumerate([("current", None), *((a.name, a) for a in alternatives)]):
            strategy = None if alt is None else self._store.put_bytes(
                f"scorer/rounds/{round_id}/compare-{nonce}/{k}.py", bytes(alt.strategy))
            created, fresh = self._rounds.create(NewRound(
                round_id=f"{round_id}-c{start + k}", task_id=row.task_id, models_total=row.models_total,
                batch=row.batch, record_ids=list(row.record_ids), contributors=list(row.contributors),
                message=f"recipe {name!r}: waiting", variant=Variant(of=round_id, name=name, strategy=strategy,
                                                                     eval_records=eval_ref)),
                owner=self.owner, lease_s=self._lease_s)
            if fresh:
                self._launch(created)
            rows.append(created)
        log.info("round %s: comparing %d recipe(s): %s", round_id, len(rows), ", ".join(names))
        return self.get_comparison(round_id, who, only=[r.round_id for r in rows])

    def get_comparison(self, round_id: str, who: Principal, *,
                       only: list[str] | None = None) -> common_pb2.RecipeComparison:
        """The round's latest comparison: its variants' progress and, once DONE, results."""
        self.get(round_id, who)
        variants = self._rounds.variants(round_id)
        if only is None and variants:
            # The latest comparison: the variants from its "current" on.
            last = max(k for k, v in enumerate(variants) if v.variant.name == "current")
            variants = variants[last:]
        elif only is not None:
            variants = [v for v in variants if v.round_id in only]
        if not variants:
            raise NotFound(f"round {round_id} has no recipe comparison", reason="ROUND_NOT_FOUND", field="round_id")
        out = common_pb2.RecipeComparison(round_id=round_id)
        exposed: set[str] | None = None
        for v in variants:
            item = out.variants.add(name=v.variant.name, status=v.status())
            if v.state != common_pb2.ROUND_STATE_DONE:
                continue
            result = self.get_result(v.round_id, who)
            item.heldout_accuracy, item.heldout_records = result.heldout_accuracy, result.heldout_records
            item.batch.CopyFrom(result.batch)
            item.scores.extend(result.scores)
            item.dp_epsilon = result.dp_epsilon
            above = {sc.record_id for sc in result.scores if sc.score_ci_low > 0}
            exposed = above if exposed is None else exposed & above
        if all(v.state == common_pb2.ROUND_STATE_DONE for v in variants):
            order = [sc.record_id for sc in out.variants[0].scores]
            out.exposed_everywhere.extend(r for r in order if r in (exposed or set()))
        return out

    def _phi_key(self, round_id: str, n: int) -> str:
        """Where the round's statistics of ``n`` models are: a grown round's each size its own blob
        (a growth taken over by another replica reads the size it grew from); the first, phi.npz."""
        grown = f"scorer/rounds/{round_id}/phi-n{n}.npz"
        return grown if self._store.exists(grown) or not self._store.exists(
            f"scorer/rounds/{round_id}/phi.npz") else f"scorer/rounds/{round_id}/phi.npz"

    def grow_round(self, round_id: str, add_models: int, who: Principal) -> common_pb2.RoundStatus:
        """Add ``add_models`` models to a DONE round (GrowScoring): returns at once, the growth runs
        on this replica (any replica takes it over if this one stops)."""
        who.require_role("service", "admin", what="grow scoring rounds (the gateway does)")
        row = self.get(round_id, who)
        if isinstance(add_models, bool) or add_models < 2 or add_models % 2:
            raise InvalidArgument(f"add_models must be even and >= 2 (complementary pairs), got {add_models}",
                                  field="add_models")
        total = row.models_total + add_models
        if total > MAX_MODELS:
            raise InvalidArgument(f"round {round_id} has {row.models_total} models; adding {add_models} makes "
                                  f"{total}, over {MAX_MODELS}", field="add_models")
        if row.state != common_pb2.ROUND_STATE_DONE or row.result is None or row.grow_from is not None:
            raise FailedPrecondition(f"round {round_id} is {common_pb2.RoundState.Name(row.state)[12:].lower()}: "
                                     "only a DONE round can grow", reason="FAILED_PRECONDITION")
        if self.get_result(round_id, who).excluded:
            raise FailedPrecondition(f"round {round_id} left records out; its statistics cover another batch "
                                     "than its own, so it cannot grow: start a new round", reason="FAILED_PRECONDITION")
        grown = self._rounds.grow(round_id, models_total=total, owner=self.owner, lease_s=self._lease_s,
                                  message=f"growing from {row.models_total} to {total} models")
        if grown is None:  # another call grew it (or it changed) meanwhile
            return self.get(round_id, who).status()
        log.info("round %s: growing from %d to %d models", round_id, row.models_total, total)
        self._launch(grown)
        return grown.status()

    def _finetune(self, run: Run, jobs: list[worker_pb2.FinetuneJob], n: int, m: int,
                  answers: list[worker_pb2.RunJobResponse], *,
                  done_before: int = 0) -> tuple[np.ndarray, dict[int, str]]:
        """phi ``[n, m]`` of every job (NaN where a record's statistic is not finite), and the models
        whose job failed with a task error, each with the reason; each finished job's answer is added
        to ``answers`` without its phi (its seconds and DP budget). A failed job of several models is
        run again one model at a time, so a failure is pinned to the models (and records) behind it."""
        phi = np.full((n, m), np.nan)
        fine = np.zeros(n, dtype=bool)
        failed: dict[int, str] = {}
        failed_jobs: list[worker_pb2.FinetuneJob] = []

        def on_done(result: worker_pb2.RunJobResponse) -> None:
            rows = serde.array_from_tensor(result.phi, field="phi")
            if rows.shape != (len(result.model_indices), m):
                raise InvalidArgument(f"worker returned phi of shape {rows.shape}", reason="WORKER_OUTPUT_INVALID")
            phi[list(result.model_indices)] = rows
            fine[list(result.model_indices)] = True
            kept = worker_pb2.RunJobResponse()
            kept.CopyFrom(result)
            kept.ClearField("phi")  # already in ``phi``: a round keeps no second copy of it
            answers.append(kept)
            self._write(run, models_done=done_before + int(fine.sum()))

        def on_task_error(job: worker_pb2.FinetuneJob, exc: FtpsError) -> None:
            if len(job.models) > 1:
                failed_jobs.append(job)
            else:
                failed[job.models[0].index] = str(exc)

        self._pool.run_all(jobs, on_done, on_task_error=on_task_error)
        singles = []
        for job in failed_jobs:
            for spec in job.models:
                single = worker_pb2.FinetuneJob()
                single.CopyFrom(job)
                single.job_id = f"{job.job_id}-m{spec.index}"
                del single.models[:]
                single.models.append(spec)
                singles.append(single)
        if singles:
            log.warning("round %s: %d job(s) failed; running their %d models one by one to trace the failure",
                        run.round_id, len(failed_jobs), len(singles))
            self._pool.run_all(singles, on_done, on_task_error=on_task_error)
        return phi, failed

    def get(self, round_id: str, who: Principal) -> RoundRow:
        check_id(round_id, "round_id")
        row = self._rounds.get(round_id)
        if who.is_privileged:
            if row is None:
                raise NotFound(f"round {round_id} not found", reason="ROUND_NOT_FOUND", field="round_id")
            return row
        if row is None:  # not NOT_FOUND: no answer tells a caller which rounds exist
            raise denied(who, "read", f"round {round_id}")
        try:
            authorize_task(who, row.task_id, self._get_task(row.task_id).owner, action="read")
        except PermissionDenied:
            raise denied(who, "read", f"round {round_id}") from None
        return row

    def get_result(self, round_id: str, who: Principal) -> common_pb2.RoundResult:
        """The round's status and, once it has one, its result. A growing round (GrowScoring) keeps
        its last result, scores included, under its live status until the grown one is stored."""
        row = self.get(round_id, who)
        if row.result is None:
            return common_pb2.RoundResult(status=row.status())
        key = row.result.key  # a grown round has a new result blob: the cache follows it
        with self._lock:
            cached = self._results.get(key)
        if cached is None:
            cached = common_pb2.RoundResult.FromString(self._store.get_ref(row.result))
            with self._lock:
                self._results[key] = cached
                while len(self._results) > _RESULTS_CACHED:
                    self._results.popitem(last=False)
        status = row.status()
        if status == cached.status:
            return cached
        # Growing, or a growth that failed and left the round DONE with a message saying why.
        live = common_pb2.RoundResult()
        live.CopyFrom(cached)
        live.status.CopyFrom(status)
        return live

    def watch(self, round_id: str, *, is_active: Callable[[], bool],
              who: Principal) -> Iterator[common_pb2.RoundStatus]:
        """The round's status from the database (whichever replica runs it) each time it changes,
        until DONE or FAILED: read every ``poll_s``, or at once when a round running here moves."""
        row = self.get(round_id, who)
        last = None
        while True:
            status = row.status()
            if status != last:
                last = status
                yield status
                if row.terminal:
                    return
            if not is_active():
                return
            with self._progress:
                self._progress.wait(timeout=self._poll_s)
            row = self._rounds.get(round_id) or row


def score_all(phi: np.ndarray, member: np.ndarray, *, method: str, alpha: float, fixed_variance: bool,
              offline: common_pb2.OfflineGaussian | None, record_ids: list[str],
              contributors: list[str], round_id: str, delta: float = dp.DEFAULT_DELTA) -> common_pb2.RoundResult:
    """Every method on the same matrix: the headline ``method`` per record, all in the batch view."""
    result = common_pb2.RoundResult()
    headline = None
    for name in scoring.METHODS:
        kwargs: dict = {}
        if name == "offline-global":
            if offline is None:
                continue
            kwargs = dict(offline_mu=offline.mu, offline_sigma=offline.sigma)
        if name in ("offline-per-record", "online-per-record"):
            kwargs["fixed_variance"] = fixed_variance
        try:
            scored = scoring.score(phi, member, method=name, alpha=alpha, delta=delta, **kwargs)
        except ValueError as exc:
            if name == method:
                raise
            # A comparison method that cannot score this batch must not sink the headline.
            log.warning("round %s: %s not computed: %s", round_id, name, exc)
            continue
        metrics = batch_metrics(scored)
        result.method_metrics.append(metrics)
        if name == method:
            headline = scored
            result.batch.CopyFrom(metrics)
    if headline is None:
        raise FailedPrecondition(f"method {method} could not be computed (offline Gaussian missing)",
                                 reason="PREPARATION_MISSING")
    if offline is not None:
        result.offline.CopyFrom(offline)
    r = headline.records
    enum = serde.method_enum(method)
    for j, (rid, who) in enumerate(zip(record_ids, contributors)):
        result.scores.append(common_pb2.RecordScore(
            record_id=rid, contributor=who, round_id=round_id, index=j, score=float(r.score[j]),
            score_ci_low=float(r.score_ci_low[j]), score_ci_high=float(r.score_ci_high[j]),
            counted_p=float(r.counted_p[j]), counted_p_ci_low=float(r.counted_p_ci_low[j]),
            counted_p_ci_high=float(r.counted_p_ci_high[j]), n_in=int(r.n_in[j]),
            n_out=int(r.n_out[j]), auc=float(r.auc[j]),
            mu_in=float(r.mu_in[j]), sigma_in=float(r.sigma_in[j]), mu_out=float(r.mu_out[j]),
            sigma_out=float(r.sigma_out[j]), method=enum,
            empirical_mu=float(r.empirical_mu[j]), empirical_mu_ci_low=float(r.empirical_mu_ci_low[j]),
            empirical_mu_ci_high=float(r.empirical_mu_ci_high[j]),
            empirical_epsilon=float(r.empirical_epsilon[j]),
            empirical_epsilon_ci_low=float(r.empirical_epsilon_ci_low[j]),
            empirical_epsilon_ci_high=float(r.empirical_epsilon_ci_high[j]), delta=headline.delta))
    return result


def contributor_scores(phi: np.ndarray, masks: np.ndarray, contributors: list[str], *, round_id: str,
                       delta: float) -> list[common_pb2.ContributorScore]:
    """Each contributor's whole contribution scored (``scoring.score_groups``), in name order."""
    names, groups = group_index(contributors)
    scored = scoring.score_groups(phi, masks, groups, delta=delta)
    r = scored.records
    sizes = np.bincount(groups, minlength=len(names))
    return [common_pb2.ContributorScore(
        contributor=who, round_id=round_id, n_records=int(sizes[g]), score=float(r.score[g]),
        score_ci_low=float(r.score_ci_low[g]), score_ci_high=float(r.score_ci_high[g]),
        counted_p=float(r.counted_p[g]), empirical_mu=float(r.empirical_mu[g]),
        empirical_mu_ci_low=float(r.empirical_mu_ci_low[g]), empirical_mu_ci_high=float(r.empirical_mu_ci_high[g]),
        empirical_epsilon=float(r.empirical_epsilon[g]), empirical_epsilon_ci_low=float(r.empirical_epsilon_ci_low[g]),
        empirical_epsilon_ci_high=float(r.empirical_epsilon_ci_high[g]), delta=scored.delta,
        n_in=int(r.n_in[g]), n_out=int(r.n_out[g])) for g, who in enumerate(names)]


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, *, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` ROC points, spaced evenly on a log FPR axis (the plots are log-log)."""
    fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
    if len(fpr) <= points:
        return fpr, tpr
    # No grid point below the smallest non-zero FPR the curve can resolve (1 / #OUT pairs).
    lowest = fpr[fpr > 0].min(initial=1.0)
    grid = np.concatenate([[0.0], np.logspace(np.log10(lowest), 0, points - 1)])
    # The best TPR reachable at FPR <= each grid point (fpr is sorted ascending).
    idx = np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1)
    return grid, np.maximum.accumulate(tpr)[idx]


def batch_metrics(scored: "scoring.ScoreResult") -> common_pb2.BatchMetrics:
    roc_fpr, roc_tpr = thin_roc(scored.batch.fpr, scored.batch.tpr)
    return common_pb2.BatchMetrics(
        roc_fpr=roc_fpr.tolist(), roc_tpr=roc_tpr.tolist(),
        method=serde.method_enum(scored.method), n_models=scored.n_models, n_records=scored.n_records,
        auc=scored.batch.auc, tpr_at_1pct_fpr=scored.batch.tpr_at_1pct_fpr,
        tpr_at_0_1pct_fpr=scored.batch.tpr_at_0_1pct_fpr,
        mean_score=float(np.mean(scored.records.score)),  # the headline's mean (method-independent)
        mean_counted_p=float(np.mean(scored.records.counted_p)))
