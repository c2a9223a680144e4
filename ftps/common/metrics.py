"""Prometheus metrics: one server interceptor for every RPC, each service's domain metrics, and the
metrics HTTP endpoint (its own port, ``metrics_listen``).

Every :class:`ftps.common.grpcutil.Server` has a registry of its own (``server.metrics_registry``):
several services may share a process (the embedded stack, tests) and each exports only its own
series. The domain objects get their service's metrics object (``GatewayMetrics``, ...) from
``create_server``; None means no metrics. Labels are bounded: service, method, status code, task
id, a fixed set of states and results; never a record, submission or round id.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# RPCs: from ~1 ms (health, reads) to an hour (a fine-tune job, a watched round).
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# Fine-tune jobs and rounds: seconds to hours.
LONG_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


def _split(full_method: str) -> tuple[str, str]:
    # "/ftps.v1.ContributorGatewayService/SubmitRecords" -> ("ftps.v1.ContributorGatewayService", "SubmitRecords")
    _, _, rest = full_method.partition("/")
    service, _, method = rest.rpartition("/")
    return service or "unknown", method or rest or "unknown"


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode = grpc.StatusCode.OK) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - an older grpc without code(): what the call did tells
        code = None
    if code is None:
        code = default
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:  # an int set through set_code
        return grpc.StatusCode(code).name  # type: ignore[arg-type]
    except ValueError:
        return "UNKNOWN"


class RpcMetrics(grpc.ServerInterceptor):
    """``ftps_rpc_requests_total{service,method,code}`` and ``ftps_rpc_duration_seconds{service,method}``
    (a stream: its whole lifetime). Calls the handler aborts count under the status it set; an
    exception that escapes as UNKNOWN; a stream the client dropped as CANCELLED."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("ftps_rpc_requests", "RPCs handled, by service, method and status code",
                                ["service", "method", "code"], registry=registry)
        self.duration = Histogram("ftps_rpc_duration_seconds", "RPC handling time (streams: their lifetime)",
                                  ["service", "method"], buckets=RPC_BUCKETS, registry=registry)

    def _done(self, service: str, method: str, code: str, t0: float) -> None:
        self.requests.labels(service, method, code).inc()
        self.duration.labels(service, method).observe(time.perf_counter() - t0)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split(handler_call_details.method)
        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary

            def unary(request, context):
                t0 = time.perf_counter()
                code = None
                try:
                    response = behavior(request, context)
                    code = _code_name(context)
                    return response
                except BaseException:
                    code = _code_name(context, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    self._done(service, method, code or "UNKNOWN", t0)

            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(unary, handler.request_deserializer, handler.response_serializer)

        behavior = handler.unary_stream or handler.stream_stream

        def stream(request, context):
            t0 = time.perf_counter()
            code = "UNKNOWN"
            try:
                yield from behavior(request, context)
                code = _code_name(context)
            except GeneratorExit:  # the client went away: grpc closes the generator
                code = "CANCELLED"
                raise
            except BaseException:
                code = _code_name(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._done(service, method, code, t0)

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(stream, handler.request_deserializer, handler.response_serializer)


class MetricsEndpoint:
    """``/metrics`` of one registry over HTTP on ``listen`` ("host:port"; port 0: any free port)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        from prometheus_client import start_http_server

        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"metrics_listen must be host:port, got {listen!r}")
        host = host.strip("[]") or "0.0.0.0"
        self._httpd, self._thread = start_http_server(int(port), addr=host, registry=registry)
        self.port: int = self._httpd.server_address[1]
        self.address = f"{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _Callback(Collector):
    """A collector reading its values at scrape time from ``fn`` -> metric families."""

    def __init__(self, fn: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._fn = fn

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            yield from self._fn()
        except Exception as exc:  # noqa: BLE001 - a failed read must not fail the whole scrape
            log.warning("metrics: %s", exc)

    def describe(self) -> list:
        return []  # read at scrape time only (never at registration: it may query a database)


class GatewayMetrics:
    """``ftps_gateway_pending_records{task}``, ``ftps_gateway_pending_submissions{task}`` (read from
    the submission store at scrape time, so right across replicas) and
    ``ftps_gateway_submits_total{result}`` (acknowledged | refused)."""

    MAX_TASKS_REMEMBERED = 1000

    def __init__(self, registry: CollectorRegistry) -> None:
        self.submits = Counter("ftps_gateway_submits", "submissions, by result (acknowledged | refused)",
                               ["result"], registry=registry)
        for result in ("acknowledged", "refused"):
            self.submits.labels(result)
        self._pending: Callable[[], dict[str, tuple[int, int]]] | None = None
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        registry.register(_Callback(self._collect_pending))

    def watch_pending(self, pending_by_task: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """``pending_by_task() -> {task_id: (records, submissions)}`` of the tasks with pending work."""
        self._pending = pending_by_task

    def _collect_pending(self) -> Iterator[GaugeMetricFamily]:
        if self._pending is None:
            return
        records = GaugeMetricFamily("ftps_gateway_pending_records", "records waiting for a round, by task",
                                    labels=["task"])
        subs = GaugeMetricFamily("ftps_gateway_pending_submissions", "submissions waiting for a round, by task",
                                 labels=["task"])
        now = self._pending()
        with self._lock:
            # Tasks seen pending before and empty now read 0 (not a vanished series), a bounded set.
            if len(self._seen) > self.MAX_TASKS_REMEMBERED:
                self._seen.clear()
            self._seen.update(now)
            tasks = sorted(self._seen)
        for task in tasks:
            n_records, n_subs = now.get(task, (0, 0))
            records.add_metric([task], n_records)
            subs.add_metric([task], n_subs)
        yield records
        yield subs


class ScorerMetrics:
    """Rounds on this replica and the fine-tune jobs it fans out to the workers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds_finished = Counter("ftps_scorer_rounds_finished", "rounds finished here, by state (done | failed)",
                                       ["state"], registry=registry)
        for state in ("done", "failed"):
            self.rounds_finished.labels(state)
        self.round_duration = Histogram("ftps_scorer_round_duration_seconds", "time to run a round to its end",
                                        buckets=LONG_BUCKETS, registry=registry)
        self.jobs_retried = Counter("ftps_scorer_jobs_retried", "fine-tune job attempts tried again on another "
                                    "worker (unreachable, unavailable, overloaded)", registry=registry)
        self.jobs_failed = Counter("ftps_scorer_jobs_failed", "fine-tune jobs that failed for good "
                                   "(a task error, or every attempt used)", registry=registry)
        self.job_duration = Histogram("ftps_scorer_job_duration_seconds", "fine-tune job time as the scorer sees "
                                      "it (the successful RunJob call)", buckets=LONG_BUCKETS, registry=registry)
        self.models_finetuned = Counter("ftps_scorer_models_finetuned", "models fine-tuned by jobs this scorer "
                                        "sent", registry=registry)
        self.preparations = Counter("ftps_scorer_preparations", "preparation stages (offline Gaussian), by "
                                    "result (done | cached | failed)", ["result"], registry=registry)
        for result in ("done", "cached", "failed"):
            self.preparations.labels(result)
        self._lock = threading.Lock()
        self._pending = 0
        self._in_flight = 0
        self.worker_targets = 1
        Gauge("ftps_scorer_jobs_pending", "fine-tune jobs queued, not yet sent to a worker",
              registry=registry).set_function(lambda: self._pending)
        Gauge("ftps_scorer_jobs_in_flight", "fine-tune jobs sent to a worker, not yet answered",
              registry=registry).set_function(lambda: self._in_flight)
        Gauge("ftps_scorer_jobs_pending_per_worker", "jobs pending / worker targets (the worker autoscaler's "
              "metric)", registry=registry).set_function(lambda: self._pending / max(1, self.worker_targets))
        self._rounds: Callable[[], dict[str, int]] | None = None
        registry.register(_Callback(self._collect_rounds))

    # jobs (WorkerPool)
    def jobs_queued(self, n: int) -> None:
        with self._lock:
            self._pending += n

    def job_unqueued(self) -> None:
        with self._lock:
            self._pending -= 1

    def job_sent(self) -> None:
        with self._lock:
            self._in_flight += 1

    def job_answered(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # rounds (Scorer)
    def watch_rounds(self, by_state: Callable[[], dict[str, int]]) -> None:
        """``by_state() -> {state name: rounds running here}``."""
        self._rounds = by_state

    ROUND_STATES = ("pending", "preparing", "finetuning", "scoring")

    def _collect_rounds(self) -> Iterator[GaugeMetricFamily]:
        if self._rounds is None:
            return
        family = GaugeMetricFamily("ftps_scorer_rounds", "rounds this replica is running, by state",
                                   labels=["state"])
        counts = self._rounds()
        for state in sorted(set(self.ROUND_STATES) | set(counts)):
            family.add_metric([state], counts.get(state, 0))
        yield family


class WorkerMetrics:
    """Jobs running here, sandbox children alive, models fine-tuned; on CUDA, GPU memory and utilisation."""

    def __init__(self, registry: CollectorRegistry, *, gpu: bool | None = None) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        Gauge("ftps_worker_jobs_in_flight", "fine-tune jobs running on this worker",
              registry=registry).set_function(lambda: self._in_flight)
        self.models_finetuned = Counter("ftps_worker_models_finetuned", "models fine-tuned on this worker",
                                        registry=registry)
        self._children: Callable[[], int] | None = None
        Gauge("ftps_worker_sandbox_children", "sandbox child processes alive",
              registry=registry).set_function(lambda: self._children() if self._children else 0)
        if gpu is None:
            gpu = cuda_available()
        if gpu:
            registry.register(_Callback(_gpu_families))

    def watch_children(self, alive: Callable[[], int]) -> None:
        self._children = alive

    def job_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def job_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU metrics
        return False


def _gpu_families() -> Iterator[GaugeMetricFamily]:
    """Read through NVML (torch.cuda.device_memory_used / utilization): device-wide, so the jobs'
    sandbox children count, and no CUDA context is created in this process. What NVML cannot
    answer is left out."""
    import torch

    memory = GaugeMetricFamily("ftps_worker_gpu_memory_used_bytes", "GPU memory in use on the device "
                               "(every process)", labels=["gpu"])
    util = GaugeMetricFamily("ftps_worker_gpu_utilization_ratio", "fraction of the last sample period the "
                             "GPU was busy", labels=["gpu"])
    has_memory = has_util = False
    for i in range(torch.cuda.device_count()):
        try:
            memory.add_metric([str(i)], float(torch.cuda.device_memory_used(i)))
            has_memory = True
        except Exception:  # noqa: BLE001 - no NVML: omitted
            pass
        try:
            util.add_metric([str(i)], float(torch.cuda.utilization(i)) / 100.0)
            has_util = True
        except Exception:  # noqa: BLE001 - no NVML: omitted
            pass
    if has_memory:
        yield memory
    if has_util:
        yield util
