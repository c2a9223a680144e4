"""Who may do what: tokens checked by the one interceptor, cross-tenant access refused, on the
real embedded stack (real services over gRPC)."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest

from clients.api import BuilderClient, ContributorClient
from ftps.common import grpcutil
from ftps.common.auth import Principal, TokenSigner
from ftps.common.errors import Unauthenticated
from stack.embedded import EmbeddedStack
from ftps.v1 import (common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc, scorer_pb2,
                     scorer_pb2_grpc, worker_pb2, worker_pb2_grpc)

KEY = b"k" * 32


def test_token_round_trip_and_refusals():
    s = TokenSigner(KEY)
    tok = s.issue("alice", "contributor", tasks=["t-1"], ttl_s=60)
    assert s.verify(tok) == Principal("alice", "contributor", ("t-1",))
    with pytest.raises(Unauthenticated, match="expired"):
        s.verify(s.issue("alice", "contributor", ttl_s=10, now=time.time() - 20))
    with pytest.raises(Unauthenticated, match="signature"):
        TokenSigner(b"x" * 32).verify(tok)
    body, sig = tok.split(".")
    forged = body.replace(body[:8], body[:7] + ("A" if body[7] != "A" else "B")) + "." + sig
    with pytest.raises(Unauthenticated):
        s.verify(forged)
    for junk in ("", "a.b.c", "%%%.%%%", "x" * 5000):
        with pytest.raises(Unauthenticated):
            s.verify(junk)
    with pytest.raises(ValueError):
        TokenSigner(b"short")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    stack = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                          data_dir=tmp_path_factory.mktemp("data"))
    stack.start()
    signer = stack.signer()
    a = stack.addresses
    tok = {name: signer.issue(name, role) for name, role in
           (("acme", "builder"), ("globex", "builder"), ("alice", "contributor"), ("bob", "contributor"),
            ("root", "admin"))}
    tok["scoped"] = signer.issue("carol", "contributor", tasks=["t-other"])
    acme = BuilderClient(registry=a["registry"], gateway=a["gateway"], scorer=a["scorer"], token=tok["acme"])
    task = acme.create_task("acme task", common_pb2.TaskSettings(record_shape=[1, 8, 8], batch_threshold=100,
                                                                 n_models=4))
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 1, 8, 8), dtype=np.float32), np.arange(3)
    alice = ContributorClient(gateway=a["gateway"], token=tok["alice"])
    sub = alice.submit(task.task_id, x, y)
    yield dict(addr=a, tok=tok, task=task, sub=sub, x=x, y=y, signer=signer)
    stack.stop()


def _stubs(env, who):
    a = env["addr"]
    token = env["tok"][who] if who else None
    mk = lambda t: grpcutil.make_channel(t, token=token)  # noqa: E731
    return (registry_pb2_grpc.BuilderRegistryServiceStub(mk(a["registry"])),
            gateway_pb2_grpc.ContributorGatewayServiceStub(mk(a["gateway"])),
            scorer_pb2_grpc.LiraScorerServiceStub(mk(a["scorer"])),
            worker_pb2_grpc.FinetuneWorkerServiceStub(mk(a["worker"])))


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_missing_expired_and_forged_tokens_are_unauthenticated_and_logged(env, caplog):
    caplog.set_level(logging.WARNING, logger="ftps.auth")
    reg, gw, sc, wk = _stubs(env, None)
    U = grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: reg.ListTasks(registry_pb2.ListTasksRequest(), timeout=5)) == U
    assert _code(lambda: gw.GetScores(gateway_pb2.GetScoresRequest(task_id=env["task"].task_id), timeout=5)) == U
    assert _code(lambda: sc.GetPreparation(scorer_pb2.GetPreparationRequest(task_id=env["task"].task_id),
                                           timeout=5)) == U
    assert _code(lambda: list(sc.WatchPreparation(scorer_pb2.WatchPreparationRequest(task_id=env["task"].task_id),
                                                  timeout=5))) == U
    assert _code(lambda: wk.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)) == U
    a = env["addr"]
    expired = env["signer"].issue("alice", "contributor", ttl_s=1, now=time.time() - 10)
    forged = TokenSigner(b"z" * 32).issue("root", "admin")
    for bad in (expired, forged, "garbage"):
        stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(a["registry"], token=bad))
        assert _code(lambda: stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=5)) == U
    assert any("refused" in r.message for r in caplog.records)
    # Health checks need no token (probes).
    grpcutil.wait_healthy(grpcutil.make_channel(a["gateway"]), timeout=5)


def test_contributors_never_see_each_other(env):
    _, gw_bob, _, _ = _stubs(env, "bob")
    D = grpc.StatusCode.PERMISSION_DENIED
    t = env["task"].task_id
    assert _code(lambda: gw_bob.GetSubmission(gateway_pb2.GetSubmissionRequest(
        submission_id=env["sub"].submission_id), timeout=5)) == D
    # ... and a made-up id gets the same answer: nothing tells bob what exists.
    assert _code(lambda: gw_bob.GetSubmission(gateway_pb2.GetSubmissionRequest(submission_id="s-0000"),
                                              timeout=5)) == D
    assert _code(lambda: gw_bob.GetScores(gateway_pb2.GetScoresRequest(task_id=t, contributor="alice"),
                                          timeout=5)) == D
    assert _code(lambda: next(iter(gw_bob.WatchScores(gateway_pb2.WatchScoresRequest(task_id=t, contributor="alice"),
                                                      timeout=5)))) == D
    rec = gateway_pb2.SubmitRecordsRequest(task_id=t, contributor="alice")
    rec.records.x.CopyFrom(__import__("ftps.common.serde", fromlist=["x"]).tensor_from_array(env["x"]))
    rec.records.y.CopyFrom(__import__("ftps.common.serde", fromlist=["x"]).tensor_from_array(env["y"]))
    assert _code(lambda: gw_bob.SubmitRecords(rec, timeout=5)) == D  # bob posing as alice
    # Alice reads her own.
    _, gw_alice, _, _ = _stubs(env, "alice")
    assert gw_alice.GetSubmission(gateway_pb2.GetSubmissionRequest(submission_id=env["sub"].submission_id),
                                  timeout=5).contributor == "alice"


def test_contributors_cannot_act_as_builders_or_services(env):
    reg, gw, sc, wk = _stubs(env, "alice")
    D = grpc.StatusCode.PERMISSION_DENIED
    t = env["task"].task_id
    assert _code(lambda: reg.CreateTask(registry_pb2.CreateTaskRequest(
        name="x", settings=common_pb2.TaskSettings(record_shape=[1])), timeout=5)) == D
    assert _code(lambda: gw.StartRound(gateway_pb2.StartRoundRequest(task_id=t, force=True), timeout=5)) == D
    assert _code(lambda: sc.StartPreparation(scorer_pb2.StartPreparationRequest(task_id=t), timeout=5)) == D
    assert _code(lambda: sc.GetPreparation(scorer_pb2.GetPreparationRequest(task_id=t), timeout=5)) == D
    assert _code(lambda: list(sc.WatchPreparation(scorer_pb2.WatchPreparationRequest(task_id=t), timeout=5))) == D
    assert _code(lambda: sc.StartScoring(scorer_pb2.StartScoringRequest(task_id=t, round_id="r-x"), timeout=5)) == D
    assert _code(lambda: wk.RunJob(worker_pb2.RunJobRequest(job=worker_pb2.FinetuneJob(job_id="j")), timeout=5)) == D
    assert _code(lambda: wk.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)) == D


def test_builders_only_touch_their_own_tasks(env):
    reg, gw, sc, _ = _stubs(env, "globex")
    D = grpc.StatusCode.PERMISSION_DENIED
    t = env["task"].task_id
    assert _code(lambda: reg.GetTask(registry_pb2.GetTaskRequest(task_id=t), timeout=5)) == D
    assert _code(lambda: reg.GetTask(registry_pb2.GetTaskRequest(task_id="t-doesnotexist"), timeout=5)) == D
    assert _code(lambda: gw.GetScores(gateway_pb2.GetScoresRequest(task_id=t), timeout=5)) == D
    assert _code(lambda: gw.StartRound(gateway_pb2.StartRoundRequest(task_id=t, force=True), timeout=5)) == D
    assert t not in [x.task_id for x in reg.ListTasks(registry_pb2.ListTasksRequest(), timeout=5).tasks]
    BuilderClient(registry=env["addr"]["registry"], gateway=env["addr"]["gateway"], scorer=env["addr"]["scorer"],
                  token=env["tok"]["acme"]).get_task(t)  # its owner may
    # The owner may not be forged on creation either.
    assert _code(lambda: reg.CreateTask(registry_pb2.CreateTaskRequest(
        name="x", owner="acme", settings=common_pb2.TaskSettings(record_shape=[1])), timeout=5)) == D
    assert reg.CreateTask(registry_pb2.CreateTaskRequest(name="mine", settings=common_pb2.TaskSettings(
        record_shape=[1])), timeout=5).owner == "globex"


def test_scoped_contributor_stays_in_scope_and_admin_sees_all(env):
    _, gw, _, _ = _stubs(env, "scoped")
    c = ContributorClient(gateway=env["addr"]["gateway"], token=env["tok"]["scoped"])
    with pytest.raises(grpc.RpcError) as e:
        c.submit(env["task"].task_id, env["x"], env["y"])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reg, gw_admin, _, wk = _stubs(env, "root")
    assert env["task"].task_id in [t.task_id for t in reg.ListTasks(registry_pb2.ListTasksRequest(), timeout=5).tasks]
    assert wk.GetInfo(worker_pb2.GetInfoRequest(), timeout=5).device
