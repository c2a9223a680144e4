"""The scorer's view of the fine-tune worker pool: fan jobs out, retry a job elsewhere when its
worker is unavailable, fail the whole batch of jobs on a task error."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent import futures
from typing import Callable, Sequence

import grpc

from ftps.common import grpcutil, tracing
from ftps.common.errors import FailedPrecondition, FtpsError, InvalidArgument, Unavailable
from ftps.common.rpc_status import request_failed, retry_elsewhere
from ftps.common.metrics import ScorerMetrics
from ftps.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)



class WorkerPool:
    def __init__(self, targets: Sequence[str], *, jobs_per_worker: int = 1, timeout_s: float = 3600,
                 attempts: int = 4, max_message_mb: int = 64,
                 channel: Callable[..., grpc.Channel] = grpcutil.make_channel,
                 metrics: ScorerMetrics | None = None) -> None:
        if not targets:
            raise ValueError("at least one worker target is needed")
        balanced = len(targets) == 1 and targets[0].startswith("dns:///")
        self._channels = [channel(t, max_message_mb=max_message_mb, round_robin=balanced) for t in targets]
        self._stubs = [worker_pb2_grpc.FinetuneWorkerServiceStub(c) for c in self._channels]
        self.targets = list(targets)
        self.parallelism = max(1, len(targets) * jobs_per_worker)
        self._timeout = timeout_s
        self._attempts = attempts
        self.connect_timeout_s = 10.0
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._metrics = metrics
        if metrics is not None:
            metrics.worker_targets = len(targets)

    def _stub_index(self) -> int:
        with self._lock:
            return next(self._next) % len(self._stubs)

    def _ready(self, i: int, timeout: float) -> bool:
        ready = grpc.channel_ready_future(self._channels[i])
        try:
            ready.result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            ready.cancel()  # else its thread polls the channel on, past close()
            return False

    def run_one(self, job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
        """Run ``job`` on some worker; a worker that is gone or unreachable is skipped and the job
        tried on the next (never waiting on a dead one: no wait_for_ready on the call itself)."""
        try:
            return self._run_one(job)
        except Exception:
            if self._metrics is not None:
                self._metrics.jobs_failed.inc()
            raise

    def _call(self, i: int, job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
        m = self._metrics
        if m is None:
            return self._stubs[i].RunJob(worker_pb2.RunJobRequest(job=job), timeout=self._timeout)
        m.job_sent()
        t0 = time.perf_counter()
        try:
            result = self._stubs[i].RunJob(worker_pb2.RunJobRequest(job=job), timeout=self._timeout)
        finally:
            m.job_answered()
        m.job_duration.observe(time.perf_counter() - t0)
        m.models_finetuned.inc(len(result.model_indices))
        return result

    def _retried(self, attempt: int) -> None:
        if self._metrics is not None and attempt + 1 < self._attempts:  # another attempt follows
            self._metrics.jobs_retried.inc()

    def _run_one(self, job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
        delay = 0.5
        last = "no worker reachable"
        for attempt in range(self._attempts):
            i = self._stub_index()
            if not self._ready(i, timeout=self.connect_timeout_s):
                last = f"worker {self.targets[i]} unreachable for {self.connect_timeout_s:.0f}s"
                log.warning("job %s: %s; trying another (attempt %d/%d)", job.job_id, last, attempt + 1,
                            self._attempts)
                self._retried(attempt)
                continue
            try:
                return self._call(i, job)
            except grpc.RpcError as exc:
                task_error = request_failed(exc)  # the job itself failed: a task error, never retried
                if task_error is not None:
                    raise task_error from exc
                if not retry_elsewhere(exc):
                    raise Unavailable(f"job {job.job_id} failed on {self.targets[i]}: "
                                      f"{exc.code().name}: {exc.details()}", reason="WORKERS_UNAVAILABLE") from exc
                last = f"{exc.code().name}: {exc.details()}"
                log.warning("job %s on %s: %s; retrying elsewhere (attempt %d/%d)",
                            job.job_id, self.targets[i], last, attempt + 1, self._attempts)
                self._retried(attempt)
                time.sleep(delay)
                delay = min(delay * 2, 10)
        raise Unavailable(f"job {job.job_id} failed {self._attempts} times: {last}", reason="WORKERS_UNAVAILABLE")

    def run_all(self, jobs: Sequence[worker_pb2.FinetuneJob],
                on_done: Callable[[worker_pb2.RunJobResponse], None], *,
                on_task_error: Callable[[worker_pb2.FinetuneJob, FtpsError], None] | None = None,
                ) -> list[worker_pb2.RunJobResponse]:
        """Run every job; ``on_done`` is called as each finishes. A task error (the job itself
        failed: FAILED_PRECONDITION, INVALID_ARGUMENT) goes to ``on_task_error`` and the other jobs
        go on; without it, the first task error cancels the rest. An unreachable pool always raises."""
        results: list[worker_pb2.RunJobResponse] = []
        m = self._metrics
        # The pool's threads carry on the caller's trace: each RunJob call is a child of the round.
        captured = tracing.capture()

        def run(job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
            if m is not None:  # out of the queue: on its way to a worker
                m.job_unqueued()
            with tracing.attached(captured):
                return self.run_one(job)

        if m is not None:
            m.jobs_queued(len(jobs))
        with futures.ThreadPoolExecutor(self.parallelism, thread_name_prefix="job") as pool:
            pending = {pool.submit(run, job): job for job in jobs}
            try:
                for fut in futures.as_completed(pending):
                    try:
                        result = fut.result()
                    except (FailedPrecondition, InvalidArgument) as exc:
                        if on_task_error is None:
                            raise
                        on_task_error(pending[fut], exc)
                        continue
                    results.append(result)
                    on_done(result)
            except BaseException:
                for fut in pending:
                    if fut.cancel() and m is not None:  # never ran: no longer queued
                        m.job_unqueued()
                raise
        return results

    def close(self) -> None:
        for c in self._channels:
            c.close()
