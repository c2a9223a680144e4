"""Hostile input at the edge: malformed, oversized, wrong dtypes and shapes, NaN/inf, labels out of
range, empty batches, unknown and path-like ids, giant strings — each gets a precise status,
nothing is stored, and the server keeps serving. Validators fuzzed with hypothesis."""

from __future__ import annotations

import numpy as np
import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ftps.common import grpcutil, serde
from ftps.common.errors import InvalidArgument
from ftps.records.checks import validate_for_task as validate_records
from ftps.common.storage import check_id
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc

SETTINGS = common_pb2.TaskSettings(record_shape=[1, 4, 4], num_classes=3)


@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "float16", "complex64"]),
       labels=st.lists(st.integers(-5, 8), min_size=0, max_size=6),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_validate_records_accepts_only_good_batches(shape, dtype, labels, poison):
    x = np.zeros(shape, dtype=dtype) if dtype != "complex64" else np.zeros(shape, np.complex64)
    if poison is not None and x.size and x.dtype.kind == "f":
        x.flat[0] = poison
    y = np.asarray(labels, dtype=np.int64)
    good = (list(shape[1:]) == [1, 4, 4] and shape[0] > 0 and dtype in ("float32", "float64")
            and len(labels) == shape[0] and all(0 <= v < 3 for v in labels) and poison is None)
    if good:
        gx, gy = validate_records(x, y, SETTINGS)
        assert gx.dtype == np.float32 and gy.dtype == np.int64
    else:
        with pytest.raises(InvalidArgument):
            validate_records(x, y, SETTINGS)


@given(st.builds(common_pb2.Tensor, shape=st.lists(st.integers(-3, 2**40), max_size=10),
                 dtype=st.integers(-1, 9), data=st.binary(max_size=64)))
@settings(max_examples=300, deadline=None)
def test_tensor_decoding_never_crashes(t):
    try:
        a = serde.array_from_tensor(t, field="records.x")
    except InvalidArgument as exc:
        assert "records.x" in str(exc)
    else:
        assert a.nbytes == len(t.data)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_ids_are_safe_or_refused(s):
    try:
        out = check_id(s, "task_id")
    except InvalidArgument:
        return
    assert out == s and "/" not in s and ".." not in s and len(s) <= 64


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                      data_dir=tmp_path_factory.mktemp("data"), auth=False)
    s.start()
    reg = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(s.addresses["registry"]))
    task = reg.CreateTask(registry_pb2.CreateTaskRequest(name="h", settings=common_pb2.TaskSettings(
        record_shape=[1, 4, 4], num_classes=3, batch_threshold=100_000)), timeout=5)
    gw = gateway_pb2_grpc.ContributorGatewayServiceStub(grpcutil.make_channel(s.addresses["gateway"], max_message_mb=200))
    yield s, task, gw
    s.stop()


def _req(task_id, x, y, contributor="mallory"):
    return gateway_pb2.SubmitRecordsRequest(task_id=task_id, contributor=contributor, records=common_pb2.Records(
        x=serde.tensor_from_array(x), y=serde.tensor_from_array(y)))


def _pending(gw, task_id) -> int:
    ok = gw.SubmitRecords(_req(task_id, np.zeros((1, 1, 4, 4), np.float32), np.zeros(1, np.int64),
                               contributor="probe"), timeout=5)
    return ok.pending_in_task


@pytest.mark.parametrize("name,make,code", [
    ("empty batch", lambda t: _req(t, np.zeros((0, 1, 4, 4), np.float32), np.zeros(0, np.int64)), "INVALID_ARGUMENT"),
    ("wrong shape", lambda t: _req(t, np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64)), "INVALID_ARGUMENT"),
    ("wrong dtype", lambda t: _req(t, np.zeros((2, 1, 4, 4), np.uint8), np.zeros(2, np.int64)), "INVALID_ARGUMENT"),
    ("inf", lambda t: _req(t, np.full((2, 1, 4, 4), np.inf, np.float32), np.zeros(2, np.int64)), "INVALID_ARGUMENT"),
    ("label out of range", lambda t: _req(t, np.zeros((2, 1, 4, 4), np.float32), np.array([0, 3])), "INVALID_ARGUMENT"),
    ("negative label", lambda t: _req(t, np.zeros((2, 1, 4, 4), np.float32), np.array([0, -1])), "INVALID_ARGUMENT"),
    ("float labels", lambda t: _req(t, np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.float32)), "INVALID_ARGUMENT"),
    ("unknown task", lambda t: _req("t-nope", np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64)), "NOT_FOUND"),
    ("path-like task", lambda t: _req("../../etc", np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64)), "INVALID_ARGUMENT"),
    ("giant contributor", lambda t: _req(t, np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64),
                                         contributor="x" * 100_000), "INVALID_ARGUMENT"),
    ("no records", lambda t: gateway_pb2.SubmitRecordsRequest(task_id=t, contributor="m"), "INVALID_ARGUMENT"),
    ("lying byte count", lambda t: gateway_pb2.SubmitRecordsRequest(task_id=t, contributor="m", records=common_pb2.Records(
        x=common_pb2.Tensor(shape=[1000, 1, 4, 4], dtype=common_pb2.DTYPE_FLOAT32, data=b"\0" * 64),
        y=serde.tensor_from_array(np.zeros(1000, np.int64)))), "INVALID_ARGUMENT"),
])
def test_bad_submissions_get_precise_statuses_and_store_nothing(stack, name, make, code):
    s, task, gw = stack
    before = _pending(gw, task.task_id)
    with pytest.raises(grpc.RpcError) as e:
        gw.SubmitRecords(make(task.task_id), timeout=10)
    assert e.value.code().name == code, (name, e.value.details())
    assert len(e.value.details()) < 500  # a message, not a dump
    assert _pending(gw, task.task_id) == before + 1  # only the probe was stored; the server still serves


def test_oversized_message_is_resource_exhausted(stack):
    s, task, gw = stack
    big = np.zeros((70 * 1024 * 1024 // 64, 1, 4, 4), np.float32)  # ~70 MiB > the 64 MiB limit
    with pytest.raises(grpc.RpcError) as e:
        gw.SubmitRecords(_req(task.task_id, big, np.zeros(len(big), np.int64)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    grpcutil.wait_healthy(grpcutil.make_channel(s.addresses["gateway"]), timeout=5)


def test_unknown_ids_everywhere(stack):
    s, task, gw = stack
    for call, req in ((gw.GetSubmission, gateway_pb2.GetSubmissionRequest(submission_id="s-missing")),
                      (gw.GetRound, gateway_pb2.GetRoundRequest(round_id="r-missing")),
                      (gw.GetScores, gateway_pb2.GetScoresRequest(task_id="t-missing"))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        gw.GetRound(gateway_pb2.GetRoundRequest(round_id="a/../../b"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_huge_dimensions_of_an_empty_tensor_are_refused():
    t = common_pb2.Tensor(shape=[0, 1024, 1024, 2**40], dtype=common_pb2.DTYPE_FLOAT32, data=b"")
    with pytest.raises(InvalidArgument, match="records.x.shape"):
        serde.array_from_tensor(t, field="records.x")
