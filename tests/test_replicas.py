"""Replicas as separate processes against one PostgreSQL server: two gateways and two scorers
(``python -m services.X``, as the pods run them), a registry and a worker, real fine-tuning on
digits. Contributors submit concurrently through both gateways; one gateway and one scorer are
killed with SIGKILL along the way. Every acknowledged record is scored exactly once, and the round
the dead scorer was running is finished by the other one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from clients.api import ContributorClient
from ftps.common import archives, grpcutil, serde
from ftps.common.auth import TokenSigner
from ftps.common.storage import file_url
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from tests.conftest import digits_records
from tests.stacks import builder

ROOT = Path(__file__).resolve().parents[1]
KEY = "ab" * 32
SIGNER = TokenSigner(bytes.fromhex(KEY))
M = 10  # records per round


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, name: str, module: str, env: dict, log_dir: Path) -> None:
        self.name, self.addr = name, f"127.0.0.1:{_port()}"
        self.log = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, stdout=self.log, stderr=self.log,
                                     env=os.environ | env | {"FTPS_LISTEN": self.addr})

    def wait(self, timeout: float = 90) -> None:
        ch = grpcutil.make_channel(self.addr)
        try:
            grpcutil.wait_healthy(ch, timeout=timeout)
        except Exception:
            raise AssertionError(f"{self.name} did not start: {Path(self.log.name).read_text()[-3000:]}") from None
        finally:
            ch.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture
def replicas(pg_server, tmp_path):
    common = {"FTPS_S3_ENDPOINT": file_url(tmp_path / "blobs"), "FTPS_S3_BUCKET": "ftps", "FTPS_AUTH_KEY": KEY,
              "FTPS_TORCH_THREADS": "1", "FTPS_LOG_LEVEL": "INFO"}
    db = {svc: pg_server.create_database() for svc in ("registry", "gateway", "scorer")}
    started: list[Service] = []

    def start(name, module, env):
        s = Service(name, module, common | env, tmp_path)
        started.append(s)
        return s

    try:
        worker = start("worker", "services.finetune_worker", {"FTPS_MAX_CONCURRENT_JOBS": "2"})
        worker.wait()
        registry = start("registry", "services.builder_registry",
                         {"FTPS_DATABASE_URL": db["registry"], "FTPS_WORKER_ADDRS": worker.addr})
        registry.wait()
        scorers = [start(f"scorer-{i}", "services.lira_scorer", {
            "FTPS_DATABASE_URL": db["scorer"], "FTPS_REGISTRY_ADDR": registry.addr,
            "FTPS_WORKER_ADDRS": worker.addr, "FTPS_REPLICA_ID": f"scorer-{i}", "FTPS_ROUND_LEASE_S": "3"})
            for i in range(2)]
        for s in scorers:
            s.wait()
        # Both gateways reach the scorers through one target listing both, as a Service would: a
        # dead scorer is left for the other.
        scorer_target = "ipv4:" + ",".join(s.addr for s in scorers)
        gateways = [start(f"gateway-{i}", "services.contributor_gateway", {
            "FTPS_DATABASE_URL": db["gateway"], "FTPS_REGISTRY_ADDR": registry.addr,
            "FTPS_SCORER_ADDR": scorer_target, "FTPS_RECONCILE_S": "0.5", "FTPS_ROUND_GRACE_S": "5"})
            for i in range(2)]
        for g in gateways:
            g.wait()
        yield (dict(registry=registry.addr, gateway=gateways[0].addr, scorer=scorers[0].addr), gateways,
               scorers, db["scorer"])
    finally:
        for s in reversed(started):
            s.stop()


def test_killed_gateway_and_scorer_lose_no_acknowledged_record(replicas, digits_splits, digits_strategy,
                                                               digits_base_weights):
    addresses, gateways, scorers, scorer_db = replicas
    acme = SIGNER.issue("acme", "builder")
    b = builder(addresses, acme)
    task = b.create_task("replicas", common_pb2.TaskSettings(
        record_shape=[1, 8, 8], n_models=8, batch_threshold=M, models_per_job=2, seed=7,
        value_range=common_pb2.ValueRange(min=0, max=1))).task_id
    b.upload(task, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    b.upload(task, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    b.upload(task, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))

    acknowledged: dict[str, tuple[str, list[str]]] = {}  # submission -> (contributor, record ids)
    unanswered: dict[str, int] = {}  # contributor -> submits that failed on the client's side
    lock = threading.Lock()

    def contributor(i: int) -> None:
        name = f"c{i}"
        # Raw stubs with a short deadline: a submit to the killed gateway fails fast, unacknowledged.
        channels = [grpcutil.make_channel(g.addr, token=SIGNER.issue(name, "contributor")) for g in gateways]
        stubs = [gateway_pb2_grpc.ContributorGatewayServiceStub(ch) for ch in channels]
        for k in range(10):
            x, y = digits_records(digits_splits, 3, seed=100 * i + k)
            try:
                sub = stubs[(i + k) % 2].SubmitRecords(gateway_pb2.SubmitRecordsRequest(
                    task_id=task, idempotency_key=f"{name}-{k}", records=common_pb2.Records(
                        x=serde.tensor_from_array(x), y=serde.tensor_from_array(y))), timeout=5)
            except grpc.RpcError:
                # Not acknowledged (its gateway was killed, or the deadline passed on a loaded
                # machine while the gateway went on to store it): nothing is promised either way.
                with lock:
                    unanswered[name] = unanswered.get(name, 0) + 1
                continue
            with lock:
                acknowledged[sub.submission_id] = (name, list(sub.record_ids))
            time.sleep(0.3)
        for ch in channels:
            ch.close()

    threads = [threading.Thread(target=contributor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Kill gateway-1 once a few submits went through it, and the scorer that holds a round's lease
    # while it runs that round (peeking at the scorer's table); rounds take a second or two, so
    # when the submits are all in before a lease was seen, a forced round gives one.
    engine = sa.create_engine(scorer_db)
    deadline, killed, orphaned, gateway_killed = time.time() + 120, None, [], False
    while time.time() < deadline and killed is None:
        if not gateway_killed and len(acknowledged) >= 6:
            gateways[1].kill()  # mid-submits: its acknowledged records must survive in the database
            gateway_killed = True
        with engine.connect() as conn:
            leases = conn.execute(sa.text("SELECT round_id, lease_owner FROM scorer_rounds "
                                          "WHERE lease_owner IS NOT NULL AND state NOT IN (5, 6)")).all()
        for s in scorers:
            orphaned = [rid for rid, owner in leases if owner.startswith(s.name + "#")]
            if orphaned:
                s.kill()
                killed = s
                break
        if killed is None and not any(t.is_alive() for t in threads):
            try:
                b.start_round(task, force=True)
            except grpc.RpcError:
                pass  # nothing pending, or a round is being claimed
        time.sleep(0.02)
    if not gateway_killed:
        gateways[1].kill()
    for t in threads:
        t.join(120)
    assert killed is not None, "no scorer started a round"
    assert len(acknowledged) >= 12

    # The surviving gateway, with the surviving scorer (which takes the dead one's rounds over once
    # their lease expires): every acknowledged submission ends scored, exactly once.
    survivor = ContributorClient(gateway=gateways[0].addr, token=SIGNER.issue("root", "admin"))
    deadline = time.time() + 240
    while time.time() < deadline:
        states = {sid: survivor.get_submission(sid).state for sid in acknowledged}
        if all(st == gateway_pb2.SUBMISSION_STATE_SCORED for st in states.values()):
            break
        if gateway_pb2.SUBMISSION_STATE_IN_ROUND not in states.values():
            try:  # the rest is below a round's size: score it now
                b.start_round(task, force=True)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        time.sleep(0.5)
    unscored = {sid: (gateway_pb2.SubmissionState.Name(st), sub.round_id, sub.failure_reason)
                for sid in acknowledged if (st := (sub := survivor.get_submission(sid)).state)
                != gateway_pb2.SUBMISSION_STATE_SCORED}
    assert not unscored, f"{len(unscored)} of {len(states)} not scored: {unscored}"
    scores = b.scores(task).scores
    scored = [s.record_id for s in scores]
    assert len(scored) == len(set(scored)), "a record was scored twice"
    promised = {r for _, rids in acknowledged.values() for r in rids}
    assert promised <= set(scored), f"acknowledged but not scored: {sorted(promised - set(scored))}"
    # Anything else scored came from a submit its caller saw fail: at most one submission each.
    extra: dict[str, set[str]] = {}
    for sc in scores:
        if sc.record_id not in promised:
            extra.setdefault(sc.contributor, set()).add(sc.record_id.rsplit("-", 1)[0])
    for who, subs in extra.items():
        assert len(subs) <= unanswered.get(who, 0), (who, subs, unanswered)
    assert all(np.isfinite(s.score) for s in scores)
    with engine.connect() as conn:  # the dead scorer's round was finished by the other one
        rows = conn.execute(sa.text("SELECT state FROM scorer_rounds")).all()
    assert rows and all(r[0] == common_pb2.ROUND_STATE_DONE for r in rows), rows
    engine.dispose()
    # The rounds the dead scorer held, finished by the other, score exactly as the same batch
    # scored from scratch (a new round of the same records: the same seeds, from the batch's content).
    live = [x for x in scorers if x is not killed][0]
    stub = scorer_pb2_grpc.LiraScorerServiceStub(grpcutil.make_channel(live.addr, token=SIGNER.issue("root", "admin")))
    for rid in orphaned:
        taken_over = stub.GetScoringResult(scorer_pb2.GetScoringResultRequest(round_id=rid), timeout=30)
        assert taken_over.status.state == common_pb2.ROUND_STATE_DONE
        again = _fresh_round(stub, taken_over, ingredients=_round_ingredients(scorer_db, rid))
        assert [x.score for x in again.scores] == [x.score for x in taken_over.scores]
        assert [x.counted_p for x in again.scores] == [x.counted_p for x in taken_over.scores]
    survivor.close()
    b.close()


def _round_ingredients(url: str, round_id: str) -> tuple[str, common_pb2.BlobRef, list[str], list[str]]:
    """What the gateway handed the scorer for a round (task, batch, record ids, contributors)."""
    import json

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        task_id, batch, rids, who = conn.execute(sa.text(
            "SELECT task_id, batch_ref, record_ids, contributors FROM scorer_rounds WHERE round_id = :r"),
            {"r": round_id}).one()
    engine.dispose()
    return task_id, common_pb2.BlobRef.FromString(bytes(batch)), json.loads(rids), json.loads(who)


def _fresh_round(stub, old: common_pb2.RoundResult, *, ingredients) -> common_pb2.RoundResult:
    task_id, batch, rids, who = ingredients
    new_id = old.status.round_id + "-again"
    stub.StartScoring(scorer_pb2.StartScoringRequest(task_id=task_id, round_id=new_id, batch=batch,
                                                       record_ids=rids, contributors=who), timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline:
        res = stub.GetScoringResult(scorer_pb2.GetScoringResultRequest(round_id=new_id), timeout=30)
        if res.status.state in (common_pb2.ROUND_STATE_DONE, common_pb2.ROUND_STATE_FAILED):
            assert res.status.state == common_pb2.ROUND_STATE_DONE, res.status.message
            return res
        time.sleep(0.3)
    raise AssertionError("the fresh round did not finish")
