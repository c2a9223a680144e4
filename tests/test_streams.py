"""Streams that end, through the real embedded stack (auth on, real fine-tuning on digits):
WatchScores for one round ends by itself once the caller's records of it are sent; a builder
watches every record of its task; WatchRound ends with a DONE message that says so."""

from __future__ import annotations

import threading

import grpc
import pytest

from clients.api import ContributorClient
from ftps.common import archives, grpcutil, limits, serde
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import digits_records
from tests.stacks import builder, embedded_stack

SHAPE = [1, 8, 8]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = embedded_stack(tmp_path_factory.mktemp("data"))
    signer = s.signer()
    yield dict(s.addresses, acme=signer.issue("acme", "builder"), eve=signer.issue("eve", "builder"),
               root=signer.issue("root", "admin"), alice=signer.issue("alice", "contributor"),
               bob=signer.issue("bob", "contributor"), mallory=signer.issue("mallory", "contributor"))
    s.stop()


def _stub(stack, who: str):
    ch = grpcutil.make_channel(stack["gateway"], token=stack[who])
    return ch, gateway_pb2_grpc.ContributorGatewayServiceStub(ch)


class Collect(threading.Thread):
    """Iterates a stream in the background: ``got`` its messages, ``error`` what ended it badly."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.got, self.error = stream, [], None
        self.start()

    def run(self) -> None:
        try:
            for m in self.stream:
                self.got.append(m)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_watches_of_one_round_end_by_themselves(stack, digits_splits, digits_strategy, digits_base_weights):
    b = builder(stack, stack["acme"])
    task = b.create_task("streams", common_pb2.TaskSettings(record_shape=SHAPE, n_models=8, batch_threshold=1000,
                                                             models_per_job=4, seed=5)).task_id
    b.upload(task, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    b.upload(task, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    b.upload(task, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
    alice = ContributorClient(gateway=stack["gateway"], token=stack["alice"])
    bob = ContributorClient(gateway=stack["gateway"], token=stack["bob"])
    mine = alice.submit(task, *digits_records(digits_splits, 8, seed=1))
    theirs = bob.submit(task, *digits_records(digits_splits, 8, seed=2))
    status = b.start_round(task, force=True)
    rid = status.round_id

    # Opened while the round runs: each ends by itself once its records are given.
    alice_round = Collect(alice.watch_scores(task, round_id=rid, timeout=300))
    builder_round = Collect(b.watch_scores(task, round_id=rid, timeout=300))
    builder_bob = Collect(b.watch_scores(task, contributor="bob", round_id=rid, timeout=300))
    builder_task = b.watch_scores(task, timeout=300)  # follows the task: never ends by itself
    progress = list(b.watch_round(rid, timeout=300))
    assert progress[-1].state == common_pb2.ROUND_STATE_DONE, progress[-1].message
    assert progress[-1].message.startswith("done") and progress[-1].message != "scoring"
    assert all(p.state not in serde.TERMINAL_ROUND_STATES for p in progress[:-1])
    for t in (alice_round, builder_round, builder_bob):
        t.join(120)
        assert not t.is_alive(), "a one-round watch did not end by itself"
        assert t.error is None, t.error
    assert [s.record_id for s in alice_round.got] == list(mine.record_ids)
    assert sorted(s.record_id for s in builder_round.got) == sorted([*mine.record_ids, *theirs.record_ids])
    assert [s.record_id for s in builder_bob.got] == list(theirs.record_ids)
    # The builder's watch of the whole task (no contributor named) gets every record.
    every = []
    for s in builder_task:
        every.append(s.record_id)
        if len(every) == 16:
            builder_task.cancel()
            break
    assert sorted(every) == sorted([*mine.record_ids, *theirs.record_ids])

    # On the wire: the stream for a round that is over sends the scores and ends OK, without the
    # ftps-stream-end trailer of an early end (so clients know not to watch again).
    ch, stub = _stub(stack, "alice")
    call = stub.WatchScores(gateway_pb2.WatchScoresRequest(task_id=task, round_id=rid), timeout=30)
    assert [s.record_id for s in call] == list(mine.record_ids)
    assert call.code() == grpc.StatusCode.OK
    assert limits.STREAM_END_KEY not in dict(call.trailing_metadata() or ())
    last = list(stub.WatchRound(gateway_pb2.WatchRoundRequest(round_id=rid), timeout=30))[-1]
    assert last.state == common_pb2.ROUND_STATE_DONE and last.message.startswith("done")

    # The same rules as GetRound: nobody sees a round that is not theirs, nor someone else's records.
    def code(who: str, **req) -> grpc.StatusCode:
        ch2, s2 = _stub(stack, who)
        try:
            list(s2.WatchScores(gateway_pb2.WatchScoresRequest(task_id=task, **req), timeout=10))
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()
        finally:
            ch2.close()

    assert code("alice", contributor="bob", round_id=rid) == grpc.StatusCode.PERMISSION_DENIED
    assert code("mallory", round_id=rid) == grpc.StatusCode.PERMISSION_DENIED  # no records in it
    assert code("alice", round_id="r-000000000000") == grpc.StatusCode.PERMISSION_DENIED
    assert code("eve", round_id=rid) == grpc.StatusCode.PERMISSION_DENIED  # not eve's task
    assert code("root", round_id="r-000000000000") == grpc.StatusCode.NOT_FOUND
    assert code("root", round_id=rid) == grpc.StatusCode.OK
    ch.close()
    alice.close()
    bob.close()
    b.close()
