"""The stream flood of issue 14, measured: another contributor's submit latency while one
contributor holds 70 ``WatchScores`` streams open on the gateway::

    python -m bench.flood                 # 200 submits per scenario, ~30 s
    python -m bench.flood --submits 50    # quicker

Services: the builder registry and the contributor gateway in this process (their real
``create_server``, auth on, the S3-protocol store embedded), on 127.0.0.1 with free ports; a task
whose batch threshold is never reached (no round runs: the figure is the gateway's own).

Scenarios, each on a fresh gateway:

- ``no flood``: alice submits ``--submits`` times, one after the other (``--records`` records each),
  and checks health after each;
- ``flood``: the same while ``mallory`` holds ``--streams`` WatchScores streams (opened first; the
  gateway keeps ``max_streams_per_principal`` of them open and refuses the rest);
- ``flood, before``: the plumbing before the limits (one pool of 64 threads, no limiter: the
  gateway of issue 14), ``--before-submits`` submits with a 2 s deadline each.

Printed: per scenario the streams open / refused, alice's submit p50 / p99 / max in ms (or how many
timed out) and the health check's p99.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent import futures
from typing import Callable

import grpc
import numpy as np

KEY = "f" * 64  # hex: 32 bytes; a throwaway key of this benchmark
SHAPE = [1, 8, 8]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Bench:
    def __init__(self, s3: str) -> None:
        from ftps.common import grpcutil
        from ftps.common.auth import TokenSigner
        from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc
        from services.builder_registry.__main__ import create_server as registry_server
        from services.builder_registry.config import RegistrySettings

        self.signer = TokenSigner(bytes.fromhex(KEY))
        self._n = 0
        self.s3 = s3
        self.registry = registry_server(RegistrySettings(**self._common()))
        self.registry_addr = f"127.0.0.1:{self.registry.start('127.0.0.1:0')}"
        with grpcutil.make_channel(self.registry_addr, token=self.signer.issue("acme", "builder")) as ch:
            self.task_id = registry_pb2_grpc.BuilderRegistryServiceStub(ch).CreateTask(registry_pb2.CreateTaskRequest(
                name="flood", settings=common_pb2.TaskSettings(record_shape=SHAPE, batch_threshold=100_000,
                                                               n_models=4)),
                timeout=30, wait_for_ready=True).task_id

    def _common(self) -> dict:
        self._n += 1  # a bucket per gateway: each scenario starts empty
        return dict(s3_endpoint=self.s3, s3_bucket=f"bench-flood-{self._n}", s3_access_key="ftps",
                    s3_secret_key="ftps-secret-key", auth_key=KEY, auth_disabled=False)

    def gateway(self, before: bool) -> tuple[str, Callable[[], None]]:
        from ftps.common import grpcutil
        from services.contributor_gateway.__main__ import create_server as gateway_server
        from services.contributor_gateway.config import GatewaySettings

        settings = GatewaySettings(**self._common(), registry_addr=self.registry_addr, scorer_addr="127.0.0.1:1",
                                   max_pending_per_contributor=10_000_000)
        if not before:
            server = gateway_server(settings)
            port = server.start("127.0.0.1:0")
            return f"127.0.0.1:{port}", lambda: server.stop(grace=0)
        # Issue 14's gateway: one pool of 64 threads for every call, streams included, no limiter.
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from ftps.common.auth import AuthInterceptor
        from ftps.common.registry_client import registry_getter
        from ftps.common.storage import ObjectStore
        from ftps.v1 import gateway_pb2_grpc
        from services.contributor_gateway.__main__ import ScorerClient
        from services.contributor_gateway.gateway import Gateway
        from services.contributor_gateway.servicer import ContributorGatewayServicer

        security = grpcutil.Security(signer=self.signer)
        store = ObjectStore(settings)
        store.ensure_bucket()
        gw = Gateway(store, registry_getter(security.channel(self.registry_addr)),
                     ScorerClient(security.channel("127.0.0.1:1")), max_pending_per_contributor=10_000_000)
        raw = grpc.server(futures.ThreadPoolExecutor(max_workers=64), interceptors=[AuthInterceptor(self.signer)])
        hs = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(hs, raw)
        gateway_pb2_grpc.add_ContributorGatewayServiceServicer_to_server(ContributorGatewayServicer(gw), raw)
        port = raw.add_insecure_port("127.0.0.1:0")
        raw.start()
        hs.set("", health_pb2.HealthCheckResponse.SERVING)

        def stop() -> None:
            raw.stop(0).wait()
            gw.close()
        return f"127.0.0.1:{port}", stop

    def run(self, name: str, *, streams: int, submits: int, records: int, before: bool = False,
            timeout: float = 30.0) -> dict:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from clients.api import ContributorClient
        from ftps.common import grpcutil
        from ftps.v1 import gateway_pb2, gateway_pb2_grpc

        addr, stop = self.gateway(before)
        flood = grpcutil.make_channel(addr, token=self.signer.issue("mallory", "contributor"))
        alice = ContributorClient(gateway=addr, token=self.signer.issue("alice", "contributor"))
        probe = grpc.insecure_channel(addr)
        try:
            grpcutil.wait_healthy(probe, timeout=30)
            alice.submit(self.task_id, *self._records(records, 0))  # warm: channel, task cache
            stub = gateway_pb2_grpc.ContributorGatewayServiceStub(flood)
            calls = [stub.WatchScores(gateway_pb2.WatchScoresRequest(task_id=self.task_id), timeout=600)
                     for _ in range(streams)]
            time.sleep(1.0 if streams else 0)  # every stream opened or refused
            refused = sum(c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in calls)
            submit_ms, health_ms, failed, last_error = [], [], 0, ""
            health_stub = health_pb2_grpc.HealthStub(probe)
            for i in range(submits):
                t0 = time.perf_counter()
                try:
                    alice.stub.SubmitRecords(gateway_pb2.SubmitRecordsRequest(
                        task_id=self.task_id, records=_records_proto(*self._records(records, i + 1))), timeout=timeout)
                    submit_ms.append((time.perf_counter() - t0) * 1000)
                except grpc.RpcError as exc:
                    failed += 1
                    last_error = exc.code().name
                t0 = time.perf_counter()
                try:
                    health_stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                    health_ms.append((time.perf_counter() - t0) * 1000)
                except grpc.RpcError:
                    pass
            for c in calls:
                c.cancel()
        finally:
            for ch in (flood, probe):
                ch.close()
            alice.close()
            stop()
        return {"scenario": name, "streams": streams, "open": streams - refused, "refused": refused,
                "submits": submits, "failed": failed, "error": last_error,
                "p50_ms": _percentile(submit_ms, 50), "p99_ms": _percentile(submit_ms, 99),
                "max_ms": max(submit_ms, default=float("nan")), "health_ok": len(health_ms),
                "health_p99_ms": _percentile(health_ms, 99)}

    @staticmethod
    def _records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 10, n)

    def close(self) -> None:
        self.registry.stop(grace=0)


def _records_proto(x: np.ndarray, y: np.ndarray):
    from ftps.common import serde
    from ftps.v1 import common_pb2

    return common_pb2.Records(x=serde.tensor_from_array(x), y=serde.tensor_from_array(y.astype(np.int64)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n")[0])
    p.add_argument("--submits", type=int, default=200, help="alice's submits per scenario (200)")
    p.add_argument("--streams", type=int, default=70, help="mallory's WatchScores streams (70)")
    p.add_argument("--records", type=int, default=4, help="records per submit (4)")
    p.add_argument("--before-submits", type=int, default=3,
                   help="submits against the gateway without limits, 2 s deadline each (3; 0: skip)")
    args = p.parse_args(argv)
    if args.submits < 1 or args.streams < 0 or args.records < 1 or args.before_submits < 0:
        p.error("--submits and --records must be >= 1, --streams and --before-submits >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    from ftps.common.embedded_s3 import EmbeddedS3

    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the refusals' warnings are the point, not news
    s3 = EmbeddedS3("127.0.0.1", 0)
    bench = Bench(s3.start())
    try:
        rows = [bench.run("no flood", streams=0, submits=args.submits, records=args.records),
                bench.run("flood", streams=args.streams, submits=args.submits, records=args.records)]
        if args.before_submits:
            rows.append(bench.run("flood, before", streams=args.streams, submits=args.before_submits,
                                  records=args.records, before=True, timeout=2.0))
    finally:
        bench.close()
        s3.stop()
    print(f"{'scenario':<15} {'streams':>7} {'open':>5} {'refused':>7} {'submits':>7} {'failed':>6} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'health ok':>9} {'health p99':>10}")
    for r in rows:
        print(f"{r['scenario']:<15} {r['streams']:>7} {r['open']:>5} {r['refused']:>7} {r['submits']:>7} "
              f"{r['failed']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} "
              f"{r['health_ok']:>9} {r['health_p99_ms']:>10.1f}" + (f"  ({r['error']})" if r["error"] else ""))
    ratio = rows[1]["p99_ms"] / rows[0]["p99_ms"]
    print(f"alice's submit p99 with the flood / without: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
