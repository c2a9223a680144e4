"""Prometheus metrics of the real embedded stack: a scrape of every service's /metrics after a round
on digits shows the RPC, round, job and pending-work series with sane values and bounded labels."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.api import ContributorClient
from ftps.common import archives
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2
from tests.conftest import digits_records
from tests.stacks import builder, force_round, settled

SHAPE = [1, 8, 8]
PORTS = {k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")}
# What a record, submission or round id looks like: never a label value.
ID_LIKE = re.compile(r"^(s-[0-9a-f]{16}.*|r-.*|round-.*|[0-9a-f]{16,})$")


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value)]} of one /metrics page."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = EmbeddedStack(ports=dict(PORTS), data_dir=tmp_path_factory.mktemp("data"), metrics=True)
    s.start()
    yield s
    s.stop()


def test_a_scrape_after_a_round_shows_rpcs_rounds_jobs_and_pending_work(stack, digits_splits, digits_strategy,
                                                                          digits_base_weights):
    assert set(stack.metrics_addresses) == {"gateway", "registry", "scorer", "worker"}
    signer = stack.signer()
    token = signer.issue("acme", "builder")
    b = builder(stack.addresses, token)
    task = b.create_task("metrics", common_pb2.TaskSettings(record_shape=SHAPE, num_classes=10, seed=3, n_models=4,
                                                            batch_threshold=1000))
    b.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    b.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    b.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
    b.close()
    alice = ContributorClient(gateway=stack.addresses["gateway"], token=signer.issue("alice", "contributor"))
    x, y = digits_records(digits_splits, 10, seed=1)
    sub = alice.submit(task.task_id, x, y)

    gw = scrape(stack.metrics_addresses["gateway"])
    assert value(gw, "ftps_gateway_pending_records", task=task.task_id) == 10
    assert value(gw, "ftps_gateway_pending_submissions", task=task.task_id) == 1
    assert value(gw, "ftps_gateway_submits_total", result="acknowledged") == 1

    status, scores = force_round(stack.addresses, token, task.task_id)
    assert status.state == common_pb2.ROUND_STATE_DONE and len(scores) == 10
    assert settled(alice, sub.submission_id).state != 0
    alice.close()

    gw = scrape(stack.metrics_addresses["gateway"])
    assert value(gw, "ftps_rpc_requests_total", service="ftps.v1.ContributorGatewayService", method="SubmitRecords",
                 code="OK") == 1
    assert value(gw, "ftps_rpc_duration_seconds_count", method="SubmitRecords") == 1
    assert value(gw, "ftps_gateway_pending_records", task=task.task_id) == 0  # back to 0, not vanished
    assert [lab for lab, _ in gw["ftps_gateway_pending_records"]] == [{"task": task.task_id}]

    sc = scrape(stack.metrics_addresses["scorer"])
    assert value(sc, "ftps_scorer_rounds_finished_total", state="done") == 1
    assert value(sc, "ftps_scorer_rounds_finished_total", state="failed") == 0
    assert value(sc, "ftps_scorer_round_duration_seconds_count") == 1
    assert value(sc, "ftps_scorer_models_finetuned_total") >= 4
    assert value(sc, "ftps_scorer_job_duration_seconds_count") > 0
    assert value(sc, "ftps_scorer_job_duration_seconds_sum") > 0
    for idle in ("ftps_scorer_jobs_pending", "ftps_scorer_jobs_in_flight", "ftps_scorer_jobs_pending_per_worker",
                 "ftps_scorer_jobs_failed_total"):
        assert idle in sc and value(sc, idle) == 0, idle
    assert value(sc, "ftps_scorer_rounds") == 0  # nothing running here any more
    assert value(sc, "ftps_rpc_requests_total", service="ftps.v1.LiraScorerService", method="StartScoring", code="OK") >= 1

    wk = scrape(stack.metrics_addresses["worker"])
    assert value(wk, "ftps_worker_models_finetuned_total") >= 4
    assert value(wk, "ftps_worker_jobs_in_flight") == 0
    assert value(wk, "ftps_worker_sandbox_children") >= 0
    assert value(wk, "ftps_rpc_requests_total", service="ftps.v1.FinetuneWorkerService", method="RunJob", code="OK") > 0

    import os
    if os.environ.get("FTPS_METRICS_SAMPLE"):
        with open(os.environ["FTPS_METRICS_SAMPLE"], "w") as f:
            for url in stack.metrics_addresses.values():
                f.write(urllib.request.urlopen(url, timeout=10).read().decode())
    # Bounded labels everywhere: no record, submission or round id as a label value.
    ids = {sub.submission_id, status.round_id, *sub.record_ids}
    for name, url in stack.metrics_addresses.items():
        for sample, series in scrape(url).items():
            for labels, _ in series:
                for k, v in labels.items():
                    assert v not in ids and not ID_LIKE.match(v), (name, sample, k, v)


def test_metrics_are_off_by_default(tmp_path):
    from tests.stacks import embedded_stack

    s = embedded_stack(tmp_path)
    try:
        assert s.metrics_addresses == {}
        assert all(server.metrics_port is None for server in s._servers)
    finally:
        s.stop()


def test_refused_calls_are_counted(stack):
    """Calls the auth interceptor or the limiter refuse never reach a handler, and still count
    (the metrics interceptor sits outside both) under the code the caller saw."""
    import threading

    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from ftps.common import grpcutil
    from ftps.common.limits import Limits
    from ftps.v1 import gateway_pb2, gateway_pb2_grpc

    ch = grpcutil.make_channel(stack.addresses["gateway"], token="not-a-token")
    try:
        with pytest.raises(grpc.RpcError) as e:
            gateway_pb2_grpc.ContributorGatewayServiceStub(ch).GetSubmission(
                gateway_pb2.GetSubmissionRequest(submission_id="s-0"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        ch.close()
    gw = scrape(stack.metrics_addresses["gateway"])
    assert value(gw, "ftps_rpc_requests_total", service="ftps.v1.ContributorGatewayService",
                 method="GetSubmission", code="UNAUTHENTICATED") == 1

    # RESOURCE_EXHAUSTED from the limiter: a second stream of one caller over a cap of one.
    server = grpcutil.Server(limits=Limits(max_streams_per_principal=1), metrics_listen="127.0.0.1:0")
    port = server.start("127.0.0.1:0")
    release = threading.Event()

    def requests():  # one request, then the stream stays open
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(10)

    ch = grpcutil.make_channel(f"127.0.0.1:{port}")
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        first = stub.ServerReflectionInfo(requests(), timeout=10)
        next(first)  # open and answered
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ServerReflectionInfo(requests(), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        list(first)
        own = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
        assert value(own, "ftps_rpc_requests_total", method="ServerReflectionInfo", code="RESOURCE_EXHAUSTED") == 1
        assert value(own, "ftps_rpc_requests_total", method="ServerReflectionInfo", code="OK") == 1
    finally:
        release.set()
        ch.close()
        server.stop(grace=0)
