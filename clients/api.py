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
from ftps.v1 import (common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc,
                     scorer_pb2, scorer_pb2_grpc)

CHUNK = 1024 * 1024
DEFAULT_TIMEOUT = 60.0
CHECK_TIMEOUT = 300.0  # an upload's model check in a worker's sandbox
LONG_TIMEOUT = 6 * 3600.0  # the preparation stage fine-tunes k models before it answers

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
        self.registry = registry_pb2_grpc.BuilderRegistryStub(self._channels[0])
        self.gateway = gateway_pb2_grpc.ContributorGatewayStub(self._channels[1])
        self.scorer = scorer_pb2_grpc.LiraScorerStub(self._channels[2])

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

    def prepare_offline(self, task_id: str, *, refit: bool = False) -> common_pb2.OfflineGaussian:
        return self.scorer.PrepareOffline(scorer_pb2.PrepareOfflineRequest(task_id=task_id, refit=refit),
                                          timeout=LONG_TIMEOUT)

    def get_offline(self, task_id: str) -> common_pb2.OfflineGaussian:
        return self.scorer.GetOffline(scorer_pb2.GetOfflineRequest(task_id=task_id), timeout=DEFAULT_TIMEOUT)

    def start_round(self, task_id: str, *, force: bool = False) -> common_pb2.RoundStatus:
        return self.gateway.StartRound(gateway_pb2.StartRoundRequest(task_id=task_id, force=force),
                                       timeout=DEFAULT_TIMEOUT)

    def get_round(self, round_id: str) -> common_pb2.RoundResult:
        return self.gateway.GetRound(gateway_pb2.GetRoundRequest(round_id=round_id), timeout=DEFAULT_TIMEOUT)

    def watch_round(self, round_id: str, *, timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """The round's progress until DONE or FAILED (or ``timeout``), across the server's early ends."""
        return watch_round(self.gateway, round_id, timeout=timeout)

    def scores(self, task_id: str, round_id: str = "", *, page_size: int = 0) -> gateway_pb2.GetScoresResponse:
        """Every record's scores and every round's batch metrics (all pages, in one response)."""
        return all_scores(self.gateway, gateway_pb2.GetScoresRequest(task_id=task_id, round_id=round_id,
                                                                     page_size=page_size))


class ContributorClient:
    """A data contributor's calls to the gateway."""

    def __init__(self, *, gateway: str, contributor: str = "", token: str | None = None,
                 tls: grpcutil.Tls | None = None, max_message_mb: int = 64) -> None:
        self._channel = grpcutil.make_channel(gateway, max_message_mb=max_message_mb, token=token, tls=tls)
        self.stub = gateway_pb2_grpc.ContributorGatewayStub(self._channel)
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
        return list(all_scores(self.stub, gateway_pb2.GetScoresRequest(
            task_id=task_id, contributor=self.contributor, round_id=round_id, page_size=page_size)).scores)

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

    def watch_scores(self, task_id: str, *, timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """Scores as rounds finish (existing ones first), each once, until ``timeout`` (then
        DEADLINE_EXCEEDED) or ``cancel()``, across the server's early ends."""
        request = gateway_pb2.WatchScoresRequest(task_id=task_id, contributor=self.contributor)
        # A re-opened stream sends the existing scores again: each record's score is given once.
        return ResumedStream(lambda t: self.stub.WatchScores(request, timeout=t), timeout=timeout,
                             key=lambda s: (s.round_id, s.record_id))

    def watch_round(self, round_id: str, *, timeout: float = LONG_TIMEOUT) -> "ResumedStream":
        """The round's progress until DONE or FAILED (or ``timeout``), across the server's early ends."""
        return watch_round(self.stub, round_id, timeout=timeout)


def all_scores(stub: gateway_pb2_grpc.ContributorGatewayStub,
               request: gateway_pb2.GetScoresRequest) -> gateway_pb2.GetScoresResponse:
    """Every page of GetScores, gathered into one response."""
    out = gateway_pb2.GetScoresResponse()
    while True:
        resp = stub.GetScores(request, timeout=DEFAULT_TIMEOUT)
        out.scores.extend(resp.scores)
        out.batches.extend(resp.batches)
        if not resp.next_page_token:
            return out
        request.page_token = resp.next_page_token


def watch_round(stub: gateway_pb2_grpc.ContributorGatewayStub, round_id: str, *, timeout: float) -> "ResumedStream":
    request = gateway_pb2.GetRoundRequest(round_id=round_id)
    return ResumedStream(lambda t: stub.WatchRound(request, timeout=t), timeout=timeout,
                         finished=lambda s: s.state in serde.TERMINAL_ROUND_STATES,
                         key=lambda s: s.SerializeToString(deterministic=True), only_last_key=True)


class ResumedStream:
    """A server stream followed across the server's early ends: the services end a stream that sat
    idle or lived too long (``ftps.common.limits``; status OK before a terminal message, trailer
    ``ftps-stream-end``), and this opens it again, within the one overall ``timeout``. Messages the
    new stream repeats are skipped by ``key`` (every key ever given, or with ``only_last_key`` the
    last one). Iterate it like the gRPC call; ``cancel()`` ends it.

    Errors are the caller's (``grpc.RpcError``), but for RESOURCE_EXHAUSTED when opening again with
    the server's retry advice (it was busy just then): waited out, a few times, within the timeout.
    """

    REOPEN_REFUSALS = 3
    MAX_ADVISED_WAIT_S = 30.0

    def __init__(self, open_call: Callable[[float], Any], *, timeout: float,
                 finished: Callable[[Any], bool] = lambda _: False, key: Callable[[Any], Hashable] | None = None,
                 only_last_key: bool = False) -> None:
        self._open = open_call
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

    def _follow(self) -> Iterator:
        try:
            yield from self._reopening()
        finally:  # the caller stopped iterating: nothing stays open on the server
            if self._call is not None:
                self._call.cancel()

    def _reopening(self) -> Iterator:
        from ftps.common.limits import retry_after

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
            idle_ends = 0 if fresh else idle_ends + 1
            if idle_ends and self._cancelled.wait(min(0.5 * 2 ** (idle_ends - 1), 5.0, self._remaining())):
                return
            self.reopened += 1


def score_dict(s: common_pb2.RecordScore) -> dict:
    """The JSON shape of one record's score in every client's --json output."""
    return {"record_id": s.record_id, "contributor": s.contributor, "round_id": s.round_id,
            "index": s.index, "method": serde.METHOD_NAMES.get(s.method, ""), "score": s.score,
            "ci_low": s.ci_low, "ci_high": s.ci_high, "n_in": s.n_in, "n_out": s.n_out, "auc": s.auc,
            "model_score": s.model_score, "model_ci_low": s.model_ci_low, "model_ci_high": s.model_ci_high,
            "headline": "model_score"}


def batch_dict(b: common_pb2.BatchMetrics) -> dict:
    return {"method": serde.METHOD_NAMES.get(b.method, ""), "n_models": b.n_models,
            "n_records": b.n_records, "auc": b.auc, "tpr_at_1pct_fpr": b.tpr_at_1pct_fpr,
            "tpr_at_0_1pct_fpr": b.tpr_at_0_1pct_fpr, "mean_score": b.mean_score}


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code().name if hasattr(exc, "code") and exc.code() else "ERROR"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code}: {details}"
