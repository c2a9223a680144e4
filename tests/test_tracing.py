"""Traces and log lines: a round on the real embedded stack is ONE trace from the gateway's
StartRound through the scorer's round to every worker's job (spans in an in-memory exporter); JSON
log lines carry its trace id; with tracing off nothing breaks and log lines carry no ids."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from clients.api import ContributorClient
from ftps.common import archives, grpcutil, tracing
from ftps.common.log import configure_handler
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2
from tests.conftest import digits_records
from tests.stacks import builder, force_round

SHAPE = [1, 8, 8]
PORTS = {k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")}


def _reset_tracer_provider() -> None:
    # The API sets its global provider once per process; tests put theirs in and take it out again
    # (what opentelemetry-test-utils does), so the other tests run with tracing off.
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture
def spans():
    """An in-memory exporter behind the process's tracer provider, for this test."""
    _reset_tracer_provider()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    _reset_tracer_provider()


@pytest.fixture
def json_lines():
    """Every log line of the process as JSON (FTPS_LOG_FORMAT=json), at INFO, into a buffer."""
    buf = io.StringIO()
    handler = configure_handler(logging.StreamHandler(buf), "json")
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buf
    root.removeHandler(handler)
    root.setLevel(level)


def _named(finished, name: str, kind: trace.SpanKind | None = None) -> list:
    return [s for s in finished if s.name == name and (kind is None or s.kind == kind)]


def test_a_round_is_one_trace_from_the_gateway_to_every_worker(spans, json_lines, tmp_path, digits_splits,
                                                                digits_strategy, digits_base_weights):
    with EmbeddedStack(ports=dict(PORTS), data_dir=tmp_path) as stack:
        signer = stack.signer()
        token = signer.issue("acme", "builder")
        b = builder(stack.addresses, token)
        task = b.create_task("traced", common_pb2.TaskSettings(record_shape=SHAPE, num_classes=10, seed=3,
                                                               n_models=4, batch_threshold=1000))
        b.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
        b.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
        b.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
        b.close()
        alice = ContributorClient(gateway=stack.addresses["gateway"], token=signer.issue("alice", "contributor"))
        x, y = digits_records(digits_splits, 10, seed=1)
        alice.submit(task.task_id, x, y)
        alice.close()
        status, scores = force_round(stack.addresses, token, task.task_id)
        assert status.state == common_pb2.ROUND_STATE_DONE and len(scores) == 10

        deadline = time.time() + 10  # the round's span ends just after watchers see DONE
        while not _named(spans.get_finished_spans(), "scorer.round") and time.time() < deadline:
            time.sleep(0.05)
    finished = spans.get_finished_spans()

    (submit,) = _named(finished, "gateway.submit")
    assert submit.attributes["ftps.records"] == 10 and submit.attributes["ftps.task"] == task.task_id
    assert all(not isinstance(v, (bytes, list, tuple)) or len(v) < 8 for v in submit.attributes.values())

    (start_round,) = _named(finished, "/ftps.v1.ContributorGatewayService/StartRound", trace.SpanKind.SERVER)
    trace_id = start_round.context.trace_id
    assert start_round.attributes["ftps.service"] == "contributor-gateway"
    (gw_round,) = _named(finished, "gateway.start_round")
    assert gw_round.attributes["ftps.round"] == status.round_id
    (start_scoring,) = _named(finished, "/ftps.v1.LiraScorerService/StartScoring", trace.SpanKind.SERVER)
    assert start_scoring.attributes["ftps.service"] == "lira-scorer"
    (rnd,) = _named(finished, "scorer.round")
    assert rnd.attributes["ftps.round"] == status.round_id
    (score,) = _named(finished, "scorer.score")
    run_job_clients = _named(finished, "ftps.v1.FinetuneWorkerService/RunJob", trace.SpanKind.CLIENT)
    run_job_servers = _named(finished, "/ftps.v1.FinetuneWorkerService/RunJob", trace.SpanKind.SERVER)
    jobs = _named(finished, "worker.job")
    assert run_job_clients and len(run_job_clients) == len(run_job_servers) == len(jobs)
    assert sum(j.attributes["ftps.models"] for j in jobs) == 4
    assert {j.attributes["ftps.device"] for j in jobs} == {"cpu"}

    # One trace: the gateway's StartRound, the scorer's call and round, every job on both sides.
    for span in (gw_round, start_scoring, rnd, score, *run_job_clients, *run_job_servers, *jobs):
        assert span.context.trace_id == trace_id, span.name
    # ... and a tree: each a child of the one before it.
    assert gw_round.parent.span_id == start_round.context.span_id
    assert rnd.parent.span_id == start_scoring.context.span_id
    assert score.parent.span_id == rnd.context.span_id
    assert {c.parent.span_id for c in run_job_clients} == {rnd.context.span_id}
    client_ids = {c.context.span_id for c in run_job_clients}
    assert {s.parent.span_id for s in run_job_servers} == client_ids
    assert {j.parent.span_id for j in jobs} == {s.context.span_id for s in run_job_servers}
    # Storage calls of the round are in it too (the batch, phi, the result).
    puts = [s for s in _named(finished, "storage.put") if s.context.trace_id == trace_id]
    assert puts and all(s.attributes["ftps.bytes"] > 0 and s.attributes["ftps.key"] for s in puts)
    # Health checks make no spans.
    assert not [s for s in finished if "grpc.health.v1.Health" in s.name]

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert all(set(line) >= {"time", "level", "logger", "message", "trace_id", "span_id", "service"}
               for line in lines)
    traced = [line for line in lines if line["trace_id"] == format(trace_id, "032x")]
    assert any(status.round_id in line["message"] and line["logger"].endswith("rounds") for line in traced)
    assert any(line["service"] == "lira-scorer" for line in traced)
    assert all(len(line["span_id"]) == 16 for line in traced)


