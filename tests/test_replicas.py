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
from ftps.common import grpcutil, serde
from ftps.common.auth import TokenSigner
from ftps.common.storage import file_url
from ftps.v1 import common_pb2, gateway_pb2
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
        record_shape=[1, 8, 8], n_models=4, batch_threshold=M, models_per_job=2, seed=7,
        value_range=common_pb2.ValueRange(min=0, max=1))).task_id
    b.upload(task, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    b.upload(task, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    b.upload(task, common_pb2.BLOB_KIND_BUILDER_DATA, serde.records_to_npz(*digits_splits["builder"]))

    acknowledged: dict[str, tuple[str, list[str]]] = {}  # submission -> (contributor, record ids)
    lock = threading.Lock()

    def contributor(i: int) -> None:
        name = f"c{i}"
        clients = [ContributorClient(gateway=g.addr, token=SIGNER.issue(name, "contributor")) for g in gateways]
        for k in range(6):
            x, y = digits_records(digits_splits, 3, seed=100 * i + k)
            try:
                sub = clients[(i + k) % 2].submit(task, x, y, idempotency_key=f"{name}-{k}")
            except grpc.RpcError:
                continue  # not acknowledged (its gateway was killed): nothing is promised
            with lock:
                acknowledged[sub.submission_id] = (name, list(sub.record_ids))
            time.sleep(0.2)
        for c in clients:
            c.close()

    threads = [threading.Thread(target=contributor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    gateways[1].kill()  # mid-submits: its acknowledged records must survive in the database
    # Kill the scorer that holds a round's lease while it runs it (peeking at the scorer's table).
    engine = sa.create_engine(scorer_db)
    deadline, killed = time.time() + 90, None
    while time.time() < deadline and killed is None:
        with engine.connect() as conn:
            owners = [r[0] for r in conn.execute(sa.text(
                "SELECT lease_owner FROM scorer_rounds WHERE lease_owner IS NOT NULL AND state NOT IN (5, 6)"))]
        for s in scorers:
            if any(o.startswith(s.name + "#") for o in owners):
                s.kill()
                killed = s
                break
        time.sleep(0.05)
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
    assert all(st == gateway_pb2.SUBMISSION_STATE_SCORED for st in states.values()), states
    scores = b.scores(task).scores
    scored = [s.record_id for s in scores]
    assert len(scored) == len(set(scored)), "a record was scored twice"
    assert set(scored) == {r for _, rids in acknowledged.values() for r in rids}
    assert all(np.isfinite(s.model_score) for s in scores)
    with engine.connect() as conn:  # the dead scorer's round was finished by the other one
        rows = conn.execute(sa.text("SELECT state FROM scorer_rounds")).all()
    assert rows and all(r[0] == common_pb2.ROUND_STATE_DONE for r in rows), rows
    engine.dispose()
    survivor.close()
    b.close()
