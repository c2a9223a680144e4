"""State at scale: the gateway's start time and submit latency as history grows, and an unrelated
contributor's submit latency while a round starts over thousands of pending submissions.

    python -m bench.state            # 1,000 / 10,000 / 100,000 stored submissions; 5,000-submission round
    python -m bench.state --quick    # 1,000 / 10,000; 1,000-submission round

On SQLite (a file, as the embedded stack) and PostgreSQL (a throwaway local server, tests/pg.py).
Real services: a registry and the gateway as its own process (``python -m
services.contributor_gateway``), the S3-protocol store, and a minimal scorer that accepts rounds (the
gateway's side of a round start is what is measured). History is bulk-inserted into the gateway's
table, as years of submits would have left it; the new submits go through gRPC.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import cpu_name
from clients.api import ContributorClient
from ftps.common import archives, grpcutil
from ftps.common.db import Database
from ftps.common.embedded_s3 import EmbeddedS3
from ftps.common.settings import StorageSettings
from ftps.common.storage import ObjectStore
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc, scorer_pb2_grpc
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.contributor_gateway.store import SqlSubmissionStore

SHAPE = [1, 8, 8]
OUT = Path(__file__).resolve().parent / "out"
SCORED = gateway_pb2.SUBMISSION_STATE_SCORED
PENDING = gateway_pb2.SUBMISSION_STATE_PENDING


class AcceptingScorer(scorer_pb2_grpc.LiraScorerServiceServicer):
    """Accepts every round and never finishes one: the bench measures the gateway's side."""

    def StartRound(self, request, context):
        return common_pb2.RoundStatus(task_id=request.task_id, round_id=request.round_id,
                                      state=common_pb2.ROUND_STATE_PENDING, n_records=len(request.record_ids))

    def GetResult(self, request, context):
        return common_pb2.RoundResult(status=common_pb2.RoundStatus(
            round_id=request.round_id, state=common_pb2.ROUND_STATE_FINETUNING))


def _records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 10, n)


def _now(i: int) -> str:
    t = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=i)
    return t.isoformat(timespec="milliseconds")


def insert_history(url: str, n: int, *, task_id: str = "", state: int = SCORED, start: int = 0) -> None:
    """``n`` submissions of 4 records straight into the gateway's table (bulk, one transaction)."""
    db = Database(url, name="bench")
    store = SqlSubmissionStore.open(db)
    rows = [dict(submission_id=f"s-h{start + i:010d}", task_id=task_id or f"t-old{i % 100:03d}",
                 contributor=f"c{i % 1000:04d}", n_records=4, state=state,
                 round_id="r-old" if state == SCORED else "", failed_rounds=0, failure_reason="",
                 created_at=_now(start + i)) for i in range(n)]
    with db.write() as conn:
        for k in range(0, n, 10_000):
            conn.execute(store.subs.insert(), rows[k:k + 10_000])
    db.dispose()