def test_with_tracing_off_nothing_breaks_and_lines_carry_no_ids(monkeypatch, serve):
    _reset_tracer_provider()
    for var in tracing.ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracing, "_configured", None)
    assert tracing.configure("test") is False and not tracing.exporting()
    assert tracing.configure("again") is False  # once per process
    with tracing.span("nothing", ftps__x=1):
        assert tracing.current_ids() == ("", "")
        captured = tracing.capture()
    with tracing.attached(captured), tracing.attached(None):
        pass
    # Servers and channels made now carry no span interceptors (no cost per call), and serve.
    assert [type(i).__name__ for i in tracing.server_interceptors("test")] == ["_ServiceAttribute"]
    assert _reflect(serve(grpcutil.Server(service="test"))) == []
    buf = io.StringIO()
    log = logging.getLogger("ftps.test.tracing")
    handler = configure_handler(logging.StreamHandler(buf), "json")
    log.addHandler(handler)
    try:
        log.warning("line with\nnewline")
    finally:
        log.removeHandler(handler)
    (line,) = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert line["trace_id"] == "" and line["span_id"] == "" and line["message"] == "line with\nnewline"
    assert line["level"] == "WARNING" and line["logger"] == "ftps.test.tracing"


def _reflect(addr: str) -> list:
    """A reflection stream through make_channel: the stream's call object keeps code(),
    trailing_metadata() and cancel() however the channel is instrumented."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpcutil.make_channel(addr)
    release = threading.Event()
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                         timeout=10)
        assert list(call) and call.code() == grpc.StatusCode.OK and call.trailing_metadata() is not None

        def idle():  # a client stream that sends nothing until released
            release.wait(10)
            yield from ()

        cancelled = stub.ServerReflectionInfo(idle(), timeout=10)
        cancelled.cancel()
        with pytest.raises(grpc.RpcError) as e:
            list(cancelled)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    finally:
        release.set()
        ch.close()
    return []


def test_instrumented_streams_keep_their_call_object(spans, serve):
    assert _reflect(serve(grpcutil.Server(service="test"))) == []
    names = [(s.name, s.kind) for s in spans.get_finished_spans()]
    assert ("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", trace.SpanKind.CLIENT) in names
    server_spans = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert server_spans and all(s.attributes["ftps.service"] == "test" for s in server_spans)


def test_text_lines_carry_the_trace_id_inside_a_span(spans):
    buf = io.StringIO()
    log = logging.getLogger("ftps.test.tracing.text")
    handler = configure_handler(logging.StreamHandler(buf), "text")
    log.addHandler(handler)
    try:
        with tracing.span("outer") as span:
            log.warning("inside")
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = buf.getvalue().splitlines()
    ctx = span.get_span_context()
    assert inside.endswith(f"inside trace={ctx.trace_id:032x} span={ctx.span_id:016x}")
    assert outside.endswith("outside")


def test_log_format_is_a_setting(monkeypatch):
    from ftps.common.log import log_format
    from ftps.common.settings import CommonSettings

    monkeypatch.setenv("FTPS_LOG_FORMAT", "json")
    assert CommonSettings().log_format == "json" and log_format() == "json"
    monkeypatch.setenv("FTPS_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        log_format()
    monkeypatch.delenv("FTPS_LOG_FORMAT")
    assert CommonSettings().log_format == "text" and log_format() == "text"


def test_spans_go_to_the_otlp_endpoint_when_it_is_set():
    """A service process with OTEL_EXPORTER_OTLP_ENDPOINT exports its spans over OTLP/gRPC (here to
    a collector stand-in), under its service name, flushed at exit."""
    import os
    import subprocess
    import sys
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    got: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            got.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code = ("from ftps.common import tracing\n"
                "assert tracing.configure('lira-scorer') and tracing.exporting()\n"
                "with tracing.span('scorer.round', ftps__round='r-1'):\n"
                "    with tracing.span('storage.put', ftps__key='k', ftps__bytes=3):\n"
                "        pass\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    finally:
        server.stop(0)
    spans_by_name = {}
    for request in got:
        for rs in request.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans_by_name[s.name] = (service, s)
    assert set(spans_by_name) == {"scorer.round", "storage.put"}
    assert {service for service, _ in spans_by_name.values()} == {"lira-scorer"}
    outer, inner = spans_by_name["scorer.round"][1], spans_by_name["storage.put"][1]
    assert inner.trace_id == outer.trace_id and inner.parent_span_id == outer.span_id
