"""OpenTelemetry traces, in one place: the process's tracer provider, the gRPC interceptors that
carry trace context between the services, and the helpers that carry it into background threads.

:func:`configure` runs once per process (each service's startup, the embedded stack's). With
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, spans go to that
collector over OTLP/gRPC in batches, every standard ``OTEL_*`` variable honoured (headers, TLS,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, sampling...); otherwise tracing is off: the API's
no-op provider, whose spans cost a function call. A provider set before (a test's, an embedding
program's) is left as it is.

Spans: every RPC on both sides (server spans carry ``ftps.service``: several services may share a
process), plus ``gateway.submit``, ``gateway.start_round``, ``scorer.round`` (one per run of a round,
a child of the StartScoring call that created it, so a round is one trace from the gateway's
StartRound to every worker), ``scorer.preparation``, ``scorer.score``, ``worker.job`` and
``storage.get`` / ``storage.put``. Attributes hold ids and counts, never record values.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from ftps.common.auth import CallDetails

log = logging.getLogger(__name__)

TRACER_NAME = "ftps"
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_lock = threading.Lock()
_configured: str | None = None
# The service handling the current call (set by the server interceptor; carried into threads by
# capture/attached): for the ``ftps.service`` span attribute and the ``service`` field of log lines.
_service: contextvars.ContextVar[str | None] = contextvars.ContextVar("ftps_service", default=None)


def configure(service_name: str) -> bool:
    """Set up this process's tracing once (later calls do nothing); True when spans are exported.

    ``service_name`` is the resource's ``service.name`` (``OTEL_SERVICE_NAME`` wins); a process
    running several services (the embedded stack) passes a neutral name, its server spans say
    which service answered (``ftps.service``)."""
    global _configured
    with _lock:
        if _configured is not None:
            return exporting()
        _configured = service_name
        if not any(os.environ.get(v) for v in ENDPOINT_VARS):
            return False
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        if exporting():
            log.info("tracing: a tracer provider is set already; keeping it")
            return True
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_*
        trace.set_tracer_provider(provider)  # flushed and shut down at exit (shutdown_on_exit)
        log.info("tracing: exporting spans of %s over OTLP to %s", service_name,
                 next(os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)))
        return True


def service_name() -> str:
    """The service of the current call (``ftps.service``), else the name :func:`configure` got."""
    return _service.get() or _configured or ""


def exporting() -> bool:
    """Whether a real (SDK) tracer provider is in place: spans are recorded somewhere."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A span around the block, a child of the current one; None-valued attributes are left out.
    An exception escaping the block is recorded on it and marks it as an error."""
    attrs = {k.replace("__", "."): v for k, v in attributes.items() if v is not None}
    service = _service.get()
    if service:
        attrs.setdefault("ftps.service", service)
    with tracer().start_as_current_span(name, attributes=attrs) as current:
        yield current


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as 32 and 16 hex digits; ("", "") when none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


# -- context across threads ---------------------------------------------------------------------
@dataclass(frozen=True)
class Captured:
    """The trace context (and the service) of where work was handed over, for the thread doing it."""

    context: otel_context.Context
    service: str | None


def capture() -> Captured:
    """Where we are now (call in the thread handing the work over: an RPC, a round's thread)."""
    return Captured(otel_context.get_current(), _service.get())


@contextlib.contextmanager
def attached(captured: Captured | None) -> Iterator[None]:
    """Run the block (in another thread) inside ``captured``: its spans become children of the span
    current at :func:`capture`. None: the block starts from an empty context (a new trace)."""
    if captured is None:
        yield
        return
    token = otel_context.attach(captured.context)
    service_token = _service.set(captured.service)
    try:
        yield
    finally:
        _service.reset(service_token)
        otel_context.detach(token)


# -- gRPC ------------------------------------------------------------------------------------
def _not_health(details: Any) -> bool:
    from opentelemetry.instrumentation.grpc import filters

    return not filters.health_check()(details)


class _ServiceAttribute(grpc.ServerInterceptor):
    """Names the service on the current server span and for log lines (inside the OpenTelemetry
    interceptor, whose span is current while the handler runs)."""

    def __init__(self, service: str) -> None:
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service = self.service

        def unary(behavior):
            def wrapped(request, context):
                token = _service.set(service)
                trace.get_current_span().set_attribute("ftps.service", service)
                try:
                    return behavior(request, context)
                finally:
                    _service.reset(token)
            return wrapped

        def stream(behavior):
            def wrapped(request, context):
                token = _service.set(service)
                trace.get_current_span().set_attribute("ftps.service", service)
                try:
                    yield from behavior(request, context)
                finally:
                    _service.reset(token)
            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), handler.request_deserializer,
                                                     handler.response_serializer)


def server_interceptors(service: str = "") -> list[grpc.ServerInterceptor]:
    """The server side, outermost first: a span per call (health checks left out) in the trace
    context the caller sent in its metadata, named after ``service`` (also the ``service`` of log
    lines). With tracing off when the server is made (no provider: :func:`configure` and a test's
    provider come first) the span interceptor is left out: no cost per call at all."""
    out: list[grpc.ServerInterceptor] = []
    if exporting():
        from opentelemetry.instrumentation.grpc import server_interceptor

        out.append(server_interceptor(filter_=_not_health))
    if service:
        out.append(_ServiceAttribute(service))
    return out


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ClientTracing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A CLIENT span per call (health checks left out), its trace context sent in the call's
    metadata (W3C ``traceparent``), so the server's span is its child.

    Not opentelemetry-instrumentation-grpc's client interceptor: that one turns a streaming call
    into a plain generator, without the call's ``cancel()``, ``trailing_metadata()`` and ``code()``
    that our clients use. With grpc's own interceptor API the call object stays what it is; the
    span ends when the call does (a done callback)."""

    def _start(self, details) -> tuple[trace.Span, Any]:
        from opentelemetry.propagate import inject
        service, method = _split_method(details.method)
        span = tracer().start_span(details.method.lstrip("/"), kind=trace.SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        metadata = list(details.metadata or []) + list(carrier.items())
        return span, CallDetails(details, metadata)

    @staticmethod
    def _end(span: trace.Span, call: Any) -> None:
        try:
            code = call.code()
        except Exception:
            code = None
        if isinstance(code, grpc.StatusCode):
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        span.end()

    def _intercept(self, continuation, details, request):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details, request)
        span, details = self._start(details)
        try:
            call = continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        call.add_done_callback(lambda c: self._end(span, c))  # at once when already done (unary)
        return call

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


_CLIENT = ClientTracing()


def instrument_channel(channel: grpc.Channel) -> grpc.Channel:
    """The client side of :func:`server_interceptors`: a span per call (:class:`ClientTracing`);
    ``channel`` as it is while tracing is off (decided now, like the server side)."""
    return grpc.intercept_channel(channel, _CLIENT) if exporting() else channel
