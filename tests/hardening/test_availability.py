"""Availability: while one contributor floods streams and submits poison records and a hostile
builder uploads a decompression bomb, another contributor's round completes with exactly the scores
it gets without the attack, and every service answers its health check throughout."""

from __future__ import annotations

import io
import threading
import time
import zipfile

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.api import ContributorClient
from ftps.common import archives, grpcutil, serde
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import digits_records
from tests.stacks import builder, embedded_stack, force_round

SHAPE = [1, 8, 8]
SERVICES = ("gateway", "registry", "scorer", "worker")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = embedded_stack(tmp_path_factory.mktemp("data"))
    signer = s.signer()
    yield dict(s.addresses, acme=signer.issue("acme", "builder"), eve=signer.issue("eve", "builder"),
               alice=signer.issue("alice", "contributor"), mallory=signer.issue("mallory", "contributor"))
    s.stop()


def _builder(stack, who: str = "acme"):
    return builder(stack, stack[who])


def zip_bomb(expanded: int) -> bytes:
    """An npz whose x.npy declares and holds ``expanded`` bytes of zeros, deflated to ~1/1000."""
    buf = io.BytesIO()
    n = expanded // 4 // 64
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (n, 1, 8, 8)})
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            chunk = bytes(1 << 20)
            for _ in range(expanded // len(chunk)):
                f.write(chunk)
        y = io.BytesIO()
        np.save(y, np.zeros(n, np.int64))
        zf.writestr("y.npy", y.getvalue())
    return buf.getvalue()


class HealthWatch:
    """Polls every service's health check until stopped; records every answer that was not SERVING."""

    def __init__(self, stack) -> None:
        self._channels = {s: grpcutil.make_channel(stack[s]) for s in SERVICES}
        self.bad: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, ch in self._channels.items():
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        self.bad.append(f"{name}: {status}")
                except grpc.RpcError as exc:
                    self.bad.append(f"{name}: {exc.code().name}")
                self.checks += 1
            self._stop.wait(0.2)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for ch in self._channels.values():
            ch.close()


def _round(stack, task_id: str) -> tuple[common_pb2.RoundStatus, list[common_pb2.RecordScore]]:
    return force_round(stack, stack["acme"], task_id)


def test_one_hostile_contributor_and_builder_cannot_stop_the_others(stack, digits_splits, digits_strategy,
                                                                     digits_base_weights):
    b = _builder(stack)
    # No value range, so a huge finite record passes the edge and must be isolated in the round.
    task = b.create_task("victim", common_pb2.TaskSettings(record_shape=SHAPE, n_models=8, batch_threshold=1000,
                                                            models_per_job=4, seed=3)).task_id
    b.upload(task, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    b.upload(task, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    b.upload(task, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
    b.close()
    alice = ContributorClient(gateway=stack["gateway"], token=stack["alice"])
    x, y = digits_records(digits_splits, 16, seed=4)
    alice.submit(task, x, y)
    status, quiet = _round(stack, task)
    assert status.state == common_pb2.ROUND_STATE_DONE, status.message

    mallory_ch = grpcutil.make_channel(stack["gateway"], token=stack["mallory"])
    mallory = gateway_pb2_grpc.ContributorGatewayServiceStub(mallory_ch)
    with HealthWatch(stack) as health:
        # 1. Seventy WatchScores streams from one token: a few are held, the rest refused at once.
        streams = []
        for _ in range(70):
            call = mallory.WatchScores(gateway_pb2.WatchScoresRequest(task_id=task, contributor="mallory"))
            streams.append(call)
        deadline = time.time() + 10  # refusals come at once; the admitted streams stay open, silent
        while sum(c.done() for c in streams) < 62 and time.time() < deadline:
            time.sleep(0.05)
        refused = sum(c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in streams)
        # 2. Poison: +inf as float32 is refused at the edge; a huge finite record gets in.
        big = x[:2].astype(np.float64)
        big[0, 0, 0, 0] = 1e39
        with pytest.raises(grpc.RpcError) as e:
            mallory.SubmitRecords(gateway_pb2.SubmitRecordsRequest(task_id=task, records=common_pb2.Records(
                x=serde.tensor_from_array(big), y=serde.tensor_from_array(y[:2]))), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        poison = np.full((1, *SHAPE), 3e38, np.float32)
        sub = mallory.SubmitRecords(gateway_pb2.SubmitRecordsRequest(task_id=task, records=common_pb2.Records(
            x=serde.tensor_from_array(poison), y=serde.tensor_from_array(np.array([1])))), timeout=30)
        # 3. A builder's decompression bomb (1 MB expanding to 1 GiB) at the registry, to its own task.
        eve = _builder(stack, "eve")
        own = eve.create_task("bomb", common_pb2.TaskSettings(record_shape=SHAPE)).task_id
        with pytest.raises(grpc.RpcError) as e:
            eve.upload(own, common_pb2.BLOB_KIND_BUILDER_DATA, zip_bomb(1 << 30))
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        eve.close()
        # Meanwhile alice submits the same records again and her round completes.
        t0 = time.perf_counter()
        mine = alice.submit(task, x, y)
        submit_s = time.perf_counter() - t0
        status, attacked = _round(stack, task)
        for call in streams:
            call.cancel()
    assert refused == 62, f"{refused} of 70 streams were refused, not the 62 beyond the first 8"
    assert status.state == common_pb2.ROUND_STATE_DONE, status.message
    # The poison record was left out; alice's records are scored exactly as without the attack.
    assert [s.record_id for s in attacked] == list(mine.record_ids)
    assert [s.score for s in attacked] == [s.score for s in quiet]
    assert [s.counted_p for s in attacked] == [s.counted_p for s in quiet]
    got = gateway_pb2_grpc.ContributorGatewayServiceStub(mallory_ch).GetSubmission(
        gateway_pb2.GetSubmissionRequest(submission_id=sub.submission_id), timeout=10)
    assert got.state == gateway_pb2.SUBMISSION_STATE_FAILED and "left out" in got.failure_reason
    assert health.checks > 0 and health.bad == []
    assert submit_s < 5
    mallory_ch.close()
    alice.close()
