"""Structured errors: every status a service answers carries google.rpc.ErrorInfo (a stable reason
from ftps.common.errors.REASONS, domain ftps.v1), BadRequest naming the field at fault, RetryInfo
where retrying helps; relayed statuses keep their reason; the README's table is REASONS'."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.api import ContributorClient, describe_rpc_error
from ftps.common import errors, grpcutil, rpc_status, serde
from ftps.common.errors import REASONS
from ftps.common.rpc_status import error_details
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.stacks import builder, embedded_stack

ROOT = Path(__file__).resolve().parent.parent
SHAPE = [1, 8, 8]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = embedded_stack(tmp_path_factory.mktemp("data"))
    signer = s.signer()
    yield dict(s.addresses, builder=signer.issue("acme", "builder"), admin=signer.issue("root", "admin"),
               mallory=signer.issue("mallory", "contributor"), alice=signer.issue("alice", "contributor"))
    s.stop()


@pytest.fixture(scope="module")
def task_id(stack) -> str:
    """A task without uploads (records can be submitted to it; it cannot be scored)."""
    b = builder(stack, stack["builder"])
    try:
        return b.create_task("errors", common_pb2.TaskSettings(record_shape=SHAPE, num_classes=10, n_models=4,
                                                               batch_threshold=100)).task_id
    finally:
        b.close()


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_non_finite_records_name_their_reason_and_field(stack, task_id):
    raw = gateway_pb2_grpc.ContributorGatewayServiceStub(grpcutil.make_channel(stack["gateway"],
                                                                               token=stack["mallory"]))
    x = np.zeros((4, *SHAPE), dtype=np.float64)
    x[2, 0, 3, 4] = 1e39  # finite as float64, +inf as float32
    y = np.zeros(4, dtype=np.int64)
    exc = _refused(lambda: raw.SubmitRecords(gateway_pb2.SubmitRecordsRequest(
        task_id=task_id, records=common_pb2.Records(x=serde.tensor_from_array(x), y=serde.tensor_from_array(y))),
        timeout=30))
    # The plain code and message, as every client saw them before.
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.details() == "records.x[2, 0, 3, 4] = 1e+39 is not finite as float32 (1 non-finite value(s))"
    info = error_details(exc)
    assert (info.reason, info.domain) == ("RECORDS_NOT_FINITE", "ftps.v1")
    assert info.field_violations == [("records.x", exc.details())]
    assert info.retry_after_s is None
    assert describe_rpc_error(exc) == ("INVALID_ARGUMENT [RECORDS_NOT_FINITE]: records.x[2, 0, 3, 4] = 1e+39 "
                                       "is not finite as float32 (1 non-finite value(s))")
    bad_y = np.full(4, 10, dtype=np.int64)
    mallory = ContributorClient(gateway=stack["gateway"], token=stack["mallory"])
    try:
        exc = _refused(lambda: mallory.submit(task_id, np.zeros((4, *SHAPE), np.float32), bad_y))
    finally:
        mallory.close()
    assert error_details(exc).reason == "LABEL_OUT_OF_RANGE"
    assert error_details(exc).field_violations[0][0] == "records.y"


def test_unknown_task_is_task_not_found_also_when_relayed(stack):
    b = builder(stack, stack["admin"])
    try:
        exc = _refused(lambda: b.get_task("t-doesnotexist"))  # the registry's own answer
    finally:
        b.close()
    assert exc.code() == grpc.StatusCode.NOT_FOUND and exc.details() == "task t-doesnotexist not found"
    info = error_details(exc)
    assert (info.reason, info.domain) == ("TASK_NOT_FOUND", "ftps.v1")
    assert info.field_violations == [("task_id", exc.details())]
    # The gateway asks the registry: the same reason reaches the gateway's caller.
    admin = ContributorClient(gateway=stack["gateway"], token=stack["admin"], contributor="bob")
    try:
        exc = _refused(lambda: admin.submit("t-doesnotexist", np.zeros((2, *SHAPE), np.float32),
                                            np.zeros(2, np.int64)))
    finally:
        admin.close()
    assert exc.code() == grpc.StatusCode.NOT_FOUND and error_details(exc).reason == "TASK_NOT_FOUND"


def test_a_scorer_reason_reaches_the_gateway_caller_unchanged(stack, task_id):
    alice = ContributorClient(gateway=stack["gateway"], token=stack["alice"])
    try:
        alice.submit(task_id, np.zeros((4, *SHAPE), np.float32), np.arange(4, dtype=np.int64))
    finally:
        alice.close()
    b = builder(stack, stack["builder"])
    try:
        # The gateway hands the round to the scorer, which refuses a task without its uploads.
        exc = _refused(lambda: b.start_round(task_id, force=True))
    finally:
        b.close()
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "missing uploads" in exc.details()
    assert error_details(exc).reason == "TASK_NOT_READY"
    assert describe_rpc_error(exc).startswith("FAILED_PRECONDITION [TASK_NOT_READY]: task ")


def test_too_many_streams_carries_retry_info(stack, task_id):
    channel = grpcutil.make_channel(stack["gateway"], token=stack["mallory"])
    stub = gateway_pb2_grpc.ContributorGatewayServiceStub(channel)
    try:
        calls = [stub.WatchScores(gateway_pb2.WatchScoresRequest(task_id=task_id), timeout=30) for _ in range(12)]
        deadline = time.monotonic() + 20
        while sum(c.done() for c in calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [c for c in calls if c.done()]
        assert len(refused) == 4  # 8 streams per caller (the default), the rest refused at once
        info = error_details(refused[0])
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (info.reason, info.domain) == ("STREAMS_EXHAUSTED", "ftps.v1")
        assert info.retry_after_s is not None and info.retry_after_s >= 1
        assert rpc_status.retry_after(refused[0]) == info.retry_after_s
        assert "too many open streams" in refused[0].details()
    finally:
        channel.close()


class _Context:
    """Enough of a grpc.ServicerContext for the ``rpc`` decorator: records the status it aborts with."""

    status: grpc.Status | None = None

    def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise Exception()  # noqa: TRY002 - what grpc raises

    def abort(self, code, message) -> None:  # pragma: no cover - the decorator no longer uses it
        raise AssertionError("plain abort")


class _Call(grpc.RpcError):
    """A failed call as a client sees it, from a status a servicer aborted with."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def _answer(method) -> _Call:
    class Servicer:
        @grpcutil.rpc
        def Call(self, request, context):
            return method()

    ctx = _Context()
    with pytest.raises(Exception):  # noqa: B017 - grpc's bare abort exception
        Servicer().Call(None, ctx)
    return _Call(ctx.status)


