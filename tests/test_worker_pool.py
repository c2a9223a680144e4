"""The scorer's worker pool on its own (issue 20: round logic tested without a full stack): real
gRPC calls to stand-in workers on 127.0.0.1:0 that answer as we tell them, so retries, dead workers,
task errors and cancellation are exercised exactly, in seconds."""

from __future__ import annotations

import socket
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from ftps.common import rpc_status, serde
from ftps.common.errors import FailedPrecondition, Unavailable
from ftps.v1 import worker_pb2, worker_pb2_grpc
from services.lira_scorer.workers import WorkerPool

# grpc's connectivity poller (started by channel_ready_future) may still run when pool.close()
# closes the channel, and its thread then raises "Channel closed!": grpc's own thread, harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class StandInWorker(worker_pb2_grpc.FinetuneWorkerServiceServicer):
    """Answers RunJob with ``answers`` in turn (a status code to abort with, or "ok"), then "ok";
    records the job ids it saw. phi is the model index in every column, so results are checkable."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.seen: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()

    def RunJob(self, request, context):
        job = request.job
        with self.lock:
            self.seen.append(job.job_id)
            answer = self.answers.pop(0) if self.answers else "ok"
        self.release.wait(10)
        if answer == "strategy":
            context.abort_with_status(rpc_status.rich_status(
                grpc.StatusCode.FAILED_PRECONDITION, f"strategy failed in {job.job_id}", "STRATEGY_FAILED"))
        if isinstance(answer, grpc.StatusCode):
            context.abort(answer, f"{answer.name} from the stand-in")
        phi = np.array([[float(m.index)] * 3 for m in job.models])
        return worker_pb2.RunJobResponse(job_id=job.job_id, model_indices=[m.index for m in job.models],
                                         phi=serde.tensor_from_array(phi), device="cpu")


@pytest.fixture
def serve():
    servers = []

    def start(servicer: StandInWorker) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(8))
        worker_pb2_grpc.add_FinetuneWorkerServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def _job(k: int, models: int = 2) -> worker_pb2.FinetuneJob:
    return worker_pb2.FinetuneJob(task_id="t-1", job_id=f"j{k}", models=[
        worker_pb2.ModelSpec(index=k * models + i, seed=i, mask=b"\x01\x00\x01") for i in range(models)])


def _pool(targets, **kw) -> WorkerPool:
    pool = WorkerPool(targets, **kw)
    pool.connect_timeout_s = 0.5
    return pool


def _free_port() -> str:
    with socket.socket() as s:  # closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_every_job_runs_and_reports_as_it_finishes(serve):
    pool = _pool([serve(StandInWorker()), serve(StandInWorker())], jobs_per_worker=2)
    done = []
    results = pool.run_all([_job(k) for k in range(6)], done.append)
    assert sorted(r.job_id for r in results) == [f"j{k}" for k in range(6)] == sorted(r.job_id for r in done)
    rows = sorted(i for r in results for i in r.model_indices)
    assert rows == list(range(12))
    pool.close()


def test_a_job_refused_by_a_busy_or_dying_worker_is_retried_elsewhere(serve):
    flaky = StandInWorker(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    pool = _pool([serve(flaky)], attempts=4)
    result = pool.run_one(_job(0))
    assert result.job_id == "j0" and flaky.seen == ["j0", "j0", "j0"]  # two refusals, then done
    pool.close()


def test_a_dead_worker_is_skipped_without_waiting_on_it(serve):
    live = StandInWorker()
    pool = _pool([_free_port(), serve(live)], attempts=4)
    results = pool.run_all([_job(k) for k in range(3)], lambda r: None)
    assert sorted(r.job_id for r in results) == ["j0", "j1", "j2"] and sorted(live.seen) == ["j0", "j1", "j2"]
    pool.close()


def test_no_reachable_worker_is_unavailable_after_the_attempts():
    pool = _pool([_free_port()], attempts=2)
    with pytest.raises(Unavailable) as e:
        pool.run_one(_job(0))
    assert e.value.reason == "WORKERS_UNAVAILABLE" and "failed 2 times" in str(e.value)
    pool.close()


def test_a_task_error_keeps_its_reason_and_is_not_retried(serve):
    worker = StandInWorker("strategy")
    pool = _pool([serve(worker)], attempts=4)
    with pytest.raises(FailedPrecondition) as e:
        pool.run_one(_job(0))
    assert e.value.reason == "STRATEGY_FAILED" and "strategy failed in j0" in str(e.value)
    assert worker.seen == ["j0"]  # the job's own fault: another worker would fail it the same way
    pool.close()


def test_task_errors_go_to_the_callback_and_the_other_jobs_go_on(serve):
    worker = StandInWorker("strategy")
    pool = _pool([serve(worker)])
    failed = []
    results = pool.run_all([_job(k) for k in range(4)], lambda r: None,
                           on_task_error=lambda job, exc: failed.append((job.job_id, exc.reason)))
    assert [reason for _, reason in failed] == ["STRATEGY_FAILED"]
    assert len(results) == 3
    pool.close()


def test_without_a_callback_the_first_task_error_cancels_the_jobs_not_started(serve):
    worker = StandInWorker("strategy")
    pool = _pool([serve(worker)], jobs_per_worker=1)  # one job at a time: the rest wait in the queue
    with pytest.raises(FailedPrecondition):
        pool.run_all([_job(k) for k in range(5)], lambda r: None)
    assert len(worker.seen) < 5  # the queued ones were cancelled, never sent
    pool.close()
