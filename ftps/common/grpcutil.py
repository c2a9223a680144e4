"""gRPC plumbing in one place: servers (message limits, health, reflection), channels (message
limits, retry of UNAVAILABLE through the service config) and the servicer error mapping."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from concurrent import futures
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ftps.common.errors import FtpsError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def message_options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * MiB
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
    ]


def _retry_service_config(service_names: Iterable[str]) -> str:
    # Retry only UNAVAILABLE (the server is not there yet or went away); everything else is an
    # answer the caller must see. Streaming calls are retried only before the first response.
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": s} for s in service_names],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "3s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    })


_ALL_SERVICES = (
    "ftps.v1.BuilderRegistry",
    "ftps.v1.ContributorGateway",
    "ftps.v1.FinetuneWorker",
    "ftps.v1.LiraScorer",
)


def make_channel(target: str, *, max_message_mb: int = 64, round_robin: bool = False) -> grpc.Channel:
    """A plaintext channel to ``target`` (``host:port`` or ``dns:///name:port``)."""
    options = message_options(max_message_mb) + [
        ("grpc.service_config", _retry_service_config(_ALL_SERVICES)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    return grpc.insecure_channel(target, options=options)


class Server:
    """A threaded gRPC server with the stock health service and reflection."""

    def __init__(self, *, max_message_mb: int = 64, max_workers: int = 16) -> None:
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
            options=message_options(max_message_mb),
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port: int | None = None

    def add(self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any, service_name: str) -> None:
        add_fn(servicer, self.grpc_server)
        self._service_names.append(service_name)

    def start(self, listen: str) -> int:
        reflection.enable_server_reflection(self._service_names, self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.grpc_server.start()
        for name in self._service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def full_name(descriptor_module: Any, service: str) -> str:
    return descriptor_module.DESCRIPTOR.services_by_name[service].full_name


def rpc(method: Callable) -> Callable:
    """Servicer-method decorator: domain errors become precise statuses, the rest INTERNAL.

    Works for unary and server-streaming handlers (generator functions).
    """

    def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, FtpsError):
            context.abort(exc.code, str(exc))
        log.exception("unexpected error in %s", method.__qualname__)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                if _is_abort(exc):
                    raise
                _abort(context, exc)
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            if _is_abort(exc):
                raise
            _abort(context, exc)
    return unary_wrapper


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through untouched.
    return type(exc).__module__.startswith("grpc")


def wait_healthy(channel: grpc.Channel, *, timeout: float = 30.0, service: str = "") -> None:
    """Block until the server behind ``channel`` reports SERVING (raises on timeout)."""
    grpc.channel_ready_future(channel).result(timeout=timeout)
    stub = health_pb2_grpc.HealthStub(channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"service {service or '(server)'} is not serving")


def serve_until_signal(*servers: Server) -> None:
    """Block until SIGINT/SIGTERM, then stop every server gracefully."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.stop()
