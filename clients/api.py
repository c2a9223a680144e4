"""Typed client library over the gRPC contracts, shared by the command-line tools, the demo and
the end-to-end tests. Every call has a deadline; errors surface as ``grpc.RpcError``."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Callable, Hashable, Iterator

import grpc
import numpy as np

from ftps.common import grpcutil, serde
from ftps.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
)

CHUNK = 1024 * 1024
MAX_CHUNK_RECORDS = 10_000  # records in one UploadBuilderData chunk (registry.proto)
RECORDS_CHUNK_BYTES = 4 * 1024 * 1024  # about this many bytes of x and y in one chunk
DEFAULT_TIMEOUT = 60.0
CHECK_TIMEOUT = 300.0  # an upload's model check in a worker's sandbox
LONG_TIMEOUT = 6 * 3600.0  # following a long-running operation (a preparation, a round) to its end

KIND_NAMES = {
    "base-model": common_pb2.BLOB_KIND_BASE_MODEL,
    "strategy": common_pb2.BLOB_KIND_STRATEGY,
    "data": common_pb2.BLOB_KIND_BUILDER_DATA,
}


class BuilderClient:
    """The model builder's calls: tasks and uploads (registry), preparation (scorer), rounds (gateway)."""

    def __init__(self, *, registry: str, gateway: str, scorer: str, token: str | None = None,
                 tls: grpcutil.Tls | None = None, max_message_mb: int = 64) -> None:
        self._channels = [grpcutil.make_channel(a, max_message_mb=max_message_mb, token=token, tls=tls)
                          for a in (registry, gateway, scorer)]
        self.registry = registry_pb2_grpc.BuilderRegistryServiceStub(self._channels[0])
        self.gateway = gateway_pb2_grpc.ContributorGatewayServiceStub(self._channels[1])
        self.scorer = scorer_pb2_grpc.LiraScorerServiceStub(self._channels[2])

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def create_task(self, name: str, settings: common_pb2.TaskSettings, owner: str = "") -> registry_pb2.Task:
        return self.registry.CreateTask(registry_pb2.CreateTaskRequest(name=name, settings=settings, owner=owner),
                                        timeout=DEFAULT_TIMEOUT, wait_for_ready=True)

    def get_task(self, task_id: str) -> registry_pb2.Task:
        return self.registry.GetTask(registry_pb2.GetTaskRequest(task_id=task_id), timeout=DEFAULT_TIMEOUT)

    def list_tasks(self) -> list[registry_pb2.Task]:
        """Every task the caller may see, oldest first (all pages)."""
        tasks, token = self.list_tasks_page()
        while token:
            page, token = self.list_tasks_page(page_token=token)
            tasks.extend(page)
        return tasks

    def list_tasks_page(self, *, page_size: int = 0,
                        page_token: str = "") -> tuple[list[registry_pb2.Task], str]:
        """One page -> (tasks, next_page_token; "" after the last page). page_size 0: the server's default."""
        resp = self.registry.ListTasks(registry_pb2.ListTasksRequest(page_size=page_size, page_token=page_token),
                                       timeout=DEFAULT_TIMEOUT)
        return list(resp.tasks), resp.next_page_token

    def upload(self, task_id: str, kind: int, data: bytes,
               progress: Callable[[int, int], None] | None = None, *,
               defer_check: bool = False) -> common_pb2.BlobRef:
        """Chunked client stream: header (declared size and sha256), then 1 MiB chunks. A base
        model or strategy is checked against the task's other half before the call returns
        (FAILED_PRECONDITION if they do not fit) unless ``defer_check``."""
        header = registry_pb2.UploadHeader(task_id=task_id, kind=kind, size=len(data),
                                           sha256=hashlib.sha256(data).hexdigest(), defer_check=defer_check)

        def messages() -> Iterator[registry_pb2.UploadBlobRequest]:
            yield registry_pb2.UploadBlobRequest(header=header)
            for start in range(0, len(data), CHUNK):
                yield registry_pb2.UploadBlobRequest(chunk=data[start:start + CHUNK])
                if progress:
                    progress(min(start + CHUNK, len(data)), len(data))

        return self.registry.UploadBlob(messages(), timeout=max(DEFAULT_TIMEOUT, len(data) / 1e6) + CHECK_TIMEOUT)

    def upload_builder_records(self, task_id: str, x: np.ndarray, y: np.ndarray, *,
                               chunk_records: int = MAX_CHUNK_RECORDS,
                               progress: Callable[[int, int], None] | None = None) -> common_pb2.BlobRef:
        """Builder data as Records (UploadBuilderData): a header, then chunks of at most
        ``chunk_records`` (and at most 10,000) records and about 4 MiB each. Stored like an npz
        upload of builder data (a new version); an error names the chunk (numbered from 1)."""
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind == "f" and x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        if y.dtype.kind in "iu" and y.dtype not in (np.uint8, np.int64):
            y = y.astype(np.int64)  # the Tensor dtypes: any integer labels travel as int64
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} records but y has {len(y)} labels")
        per_record = max(1, x[:1].nbytes + y[:1].nbytes)
        step = max(1, min(chunk_records, MAX_CHUNK_RECORDS, RECORDS_CHUNK_BYTES // per_record))

        def messages() -> Iterator[registry_pb2.UploadBuilderDataRequest]:
            yield registry_pb2.UploadBuilderDataRequest(header=registry_pb2.UploadBuilderDataHeader(task_id=task_id))
            for start in range(0, len(x), step):
                yield registry_pb2.UploadBuilderDataRequest(records=common_pb2.Records(
                    x=serde.tensor_from_array(x[start:start + step]), y=serde.tensor_from_array(y[start:start + step])))
                if progress:
                    progress(min(start + step, len(x)), len(x))

        size = x.nbytes + y.nbytes
        return self.registry.UploadBuilderData(messages(), timeout=max(DEFAULT_TIMEOUT, size / 1e6) + CHECK_TIMEOUT)

    def start_preparation(self, task_id: str, *, refit: bool = False) -> scorer_pb2.Preparation:
        """Start the preparation stage; returns at once (PREPARING, or READY when already fitted)."""
        return self.scorer.StartPreparation(scorer_pb2.StartPreparationRequest(task_id=task_id, refit=refit),
                                            timeout=DEFAULT_TIMEOUT)

    def get_preparation(self, task_id: str) -> scorer_pb2.Preparation:
        """The task's preparation (NOT_FOUND [PREPARATION_NOT_FOUND] when never started)."""
        return self.scorer.GetPreparation(scorer_pb2.GetPreparationRequest(task_id=task_id), timeout=DEFAULT_TIMEOUT)

    def watch_preparation(self, task_id: str, *, timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """The preparation's progress until READY or FAILED (or ``timeout``), across the server's early ends."""
        request = scorer_pb2.WatchPreparationRequest(task_id=task_id)
        return ResumedStream(lambda t: self.scorer.WatchPreparation(request, timeout=t), timeout=timeout,
                             finished=preparation_ended,
                             key=lambda p: (p.preparation_id, p.state, p.models_done, p.message), only_last_key=True)

    def estimate_round(self, task_id: str, *, n_models: int = 0, n_records: int = 0) -> scorer_pb2.RoundEstimate:
        """What a round would cost (0: the task's n_models / batch_threshold); NOT_FOUND
        [PREPARATION_NOT_FOUND] before anything of the task was measured."""
        return self.scorer.EstimateRound(scorer_pb2.EstimateRoundRequest(task_id=task_id, n_models=n_models,
                                                                         n_records=n_records), timeout=DEFAULT_TIMEOUT)

    def prepare(self, task_id: str, *, refit: bool = False, timeout: float = LONG_TIMEOUT,
                progress: Callable[[scorer_pb2.Preparation], None] | None = None) -> scorer_pb2.Preparation:
        """Start the preparation stage and follow it to its end (``progress`` gets every state):
        the final Preparation, READY (with its Gaussian) or FAILED (with its message)."""
        prep = self.start_preparation(task_id, refit=refit)
        if progress:
            progress(prep)
        if preparation_ended(prep):
            return prep
        for prep in self.watch_preparation(task_id, timeout=timeout):
            if progress:
                progress(prep)
        return prep

    def start_round(self, task_id: str, *, force: bool = False) -> common_pb2.RoundStatus:
        return self.gateway.StartRound(gateway_pb2.StartRoundRequest(task_id=task_id, force=force),
                                       timeout=DEFAULT_TIMEOUT)

    def grow_round(self, round_id: str, add_models: int) -> common_pb2.RoundStatus:
        """Add ``add_models`` models to a DONE round; follow it with ``watch_round``."""
        return self.gateway.GrowRound(gateway_pb2.GrowRoundRequest(round_id=round_id, add_models=add_models),
                                      timeout=DEFAULT_TIMEOUT)

    def compare_recipes(self, round_id: str, recipes: dict[str, bytes]) -> common_pb2.RecipeComparison:
        """Run the round's batch under each of ``recipes`` (name -> strategy source) beside the
        task's own; follow it with ``get_comparison``."""
        return self.gateway.CompareRecipes(gateway_pb2.CompareRecipesRequest(round_id=round_id, alternatives=[
            common_pb2.RecipeAlternative(name=name, strategy=source) for name, source in recipes.items()]),
            timeout=2 * DEFAULT_TIMEOUT)

    def get_comparison(self, round_id: str) -> common_pb2.RecipeComparison:
        return self.gateway.GetComparison(gateway_pb2.GetComparisonRequest(round_id=round_id), timeout=DEFAULT_TIMEOUT)

    def get_round(self, round_id: str) -> common_pb2.RoundResult:
        return self.gateway.GetRound(gateway_pb2.GetRoundRequest(round_id=round_id), timeout=DEFAULT_TIMEOUT)

    def watch_round(self, round_id: str, *, timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """The round's progress until DONE or FAILED (or ``timeout``), across the server's early ends."""
        return watch_round(self.gateway, round_id, timeout=timeout)

    def scores(self, task_id: str, round_id: str = "", *, page_size: int = 0) -> gateway_pb2.GetScoresResponse:
        """Every record's scores and every round's batch metrics (all pages, in one response)."""
        return all_scores(self.gateway, gateway_pb2.GetScoresRequest(task_id=task_id, round_id=round_id,
                                                                     page_size=page_size))

    def watch_scores(self, task_id: str, *, contributor: str = "", round_id: str = "",
                     timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """Every record's scores (``contributor``'s only, if given) as rounds finish, existing ones
        first, each once. With ``round_id``: that round's, and the iteration ends once they are all
        given (at once if the round FAILED); without it: until ``timeout`` (then DEADLINE_EXCEEDED)
        or ``cancel()``. Across the server's early ends."""
        return watch_scores(self.gateway, gateway_pb2.WatchScoresRequest(
            task_id=task_id, contributor=contributor, round_id=round_id), timeout=timeout)


class ContributorClient:
    """A data contributor's calls to the gateway."""

    def __init__(self, *, gateway: str, contributor: str = "", token: str | None = None,
                 tls: grpcutil.Tls | None = None, max_message_mb: int = 64) -> None:
        self._channel = grpcutil.make_channel(gateway, max_message_mb=max_message_mb, token=token, tls=tls)
        self.stub = gateway_pb2_grpc.ContributorGatewayServiceStub(self._channel)
        self.contributor = contributor

    def close(self) -> None:
        self._channel.close()

    def submit(self, task_id: str, x: np.ndarray, y: np.ndarray, *, idempotency_key: str = "") -> gateway_pb2.Submission:
        records = common_pb2.Records(x=serde.tensor_from_array(np.asarray(x, dtype=np.float32)),
                                     y=serde.tensor_from_array(np.asarray(y, dtype=np.int64)))
        return self.stub.SubmitRecords(gateway_pb2.SubmitRecordsRequest(
            task_id=task_id, contributor=self.contributor, records=records,
            idempotency_key=idempotency_key), timeout=DEFAULT_TIMEOUT, wait_for_ready=True)

    def get_submission(self, submission_id: str) -> gateway_pb2.Submission:
        return self.stub.GetSubmission(gateway_pb2.GetSubmissionRequest(submission_id=submission_id),
                                       timeout=DEFAULT_TIMEOUT)

    def scores(self, task_id: str, round_id: str = "", *, page_size: int = 0) -> list[common_pb2.RecordScore]:
        """This contributor's scores in the task (all pages)."""
        return list(self.scores_response(task_id, round_id, page_size=page_size).scores)

    def scores_response(self, task_id: str, round_id: str = "", *,
                        page_size: int = 0) -> gateway_pb2.GetScoresResponse:
        """This contributor's record scores and, in tasks with contributor-level masks, the scores
        of their whole contribution per round (all pages, in one response)."""
        return all_scores(self.stub, gateway_pb2.GetScoresRequest(
            task_id=task_id, contributor=self.contributor, round_id=round_id, page_size=page_size))

    def list_submissions(self, task_id: str = "", *, page_size: int = 0) -> list[gateway_pb2.Submission]:
        """This contributor's submissions (of one task, if given), oldest first (all pages)."""
        out, token = [], ""
        while True:
            resp = self.stub.ListSubmissions(gateway_pb2.ListSubmissionsRequest(
                task_id=task_id, contributor=self.contributor, page_size=page_size, page_token=token),
                timeout=DEFAULT_TIMEOUT)
            out += resp.submissions
            token = resp.next_page_token
            if not token:
                return out

    def watch_scores(self, task_id: str, *, round_id: str = "", timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """This contributor's scores as rounds finish (existing ones first), each once. With
        ``round_id``: that round's, and the iteration ends once they are all given (at once if the
        round FAILED); without it: until ``timeout`` (then DEADLINE_EXCEEDED) or ``cancel()``.
        Across the server's early ends."""
        return watch_scores(self.stub, gateway_pb2.WatchScoresRequest(
            task_id=task_id, contributor=self.contributor, round_id=round_id), timeout=timeout)

    def watch_round(self, round_id: str, *, timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """The round's progress until DONE or FAILED (or ``timeout``), across the server's early ends."""
        return watch_round(self.stub, round_id, timeout=timeout)


def all_scores(stub: gateway_pb2_grpc.ContributorGatewayServiceStub,
               request: gateway_pb2.GetScoresRequest) -> gateway_pb2.GetScoresResponse:
    """Every page of GetScores, gathered into one response."""
    out = gateway_pb2.GetScoresResponse()
    while True:
        resp = stub.GetScores(request, timeout=DEFAULT_TIMEOUT)
        out.scores.extend(resp.scores)
        out.batches.extend(resp.batches)
        out.contributor_scores.extend(resp.contributor_scores)
        if not resp.next_page_token:
            return out
        request.page_token = resp.next_page_token


def watch_scores(stub: gateway_pb2_grpc.ContributorGatewayServiceStub, request: gateway_pb2.WatchScoresRequest, *,
                 timeout: float) -> "ResumedStream":
    # A re-opened stream sends the existing scores again: each record's score is given once. A
    # one-round watch ends when the server ends it by itself (no ftps-stream-end trailer).
    return ResumedStream(lambda t: stub.WatchScores(request, timeout=t), timeout=timeout,
                         key=lambda s: (s.round_id, s.record_id), ends_by_itself=bool(request.round_id))


def watch_round(stub: gateway_pb2_grpc.ContributorGatewayServiceStub, round_id: str, *, timeout: float) -> "ResumedStream":
    request = gateway_pb2.WatchRoundRequest(round_id=round_id)
    return ResumedStream(lambda t: stub.WatchRound(request, timeout=t), timeout=timeout,
                         finished=lambda s: s.state in serde.TERMINAL_ROUND_STATES,
                         key=lambda s: s.SerializeToString(deterministic=True), only_last_key=True)


class ResumedStream:
    """A server stream followed across the server's early ends: the services end a stream that sat
    idle or lived too long (``ftps.common.limits``; status OK before a terminal message, trailer
    ``ftps-stream-end``), and this opens it again, within the one overall ``timeout``. Messages the
    new stream repeats are skipped by ``key`` (every key ever given, or with ``only_last_key`` the
    last one). Iterate it like the gRPC call; ``cancel()`` ends it. With ``ends_by_itself``, a stream
    the server ends with status OK and no ``ftps-stream-end`` trailer is complete: iteration stops.

    Errors are the caller's (``grpc.RpcError``), but for RESOURCE_EXHAUSTED when opening again with
    the server's retry advice (it was busy just then): waited out, a few times, within the timeout.
    """

    REOPEN_REFUSALS = 3
    MAX_ADVISED_WAIT_S = 30.0

    def __init__(self, open_call: Callable[[float], Any], *, timeout: float,
                 finished: Callable[[Any], bool] = lambda _: False, key: Callable[[Any], Hashable] | None = None,
                 only_last_key: bool = False, ends_by_itself: bool = False) -> None:
        self._open = open_call
        self._ends_by_itself = ends_by_itself
        self._deadline = time.monotonic() + timeout
        self._finished = finished
        self._key = key
        self._only_last = only_last_key
        self._seen: set = set()
        self._call: Any = None
        self._cancelled = threading.Event()
        self._messages = self._follow()
        self.reopened = 0

    def __iter__(self) -> "ResumedStream":
        return self

    def __next__(self):
        return next(self._messages)

    def cancel(self) -> None:
        self._cancelled.set()
        if self._call is not None:
            self._call.cancel()

    def _remaining(self) -> float:
        # Never 0: a call with no time left still runs, and ends DEADLINE_EXCEEDED like the first.
        return max(self._deadline - time.monotonic(), 0.001)

    @staticmethod
    def _ended_early(call: Any) -> bool:
        """Whether the server ended the stream for its limits (trailer ``ftps-stream-end``)."""
        from ftps.common.limits import STREAM_END_KEY

        trailers = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
        return any(k == STREAM_END_KEY for k, _ in trailers or ())

    def _follow(self) -> Iterator:
        try:
            yield from self._reopening()
        finally:  # the caller stopped iterating: nothing stays open on the server
            if self._call is not None:
                self._call.cancel()

    def _reopening(self) -> Iterator:
        from ftps.common.rpc_status import retry_after

        refusals, idle_ends = 0, 0
        while True:
            self._call = self._open(self._remaining())
            if self._cancelled.is_set():  # cancelled while opening: the new call too
                self._call.cancel()
            fresh = False
            try:
                for message in self._call:
                    if self._key is not None:
                        k = self._key(message)
                        if k in self._seen:
                            continue
                        if self._only_last:
                            self._seen.clear()
                        self._seen.add(k)
                    fresh = True
                    yield message
                    if self._finished(message):
                        return
            except grpc.RpcError as exc:
                advice = retry_after(exc) if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if (not self.reopened or advice is None or refusals >= self.REOPEN_REFUSALS
                        or advice > min(self.MAX_ADVISED_WAIT_S, self._deadline - time.monotonic())):
                    raise
                refusals += 1
                if self._cancelled.wait(advice):
                    raise
                continue
            # Ended by the server before a terminal message (or, for a stream without one, before the
            # deadline): open it again. At once, unless the last ones brought nothing new.
            if self._cancelled.is_set():
                return
            if self._ends_by_itself and not self._ended_early(self._call):
                return  # the stream's own end: everything it had to give was given
            idle_ends = 0 if fresh else idle_ends + 1
            if idle_ends and self._cancelled.wait(min(0.5 * 2 ** (idle_ends - 1), 5.0, self._remaining())):
                return
            self.reopened += 1


def preparation_ended(p: scorer_pb2.Preparation) -> bool:
    return p.state in (scorer_pb2.PREPARATION_STATE_READY, scorer_pb2.PREPARATION_STATE_FAILED)


def estimate_dict(e: scorer_pb2.RoundEstimate) -> dict:
    """The JSON shape of a RoundEstimate (``ftps-builder estimate --json``)."""
    return {"task_id": e.task_id, "n_models": e.n_models, "n_records": e.n_records, "jobs": e.jobs,
            "parallel_jobs": e.parallel_jobs, "seconds_per_model": e.seconds_per_model, "worker_s": e.worker_s,
            "wall_s": e.wall_s, "basis": e.basis}


def estimate_text(e: scorer_pb2.RoundEstimate) -> str:
    """One line for people: ``a round of 32 models on 200 records: about 3.2 min of worker time,
    1.7 min from start to scores (19 jobs, 2 at a time); from round r-1 ...``."""
    return (f"a round of {e.n_models} models on {e.n_records} records: about {_duration(e.worker_s)} of worker "
            f"time, {_duration(e.wall_s)} from start to scores ({e.jobs} jobs, {e.parallel_jobs} at a time; "
            f"{e.seconds_per_model:.2f} s per model); based on {e.basis}")


def _duration(seconds: float) -> str:
    if seconds < 10:  # a small task's round takes under a second: "0 s" would read as nothing
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def preparation_dict(p: scorer_pb2.Preparation) -> dict:
    """The JSON shape of a Preparation in every client's --json output (``gaussian`` once READY)."""
    from ftps.common.clock import iso

    g = p.gaussian if p.HasField("gaussian") else None
    return {"task_id": p.task_id, "preparation_id": p.preparation_id,
            "state": scorer_pb2.PreparationState.Name(p.state).removeprefix("PREPARATION_STATE_"),
            "models_done": p.models_done, "models_total": p.models_total, "elapsed_s": round(p.elapsed_s, 3),
            "remaining_s": round(p.remaining_s, 3), "message": p.message, "started_at": iso(p.started_at),
            "base_model_sha256": p.base_model_sha256,
            "gaussian": None if g is None else {
                "mu": g.mu, "sigma": g.sigma, "k": g.k, "n_values": g.n_values, "fitted_at": iso(g.fitted_at),
                "base_model_sha256": g.base_model_sha256, "timings": dict(g.timings)}}


def score_dict(s: common_pb2.RecordScore) -> dict:
    """The JSON shape of one record's score in every client's --json output: ``score`` with
    ``score_ci_low``/``score_ci_high`` is the headline (model-based), ``counted_p`` with
    ``counted_p_ci_low``/``counted_p_ci_high`` the paper's counted P (as in RecordScore)."""
    return {"record_id": s.record_id, "contributor": s.contributor, "round_id": s.round_id,
            "index": s.index, "method": serde.METHOD_NAMES.get(s.method, ""),
            "score": s.score, "score_ci_low": s.score_ci_low, "score_ci_high": s.score_ci_high,
            "counted_p": s.counted_p, "counted_p_ci_low": s.counted_p_ci_low,
            "counted_p_ci_high": s.counted_p_ci_high, "n_in": s.n_in, "n_out": s.n_out, "auc": s.auc,
            "empirical_mu": s.empirical_mu, "empirical_mu_ci_low": s.empirical_mu_ci_low,
            "empirical_mu_ci_high": s.empirical_mu_ci_high, "empirical_epsilon": s.empirical_epsilon,
            "empirical_epsilon_ci_low": s.empirical_epsilon_ci_low,
            "empirical_epsilon_ci_high": s.empirical_epsilon_ci_high, "delta": s.delta}


def contribution_dict(c: common_pb2.ContributorScore) -> dict:
    """The JSON shape of one contributor's whole-contribution score (contributor-level masks)."""
    return {"contributor": c.contributor, "round_id": c.round_id, "n_records": c.n_records,
            "score": c.score, "score_ci_low": c.score_ci_low, "score_ci_high": c.score_ci_high,
            "counted_p": c.counted_p, "empirical_mu": c.empirical_mu, "empirical_mu_ci_low": c.empirical_mu_ci_low,
            "empirical_mu_ci_high": c.empirical_mu_ci_high, "empirical_epsilon": c.empirical_epsilon,
            "empirical_epsilon_ci_low": c.empirical_epsilon_ci_low,
            "empirical_epsilon_ci_high": c.empirical_epsilon_ci_high, "delta": c.delta,
            "n_in": c.n_in, "n_out": c.n_out}


def contribution_text(c: common_pb2.ContributorScore) -> str:
    """One line a person reads: ``alice's whole contribution (12 records, round r-1): score +0.41
    [+0.12, +0.66], empirical ε 2.31 [0.52, 4.10] at δ = 1e-05``."""
    return (f"{c.contributor}'s whole contribution ({c.n_records} records, round {c.round_id}): score "
            f"{c.score:+.3f} [{c.score_ci_low:+.2f}, {c.score_ci_high:+.2f}], empirical ε {c.empirical_epsilon:.2f} "
            f"[{c.empirical_epsilon_ci_low:.2f}, {c.empirical_epsilon_ci_high:.2f}] at δ = {c.delta:g}")


def comparison_dict(c: common_pb2.RecipeComparison) -> dict:
    """The JSON shape of a recipe comparison: per recipe its state, utility, batch metrics and how
    many records are identifiable above chance, and the records exposed under every recipe."""
    out = []
    for v in c.variants:
        out.append({"recipe": v.name, "round_id": v.status.round_id,
                    "state": common_pb2.RoundState.Name(v.status.state).removeprefix("ROUND_STATE_").lower(),
                    "models_done": v.status.models_done, "models_total": v.status.models_total,
                    "message": v.status.message, "heldout_accuracy": v.heldout_accuracy,
                    "heldout_records": v.heldout_records,
                    "batch": batch_dict(v.batch) if v.HasField("batch") else None,
                    "above_chance": sum(s.score_ci_low > 0 for s in v.scores),
                    "max_empirical_epsilon": max((s.empirical_epsilon for s in v.scores), default=0.0),
                    "dp_epsilon": v.dp_epsilon, "scores": {s.record_id: s.score for s in v.scores}})
    return {"round_id": c.round_id, "recipes": out, "exposed_everywhere": list(c.exposed_everywhere)}


def batch_dict(b: common_pb2.BatchMetrics) -> dict:
    return {"method": serde.METHOD_NAMES.get(b.method, ""), "n_models": b.n_models,
            "n_records": b.n_records, "auc": b.auc, "tpr_at_1pct_fpr": b.tpr_at_1pct_fpr,
            "tpr_at_0_1pct_fpr": b.tpr_at_0_1pct_fpr, "mean_score": b.mean_score,
            "mean_counted_p": b.mean_counted_p}


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """``CODE: details``, with the server's reason when it says more than the code:
    ``INVALID_ARGUMENT [RECORDS_NOT_FINITE]: records.x[2, 0, 3, 4] = 1e+39 is not finite as float32``."""
    from ftps.common.rpc_status import error_details

    code = exc.code().name if hasattr(exc, "code") and exc.code() else "ERROR"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    reason = error_details(exc).reason
    return f"{code} [{reason}]: {details}" if reason and reason != code else f"{code}: {details}"