def test_internal_names_an_incident_in_message_and_metadata():
    def broken():
        raise RuntimeError("/secret/path leaked")

    call = _answer(broken)
    assert call.code() == grpc.StatusCode.INTERNAL
    incident = re.fullmatch(r"internal error, incident ([0-9a-f]{12})", call.details()).group(1)
    info = error_details(call)
    assert (info.reason, info.domain, info.metadata) == ("INTERNAL", "ftps.v1", {"incident": incident})
    assert "secret" not in str(info)


def test_unavailable_advises_a_retry_and_relays_keep_the_reason():
    call = _answer(lambda: (_ for _ in ()).throw(errors.Unavailable("db unavailable, retry",
                                                                    reason="DATABASE_UNAVAILABLE")))
    info = error_details(call)
    assert (call.code(), info.reason, info.retry_after_s) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE",
                                                             errors.UNAVAILABLE_RETRY_S)
    relayed = rpc_status.from_rpc_error(call, context="db")
    assert (relayed.reason, str(relayed)) == ("UPSTREAM_UNAVAILABLE", errors.UPSTREAM_UNAVAILABLE)
    call = _answer(lambda: (_ for _ in ()).throw(errors.ResourceExhausted(
        "slow down", reason="QUOTA_EXCEEDED", metadata={"pending": 7}, retry_after_s=2.5)))
    relayed = rpc_status.from_rpc_error(call)
    assert isinstance(relayed, errors.ResourceExhausted)
    assert (relayed.reason, relayed.metadata, relayed.retry_after_s) == ("QUOTA_EXCEEDED", {"pending": "7"}, 2.5)


def test_reasons_are_checked_where_they_are_raised():
    assert errors.InvalidArgument("x").reason == "INVALID_ARGUMENT"  # message-only still works
    assert errors.Unauthenticated("x").reason == "TOKEN_INVALID"
    with pytest.raises(ValueError, match="not in"):
        errors.InvalidArgument("x", reason="NO_SUCH_REASON")
    with pytest.raises(ValueError, match="is for NOT_FOUND"):
        errors.InvalidArgument("x", reason="TASK_NOT_FOUND")
    for reason, (code, meaning, retry) in REASONS.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", reason) and code in errors.Code.__members__
        assert errors.Code[code].name in grpc.StatusCode.__members__  # each maps to a gRPC code
        assert meaning and "|" not in meaning and isinstance(retry, bool)
    for cls in errors.BY_CODE.values():
        assert REASONS[cls.reason][0] == cls.code.name


def test_every_reason_in_the_code_is_in_the_table():
    used: dict[str, str] = {}
    for folder in ("ftps", "services", "clients"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in re.finditer(r"""\breason=["']([A-Z_0-9]+)["']""", path.read_text()):
                used.setdefault(match.group(1), str(path.relative_to(ROOT)))
            # Refused(message, retry, "REASON") in the limiter
            for match in re.finditer(r"""Refused\([^()]*(?:\([^()]*\)[^()]*)*,\s*["']([A-Z_0-9]+)["']\)""",
                                     path.read_text()):
                used.setdefault(match.group(1), str(path.relative_to(ROOT)))
    assert {"RECORDS_NOT_FINITE", "TASK_NOT_FOUND", "STREAMS_EXHAUSTED"} <= set(used)
    unknown = {r: where for r, where in used.items() if r not in REASONS}
    assert not unknown, f"reasons raised but not in ftps.common.errors.REASONS: {unknown}"


def test_readme_table_is_the_reasons_table():
    printed = subprocess.run([sys.executable, "-m", "ftps.common.errors", "--markdown"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    assert printed == errors.markdown_table()
    readme = (ROOT / "README.md").read_text()
    assert printed in readme, "README's errors table drifted: paste `python -m ftps.common.errors --markdown`"
    for reason in REASONS:
        assert f"| `{reason}` |" in readme
