"""Bounded work per caller, through real servers on 127.0.0.1:0 with auth on: one contributor's
stream flood is capped (RESOURCE_EXHAUSTED with retry advice) while another contributor's submits
and the health check answer at once; the service's concurrent-RPC cap refuses at once; idle and
old streams are ended by the server (OK + ``ftps-stream-end``) and ``clients.api`` re-watches."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.api import ContributorClient
from ftps.common import grpcutil, limits
from ftps.common.auth import TokenSigner
from ftps.common.rpc_status import error_details
from ftps.common.limits import Limits, retry_after
from ftps.common.registry_client import registry_getter
from ftps.common.storage import ObjectStore
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.contributor_gateway.__main__ import create_server as gateway_server
from services.contributor_gateway.config import GatewaySettings
from services.contributor_gateway.gateway import Gateway
from services.contributor_gateway.servicer import ContributorGatewayServicer
from tests.test_gateway_service import ScriptedScorer

KEY = "f" * 64  # hex: 32 bytes
SIGNER = TokenSigner(bytes.fromhex(KEY))
SHAPE = [1, 4, 4]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _keyed(storage_kwargs: dict) -> dict:
    """Settings fields of a service that checks tokens signed with KEY."""
    return dict(storage_kwargs, auth_key=KEY, auth_disabled=False)


def _records(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 10, n)


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _health(addr: str, timeout: float = 1.0) -> int:
    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


@pytest.fixture
def registry(storage_kwargs, serve):
    """(registry address, a task taking records of SHAPE that never starts a round by itself)."""
    addr = serve(registry_server(RegistrySettings(**_keyed(storage_kwargs))))
    builder = grpcutil.make_channel(addr, token=SIGNER.issue("acme", "builder"))
    from ftps.v1 import registry_pb2_grpc

    task = registry_pb2_grpc.BuilderRegistryServiceStub(builder).CreateTask(registry_pb2.CreateTaskRequest(
        name="floods", settings=common_pb2.TaskSettings(record_shape=SHAPE, batch_threshold=100_000, n_models=4)),
        timeout=10)
    yield addr, task
    builder.close()


def _flood(addr: str, task_id: str, n: int, who: str = "mallory") -> tuple[grpc.Channel, list]:
    channel = grpcutil.make_channel(addr, token=SIGNER.issue(who, "contributor"))
    stub = gateway_pb2_grpc.ContributorGatewayServiceStub(channel)
    req = gateway_pb2.WatchScoresRequest(task_id=task_id)
    return channel, [stub.WatchScores(req, timeout=30) for _ in range(n)]


def test_stream_flood_is_capped_per_contributor_and_the_others_are_served(storage_kwargs, registry, serve):
    """The issue's attack on the real gateway (create_server, settings from the environment's
    fields): 70 WatchScores streams from one token. 8 stay open, 62 are refused with retry advice;
    another contributor submits and watches at once, and health answers SERVING."""
    reg_addr, task = registry
    server = gateway_server(GatewaySettings(**_keyed(storage_kwargs), registry_addr=reg_addr,
                                            scorer_addr="127.0.0.1:1", max_streams_per_principal=8))
    addr = serve(server)
    flood_ch, calls = _flood(addr, task.task_id, 70)
    try:
        _until(lambda: sum(c.done() for c in calls) == 62 and server.limiter.stats()["open_streams"] == 8)
        refused = [c for c in calls if c.done()]
        assert {c.code() for c in refused} == {EXHAUSTED}
        details = refused[0].details()
        assert "contributor 'mallory' has 8 open" in details and "at most 8" in details and "retry in" in details
        advice = retry_after(refused[0])
        assert advice is not None and 1 <= advice <= 300  # the first stream's idle end, at the latest
        assert all(c.is_active() for c in calls if not c.done())  # the first 8 stay open

        alice = ContributorClient(gateway=addr, token=SIGNER.issue("alice", "contributor"))
        t0 = time.perf_counter()
        sub = alice.submit(task.task_id, *_records(3))
        assert time.perf_counter() - t0 < 2.0 and len(sub.record_ids) == 3
        assert _health(addr) == health_pb2.HealthCheckResponse.SERVING
        mine = alice.watch_scores(task.task_id, timeout=0.5)  # alice's own streams are hers
        with pytest.raises(grpc.RpcError) as e:
            list(mine)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        alice.close()
    finally:
        flood_ch.close()
    _until(lambda: server.limiter.stats()["open_streams"] == 0)  # closing the flood frees its slots


def _scripted_gateway(storage_kwargs, reg_addr, serve, lim: Limits):
    """A gateway with auth and ``lim`` on the shared plumbing, and a scorer that finishes rounds at once."""
    security = grpcutil.Security(signer=SIGNER)
    gw = Gateway(ObjectStore(GatewaySettings(**storage_kwargs)), registry_getter(security.channel(reg_addr)),
                 ScriptedScorer())
    server = security.server(limits=lim)
    server.add(gateway_pb2_grpc.add_ContributorGatewayServiceServicer_to_server, ContributorGatewayServicer(gw),
               "ftps.v1.ContributorGatewayService")
    server.on_stop(gw.close)
    return server, serve(server), gw


def test_concurrent_rpc_cap_refuses_at_once_and_health_still_answers(storage_kwargs, registry, serve):
    reg_addr, task = registry
    server, addr, _ = _scripted_gateway(storage_kwargs, reg_addr, serve,
                                        Limits(max_concurrent_rpcs=4, max_streams_per_principal=2))
    channels = []
    try:
        for who in ("m1", "m2"):  # two contributors, two streams each: the service is full
            ch, calls = _flood(addr, task.task_id, 2, who)
            channels.append((ch, calls))
        _until(lambda: server.limiter.stats()["active_rpcs"] == 4)
        alice = ContributorClient(gateway=addr, token=SIGNER.issue("alice", "contributor"))
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            alice.submit(task.task_id, *_records(2))
        assert time.perf_counter() - t0 < 1.0  # refused at once, not queued
        assert e.value.code() == EXHAUSTED
        assert e.value.details() == "service busy: 4 calls in progress (at most 4); retry in 1s"
        assert retry_after(e.value) == 1.0
        assert error_details(e.value).reason == "SERVICE_BUSY"
        for _ in range(20):  # health has threads of its own: answered every time, whatever the load
            assert _health(addr, timeout=0.5) == health_pb2.HealthCheckResponse.SERVING
        channels.pop()[0].close()  # two streams end: alice gets in
        _until(lambda: server.limiter.stats()["active_rpcs"] == 2)
        assert len(alice.submit(task.task_id, *_records(2)).record_ids) == 2
        alice.close()
    finally:
        for ch, _ in channels:
            ch.close()


@pytest.mark.parametrize("idle_s, max_s, reason", [(1.0, 0.0, "idle"), (0.0, 1.5, "max-lifetime")])
def test_the_server_ends_idle_and_old_streams_with_ok_and_a_reason(storage_kwargs, registry, serve,
                                                                   idle_s, max_s, reason):
    reg_addr, task = registry
    server, addr, _ = _scripted_gateway(storage_kwargs, reg_addr, serve,
                                        Limits(stream_idle_s=idle_s, stream_max_s=max_s))
    ch, (call,) = _flood(addr, task.task_id, 1, "alice")
    t0 = time.perf_counter()
    assert list(call) == []  # ends by itself, without an error
    took = time.perf_counter() - t0
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.trailing_metadata())[limits.STREAM_END_KEY] == reason
    assert (idle_s or max_s) <= took < (idle_s or max_s) + 2.0  # the handler polls every second
    _until(lambda: server.limiter.stats()[f"ended_{reason.replace('-', '_')}_total"] == 1)
    ch.close()


def test_clients_reconnect_when_the_server_ends_a_stream(storage_kwargs, registry, serve):
    """WatchScores with a 1 s idle limit: the client library re-watches, gives each score once,
    and gets the scores of a round that finishes between two streams."""
    reg_addr, task = registry
    server, addr, _ = _scripted_gateway(storage_kwargs, reg_addr, serve, Limits(stream_idle_s=1.0))
    alice = ContributorClient(gateway=addr, token=SIGNER.issue("alice", "contributor"))
    bob = ContributorClient(gateway=addr, token=SIGNER.issue("bob", "contributor"))
    builder = grpcutil.make_channel(addr, token=SIGNER.issue("acme", "builder"))
    start = gateway_pb2_grpc.ContributorGatewayServiceStub(builder).StartRound
    first = alice.submit(task.task_id, *_records(3))
    bob.submit(task.task_id, *_records(3, seed=1))
    start(gateway_pb2.StartRoundRequest(task_id=task.task_id, force=True), timeout=5)
    _until(lambda: len(alice.scores(task.task_id)) == 3)

    def second_round():  # after the first stream has been ended for idleness
        _until(lambda: server.limiter.stats()["ended_idle_total"] >= 1)
        second = alice.submit(task.task_id, *_records(3, seed=2))
        start(gateway_pb2.StartRoundRequest(task_id=task.task_id, force=True), timeout=5)
        got_ids.update(second.record_ids)

    got_ids: set[str] = set(first.record_ids)
    later = threading.Thread(target=second_round)
    later.start()
    stream = alice.watch_scores(task.task_id, timeout=4.0)
    seen = []
    with pytest.raises(grpc.RpcError) as e:
        for s in stream:
            seen.append(s.record_id)
    later.join(timeout=5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the caller's deadline, not the server's ends
    assert stream.reopened >= 2 and server.limiter.stats()["ended_idle_total"] >= 2
    assert sorted(seen) == sorted(got_ids) and len(got_ids) == 6  # every score once, both rounds
    for c in (alice, bob):
        c.close()
    builder.close()


def test_a_stream_that_ignores_its_limits_is_cancelled(registry, serve, monkeypatch):
    """Reflection (no token needed, a bidi stream that waits on its client) is capped per address
    and, idle, cancelled after the grace period: it cannot hold the threads health relies on."""
    monkeypatch.setattr(limits, "CANCEL_GRACE_S", 0.5)
    server = grpcutil.Server(limits=Limits(max_streams_per_principal=2, stream_idle_s=0.5))
    addr = serve(server)
    release = threading.Event()

    def requests():  # one request, then silence
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(10)

    ch = grpc.insecure_channel(addr)
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    try:
        calls = [stub.ServerReflectionInfo(requests(), timeout=10) for _ in range(3)]
        _until(lambda: sum(c.done() for c in calls) == 1)
        refused = next(c for c in calls if c.done())
        assert refused.code() == EXHAUSTED and "peer 127.0.0.1 has 2 open" in refused.details()
        t0 = time.perf_counter()
        for call in (c for c in calls if c is not refused):
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        assert time.perf_counter() - t0 < 4.0  # idle 0.5 s, grace 0.5 s, the reaper's 1 s tick
        _until(lambda: server.limiter.stats()["open_streams"] == 0)
    finally:
        release.set()
        ch.close()


class _Context:
    """The parts of a grpc.ServicerContext the limiter uses."""

    def __init__(self) -> None:
        self.cancelled = False

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def is_active(self) -> bool:
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


class _Details:
    method = "/ftps.v1.BuilderRegistryService/UploadBlob"
    invocation_metadata = ()


@pytest.mark.parametrize("stalls", [False, True])
def test_a_client_stream_is_idle_only_while_its_client_owes_messages(monkeypatch, stalls):
    """An upload whose client has sent everything waits on the server (the model check): never
    idle. One whose client stops sending mid-way is cancelled after the idle limit and the grace."""
    monkeypatch.setattr(limits, "CANCEL_GRACE_S", 0.2)
    limiter = limits.RpcLimiter(Limits(stream_idle_s=0.3))

    def chunks():
        yield b"header"
        if stalls:
            time.sleep(1.6)
        yield b"chunk"

    def upload(requests, context):
        n = sum(1 for _ in requests)
        if not stalls:
            time.sleep(1.6)  # the check, past idle + grace + the reaper's tick
        return n

    handler = limiter.intercept_service(lambda _: grpc.stream_unary_rpc_method_handler(upload), _Details())
    context = _Context()
    assert handler.stream_unary(chunks(), context) == 2
    assert context.cancelled == stalls
    assert limiter.stats()["open_streams"] == 0
    limiter.close()
