"""gRPC plumbing in one place: servers (message limits, health, reflection), channels (message
limits, retry of UNAVAILABLE through the service config) and the servicer error mapping."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import secrets
import signal
import sys
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ftps.common import errors, reflection, rpc_status, tracing
from ftps.common.errors import FtpsError
from ftps.common.limits import Limits, RpcLimiter

if TYPE_CHECKING:
    from ftps.common.auth import TokenSigner

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
    "ftps.v1.BuilderRegistryService",
    "ftps.v1.ContributorGatewayService",
    "ftps.v1.FinetuneWorkerService",
    "ftps.v1.LiraScorerService",
)


@dataclass(frozen=True)
class Tls:
    """PEM files. A server with ``ca`` requires client certificates (mutual TLS); a client with
    ``cert``/``key`` presents them."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @classmethod
    def from_files(cls, cert_file: str = "", key_file: str = "", ca_file: str = "") -> "Tls | None":
        if not (cert_file or ca_file):
            return None
        if bool(cert_file) != bool(key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        read = lambda f: Path(f).read_bytes() if f else None  # noqa: E731
        return cls(read(cert_file), read(key_file), read(ca_file))


def make_channel(target: str, *, max_message_mb: int = 64, round_robin: bool = False,
                 token: str | Callable[[], str] | None = None, tls: Tls | None = None) -> grpc.Channel:
    """A channel to ``target`` (``host:port`` or ``dns:///name:port``): TLS when ``tls`` is given,
    plaintext otherwise; ``token`` (a string or a provider) sent as a bearer token on every call."""
    options = message_options(max_message_mb) + [
        ("grpc.service_config", _retry_service_config(_ALL_SERVICES)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    if tls is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                             certificate_chain=tls.cert)
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token is not None:
        from ftps.common.auth import BearerToken

        channel = grpc.intercept_channel(channel, BearerToken(token))
    # A client span per call, its trace context in the metadata (ftps.common.tracing).
    return tracing.instrument_channel(channel)


_NO_KEY = ("no token signing key: set FTPS_AUTH_KEY_FILE (--auth-key-file) or FTPS_AUTH_KEY (--auth-key), "
           "or switch authentication off explicitly with FTPS_AUTH_DISABLED=true (--auth-disabled)")
_KEY_AND_DISABLED = ("a token signing key and auth_disabled are both set: unset FTPS_AUTH_DISABLED "
                     "(--no-auth-disabled) or the key")


class Security:
    """A service's auth and TLS, built once from its settings: the server side (interceptor,
    credentials) and the client side (channels to other services with a service token)."""

    def __init__(self, *, signer: "TokenSigner | None" = None, tls: Tls | None = None,
                 subject: str = "service", auth_disabled: bool = False) -> None:
        from ftps.common.auth import AuthNotConfigured, ServiceTokens

        # Fail closed: no signer means no service, unless the caller said so in as many words.
        if (signer is None) != auth_disabled:
            raise AuthNotConfigured(_NO_KEY if signer is None else _KEY_AND_DISABLED)
        self.signer = signer
        self.auth_disabled = auth_disabled
        self.tls = tls
        self.subject = subject
        self._tokens = ServiceTokens(signer, subject) if signer else None

    @classmethod
    def from_settings(cls, settings: Any, subject: str) -> "Security":
        """Raises :class:`ftps.common.auth.AuthNotConfigured` (one line: what to set) when there is
        no usable signing key and auth is not switched off by ``auth_disabled``."""
        from ftps.common.auth import AuthNotConfigured, TokenSigner, load_key

        try:
            key = load_key(key=settings.auth_key, key_file=settings.auth_key_file)
            signer = TokenSigner(key) if key is not None else None
        except OSError as exc:
            raise AuthNotConfigured(f"cannot read auth key file {settings.auth_key_file}: {exc.strerror}") from exc
        except AuthNotConfigured:
            raise
        except ValueError as exc:  # a key shorter than 32 bytes
            raise AuthNotConfigured(f"auth key: {exc}") from exc
        if settings.auth_disabled and signer is None:
            log.warning("%s: AUTHENTICATION IS DISABLED (auth_disabled): every caller is admin %r, "
                        "tokens are not checked. Local experiments only.", subject, "auth-disabled")
        tls = Tls.from_files(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
        return cls(signer=signer, tls=tls, subject=subject, auth_disabled=settings.auth_disabled)

    def interceptor(self) -> grpc.ServerInterceptor:
        """Checks every call's token; with auth switched off, names every caller AUTH_DISABLED."""
        from ftps.common.auth import AuthInterceptor, NoAuthInterceptor

        return NoAuthInterceptor() if self.signer is None else AuthInterceptor(self.signer)

    def server(self, *, max_message_mb: int = 64, max_connection_age_s: float = 0,
               limits: Limits | None = None, metrics_listen: str = "") -> "Server":
        """``limits``: the service's bounds on work per caller (``Limits.from_settings(settings)``);
        None: the defaults. The limiter goes after the auth interceptor, whose principal it counts."""
        interceptors = [self.interceptor()]
        return Server(max_message_mb=max_message_mb, interceptors=interceptors, tls=self.tls,
                      max_connection_age_s=max_connection_age_s, limits=limits, metrics_listen=metrics_listen,
                      service=self.subject)

    def channel(self, target: str, *, max_message_mb: int = 64, round_robin: bool = False) -> grpc.Channel:
        return make_channel(target, max_message_mb=max_message_mb, round_robin=round_robin,
                            token=self._tokens, tls=self.tls)


# Clients ping every 30 s on long calls (WatchRound, RunJob); the server must accept that, or it
# answers GOAWAY "too_many_pings" and the stream dies mid-round.
_SERVER_KEEPALIVE = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class Server:
    """A threaded gRPC server with the stock health service and reflection, and bounded work per
    caller (:mod:`ftps.common.limits`): at most ``limits.max_concurrent_rpcs`` calls at once, each
    caller's open streams capped, idle and old streams ended; health checks always answer."""

    def __init__(self, *, max_message_mb: int = 64, limits: Limits | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = (), tls: Tls | None = None,
                 max_connection_age_s: float = 0, metrics_listen: str = "", service: str = "") -> None:
        from ftps.common.metrics import CollectorRegistry, RpcMetrics

        options = message_options(max_message_mb) + _SERVER_KEEPALIVE
        if max_connection_age_s > 0:
            # GOAWAY after this long: the client reconnects and re-resolves its target (new pods
            # behind a dns:/// name get traffic). Calls in flight are never cut (infinite grace).
            options += [("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", 2**31 - 1)]
        # Streams (WatchRound, WatchScores) hold a thread each while they last. The limiter admits
        # at most max_concurrent_rpcs calls, so HEALTH_RESERVE threads stay free for health checks
        # and for refusing the calls over the limit at once (never queued behind stuck work).
        self.limiter = RpcLimiter(limits or Limits())
        # This server's own registry (services sharing a process export only their own series);
        # served on metrics_listen ("host:port"; empty: not served) from start() to stop().
        self.metrics_registry = CollectorRegistry()
        self.metrics_listen = metrics_listen
        self.metrics_port: int | None = None
        self._metrics_endpoint = None
        # Outermost first: the trace span (in the caller's trace context, named after ``service``),
        # then the RPC metrics, which so see every answer, refusals included (UNAUTHENTICATED from
        # the auth interceptor, RESOURCE_EXHAUSTED from the limiter), then ``interceptors`` (auth)
        # and the limiter, which counts the principal auth found.
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.limiter.limits.pool_size, thread_name_prefix="rpc"),
            options=options, interceptors=[*tracing.server_interceptors(service), RpcMetrics(self.metrics_registry),
                                           *interceptors, self.limiter],
        )
        self._tls = tls
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._service_names: list[str] = [health.SERVICE_NAME, *reflection.SERVICE_NAMES]
        self._on_stop: list[Callable[[], None]] = []
        self.port: int | None = None

    def on_stop(self, fn: Callable[[], None]) -> None:
        """``fn`` runs when the server stops (background threads of the service end with it)."""
        self._on_stop.append(fn)

    def add(self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any, service_name: str) -> None:
        add_fn(servicer, self.grpc_server)
        self._service_names.append(service_name)

    def start(self, listen: str) -> int:
        reflection.enable(self._service_names, self.grpc_server)
        if self._tls is not None and self._tls.cert:
            creds = grpc.ssl_server_credentials([(self._tls.key, self._tls.cert)], root_certificates=self._tls.ca,
                                                require_client_auth=self._tls.ca is not None)
            self.port = self.grpc_server.add_secure_port(listen, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        if self.metrics_listen:
            from ftps.common.metrics import MetricsEndpoint

            self._metrics_endpoint = MetricsEndpoint(self.metrics_registry, self.metrics_listen)
            self.metrics_port = self._metrics_endpoint.port
        self.grpc_server.start()
        for name in self._service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        try:
            self.grpc_server.stop(grace).wait()
        finally:
            self.limiter.close()
            if self._metrics_endpoint is not None:
                self._metrics_endpoint.stop()
                self._metrics_endpoint = None
            for fn in self._on_stop:
                fn()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def full_name(descriptor_module: Any, service: str) -> str:
    return descriptor_module.DESCRIPTOR.services_by_name[service].full_name


def rpc(method: Callable) -> Callable:
    """Servicer-method decorator: domain errors become precise statuses, the rest INTERNAL.

    INTERNAL says only ``internal error, incident <id>``: the exception and its traceback go to
    the log under that id, never to the caller (they can hold paths, object keys, other services'
    addresses, other tenants' ids). Works for unary and server-streaming handlers (generator
    functions).
    """

    def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
        # The code and message as plain clients see them, plus the rich status (rpc_status.rich_status).
        if isinstance(exc, FtpsError) and exc.code is not errors.Code.INTERNAL:
            rpc_status.abort(context, exc)
        incident = secrets.token_hex(6)
        log.error("incident %s: unexpected error in %s: %s: %s", incident, method.__qualname__,
                  type(exc).__name__, exc, exc_info=exc)
        context.abort_with_status(rpc_status.internal_status(incident))

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
    # context.abort records the status, then raises a bare Exception() (a subclass private to grpc
    # in some versions): let it through untouched. A grpc.RpcError is another service's answer that
    # nobody mapped (rpc_status.from_rpc_error): unexpected, so an incident like any other.
    if isinstance(exc, grpc.RpcError):
        return False
    return (type(exc) is Exception and not exc.args) or type(exc).__module__.startswith("grpc")


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


PARENT_PID_ENV = "PRIVACYSCORE_PARENT_PID"


def die_with_parent() -> None:
    """When started by a local stack (``$PRIVACYSCORE_PARENT_PID``), get SIGTERM as soon as that
    parent dies — even by SIGKILL — instead of living on as an orphan (Linux ``PR_SET_PDEATHSIG``)."""
    import ctypes
    import os

    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, ValueError):
        return
    if os.getppid() != int(parent):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def run_service(settings_cls: type, create_server: Callable[[Any], Server], argv: Sequence[str] | None, *,
                module: str, description: str, migrate: Callable[[Any], None] | None = None) -> int:
    """``python -m services.X``: settings from flags and env, logging, tracing (the service named
    after its module: ``services.lira_scorer`` -> ``lira-scorer``), serve until SIGINT/SIGTERM."""
    from ftps.common.log import setup_logging
    from ftps.common.settings import load_settings

    die_with_parent()
    settings = load_settings(settings_cls, argv, prog=f"python -m {module}", description=description)
    setup_logging(settings.log_level, settings.log_format)
    tracing.configure(module.rpartition(".")[2].replace("_", "-"))
    from ftps.common.auth import AuthNotConfigured
    from ftps.common.db import MigrationError

    try:
        if migrate is not None and getattr(settings, "migrate_only", False):
            migrate(settings)  # the migration Job: the schema, then exit
            logging.getLogger(module).info("%s: database migrated", description)
            return 0
        server = create_server(settings)
    except AuthNotConfigured as exc:
        # Fail closed, with one line saying what to set (no traceback: nothing is broken but the settings).
        print(f"python -m {module}: refusing to start: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:  # a schema that cannot be brought up to date: one line, no serving
        print(f"python -m {module}: refusing to start: {exc}", file=sys.stderr)
        return 2
    port = server.start(settings.listen)
    logging.getLogger(module).info("%s listening on %s (port %d)", description, settings.listen, port)
    if server.metrics_port is not None:
        logging.getLogger(module).info("%s metrics on %s (port %d)", description, settings.metrics_listen,
                                       server.metrics_port)
    serve_until_signal(server)
    return 0