def gateway_process(env: dict) -> tuple[subprocess.Popen, str, float]:
    """Start ``python -m services.contributor_gateway``; its address and seconds until SERVING."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "services.contributor_gateway"],
                            env=os.environ | env | {"FTPS_LISTEN": addr}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ch = grpcutil.make_channel(addr)
    try:
        grpcutil.wait_healthy(ch, timeout=120)
    except Exception:
        proc.kill()
        raise RuntimeError(f"gateway did not start: {proc.stderr.read().decode()[-2000:]}") from None
    finally:
        ch.close()
    return proc, addr, time.perf_counter() - t0


def submit_latencies(addr: str, task_id: str, n: int, *, who: str = "bench",
                     stop: threading.Event | None = None) -> list[float]:
    client = ContributorClient(gateway=addr, contributor=who)
    x, y = _records(4, 0)
    out = []
    try:
        for i in range(n):
            if stop is not None and stop.is_set():
                break
            t = time.perf_counter()
            client.submit(task_id, x, y)
            out.append(time.perf_counter() - t)
    finally:
        client.close()
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def run_backend(name: str, url_factory, sizes: list[int], round_subs: int, submits: int) -> list[dict]:
    s3 = EmbeddedS3("127.0.0.1", 0)
    endpoint = s3.start()
    storage = dict(s3_endpoint=endpoint, s3_bucket="bench", s3_access_key="k", s3_secret_key="s")
    reg_url = url_factory()
    reg = registry_server(RegistrySettings(**storage, listen="127.0.0.1:0", auth_disabled=True,
                                           database_url=reg_url))
    reg_port = reg.start("127.0.0.1:0")
    reg_addr = f"127.0.0.1:{reg_port}"
    scorer = grpcutil.Security(auth_disabled=True).server()
    scorer.add(scorer_pb2_grpc.add_LiraScorerServiceServicer_to_server, AcceptingScorer(), "ftps.v1.LiraScorerService")
    scorer_addr = f"127.0.0.1:{scorer.start('127.0.0.1:0')}"
    reg_stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(reg_addr))

    def task(m: int) -> str:
        return reg_stub.CreateTask(registry_pb2.CreateTaskRequest(name="bench", settings=common_pb2.TaskSettings(
            record_shape=SHAPE, batch_threshold=m, n_models=4)), timeout=10).task_id

    rows = []
    try:
        for n in sizes:
            url = url_factory()
            insert_history(url, n)
            env = {"FTPS_S3_ENDPOINT": endpoint, "FTPS_S3_BUCKET": "bench", "FTPS_S3_ACCESS_KEY": "k",
                   "FTPS_S3_SECRET_KEY": "s", "FTPS_AUTH_DISABLED": "true", "FTPS_DATABASE_URL": url,
                   "FTPS_REGISTRY_ADDR": reg_addr, "FTPS_SCORER_ADDR": scorer_addr, "FTPS_LOG_LEVEL": "WARNING",
                   "FTPS_MAX_PENDING_PER_CONTRIBUTOR": str(10**9)}
            proc, addr, ready_s = gateway_process(env)
            try:
                lat = submit_latencies(addr, task(10**5), submits)
                row = {"backend": name, "stored": n, "ready_s": ready_s, "submit_p50_ms": pct(lat, 50),
                       "submit_p99_ms": pct(lat, 99)}
                print(f"{name:10s} {n:>7,} stored: ready {ready_s:.2f}s, submit p50 {row['submit_p50_ms']:.1f} ms, "
                      f"p99 {row['submit_p99_ms']:.1f} ms", flush=True)
                rows.append(row)
            finally:
                proc.terminate()
                proc.wait(10)
        # A round start over `round_subs` pending submissions, with another contributor submitting.
        url = url_factory()
        big = task(10**5)
        insert_history(url, round_subs, task_id=big, state=PENDING, start=10**8)
        store = ObjectStore(StorageSettings(**storage))
        x, y = _records(4, 1)
        blob = archives.records_to_npz(x, y)
        for i in range(round_subs):
            store.put_bytes(f"gateway/tasks/{big}/submissions/s-h{10**8 + i:010d}/records.npz", blob)
        proc, addr, _ = gateway_process(env | {"FTPS_DATABASE_URL": url})
        try:
            other = task(10**5)
            idle = submit_latencies(addr, other, submits, who="other")
            stop = threading.Event()
            during: list[float] = []
            t = threading.Thread(target=lambda: during.extend(
                submit_latencies(addr, other, 10**6, who="other", stop=stop)))
            t.start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            stub = gateway_pb2_grpc.ContributorGatewayServiceStub(grpcutil.make_channel(addr))
            stub.StartRound(gateway_pb2.StartRoundRequest(task_id=big, force=True), timeout=600)
            start_s = time.perf_counter() - t0
            time.sleep(0.5)
            stop.set()
            t.join()
            row = {"backend": name, "round_start_submissions": round_subs, "round_start_s": start_s,
                   "idle_p99_ms": pct(idle, 99), "during_p99_ms": pct(during, 99), "during_n": len(during)}
            print(f"{name:10s} round start over {round_subs:,} pending: {start_s:.1f}s; unrelated submit p99 "
                  f"idle {row['idle_p99_ms']:.1f} ms, during {row['during_p99_ms']:.1f} ms "
                  f"({len(during)} submits)", flush=True)
            rows.append(row)
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        reg.stop(0)
        scorer.stop(0)
        s3.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 and 10,000 stored; a 1,000-submission round")
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--submits", type=int, default=200, help="submits per latency measurement")
    p.add_argument("--sizes", help="comma-separated stored-submission counts (default by --quick); "
                                   "'none' to measure only the round start")
    p.add_argument("--round-submissions", type=int, help="pending submissions the round starts over")
    args = p.parse_args(argv)
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    if args.sizes:
        sizes = [] if args.sizes == "none" else [int(v) for v in args.sizes.split(",")]
    round_subs = args.round_submissions or (1_000 if args.quick else 5_000)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="ftps-bench-state-"))
    counter = iter(range(10**6))
    print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}); {dt.date.today()}", flush=True)
    for backend in args.backends.split(","):
        if backend == "sqlite":
            rows += run_backend("sqlite", lambda: f"sqlite:///{tmp}/db{next(counter)}.db", sizes, round_subs,
                                args.submits)
        elif backend == "postgresql":
            from tests.pg import PostgresServer

            pg = PostgresServer()
            pg.start()
            try:
                rows += run_backend("postgresql", pg.create_database, sizes, round_subs, args.submits)
            finally:
                pg.stop()
        else:
            p.error(f"unknown backend {backend!r}")
    OUT.mkdir(exist_ok=True)
    (OUT / "state.json").write_text(json.dumps(rows, indent=2))
    print(f"written: {OUT / 'state.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
