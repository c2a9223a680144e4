"""The multi-process local mode: the store and every service as separate OS processes
(``python -m services.X``, as the pods run them), real fine-tuning on digits.

A round scored by two worker processes must give exactly the scores of the same round scored by one:
phi is deterministic given the seeds and the thread count, whichever worker runs a job.

The masks and model seeds of a round derive from the task seed *and the round id*, and the gateway
names rounds at random. So the two-worker stack runs a round the way users do (``ftps-stack up
--processes --workers 2``, builder and contributors through the client library, the batch threshold
starting the round), and the one-worker stack (:class:`ProcessStack`) scores that same round again
— same round id, same batch, same task settings — through the scorer's StartRound, which is the
call the gateway makes.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clients.api import BuilderClient, ContributorClient
from ftps.common import archives, grpcutil
from ftps.common.auth import TokenSigner, load_key
from ftps.common.settings import StorageSettings
from ftps.common.storage import open_blob_store
from stack.processes import ProcessStack
from ftps.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from tests.conftest import digits_records

ROOT = Path(__file__).resolve().parents[1]
M = 16  # records in the round
SETTINGS = dict(n_models=8, batch_threshold=M, models_per_job=2, seed=11, record_shape=[1, 8, 8],
                num_classes=10)
CLI_NAMES = {"contributor gateway": "gateway", "builder registry": "registry", "LiRA scorer": "scorer",
             "fine-tune worker": "worker", "object store (S3 protocol, moto)": "s3"}
ROUND_TIMEOUT = 150.0


def _start_cli_stack(data_dir: Path, workers: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """``ftps-stack up --processes`` in a subprocess -> (process, addresses from its banner)."""
    data_dir.mkdir(parents=True)
    with open(data_dir / "cli.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stack.cli", "up", "--processes", "--workers", str(workers),
             "--ephemeral-ports", "--data-dir", str(data_dir)],
            cwd=ROOT, env=dict(os.environ, FTPS_TORCH_THREADS="1"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    addresses: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait()
            pytest.fail("ftps-stack up --processes did not come up:\n" + (data_dir / "cli.err").read_text())
        if line.startswith("Ctrl-C to stop."):
            return proc, addresses
        label, _, value = line.strip().rpartition(" ")
        if label.strip() in CLI_NAMES:
            addresses[CLI_NAMES[label.strip()]] = value
        metrics = re.fullmatch(r"(.+?)(?: (\d+))? metrics", label.strip())
        if metrics and metrics.group(1) in CLI_NAMES:  # "fine-tune worker 1 metrics  http://host:port/metrics"
            name = CLI_NAMES[metrics.group(1)] + (f"-{metrics.group(2)}" if metrics.group(2) else "")
            addresses[f"metrics {name}"] = value.removeprefix("http://").removesuffix("/metrics")


def _register_task(addresses: dict[str, str], signer: TokenSigner, splits, strategy: str,
                   weights: bytes) -> str:
    builder = BuilderClient(registry=addresses["registry"], gateway=addresses["gateway"],
                            scorer=addresses["scorer"], token=signer.issue("acme", "builder"))
    try:
        task = builder.create_task("processes", common_pb2.TaskSettings(**SETTINGS), owner="acme")
        for kind, data in ((common_pb2.BLOB_KIND_BASE_MODEL, weights),
                           (common_pb2.BLOB_KIND_STRATEGY, strategy.encode()),
                           (common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*splits["builder"]))):
            builder.upload(task.task_id, kind, data)
    finally:
        builder.close()
    return task.task_id


def _by_index(result: common_pb2.RoundResult) -> list[common_pb2.RecordScore]:
    return sorted(result.scores, key=lambda s: s.index)


def _row(s: common_pb2.RecordScore) -> tuple:
    return (s.counted_p, s.counted_p_ci_low, s.counted_p_ci_high, s.n_in, s.n_out, s.auc, s.score,
            s.mu_in, s.sigma_in, s.mu_out, s.sigma_out)


def _round_with_two_workers(tmp_path, splits, strategy, weights, x, y):
    """The users' way, on ``ftps-stack up --processes --workers 2``: the round's result, the
    contributors' submissions, and the jobs each worker ran."""
    data_dir = tmp_path / "two"
    proc, addr = _start_cli_stack(data_dir, workers=2)
    try:
        assert len(addr["worker"].split(",")) == 2, addr
        signer = TokenSigner(load_key(key_file=str(data_dir / "signing.key")))
        task_id = _register_task(addr, signer, splits, strategy, weights)
        builder = BuilderClient(registry=addr["registry"], gateway=addr["gateway"], scorer=addr["scorer"],
                                token=signer.issue("acme", "builder"))
        subs = {}
        half = M // 2
        for who, sl in (("alice", slice(0, half)), ("bob", slice(half, M))):
            c = ContributorClient(gateway=addr["gateway"], contributor=who, token=signer.issue(who, "contributor"))
            subs[who] = c.submit(task_id, x[sl], y[sl])
            if who == "bob":  # the M-th record reached the batch threshold: a round starts by itself
                deadline = time.monotonic() + 30
                while not subs[who].round_id and time.monotonic() < deadline:
                    time.sleep(0.2)
                    subs[who] = c.get_submission(subs[who].submission_id)
            c.close()
        round_id = subs["bob"].round_id
        assert round_id, "no round started at the batch threshold"
        states = [s.state for s in builder.watch_round(round_id, timeout=ROUND_TIMEOUT)]
        result = builder.get_round(round_id)
        builder.close()
        assert states[-1] == common_pb2.ROUND_STATE_DONE, result.status.message
        jobs = {name: (data_dir / "logs" / f"{name}.log").read_text().count(f"job {round_id}-j")
                for name in ("worker-0", "worker-1")}
        # `up --processes` prints every process's /metrics; each worker counts the models it fine-tuned.
        assert {k for k in addr if k.startswith("metrics ")} == {
            "metrics gateway", "metrics registry", "metrics scorer", "metrics worker-0", "metrics worker-1"}, addr
        for name in ("worker-0", "worker-1"):
            with urllib.request.urlopen(f"http://{addr[f'metrics {name}']}/metrics", timeout=10) as page:
                text = page.read().decode()
            done = re.search(r"^ftps_worker_models_finetuned_total (\S+)$", text, re.M)
            assert done and (float(done.group(1)) > 0) == (jobs[name] > 0), (name, text[:2000])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, (data_dir / "cli.err").read_text()
    for name, a in addr.items():  # every process is gone with its listener
        for target in a.split(","):
            host, port = target.rsplit(":", 1)
            with pytest.raises(OSError):
                socket.create_connection((host, int(port)), timeout=1).close()
    return result, subs, jobs


def _same_round_with_one_worker(tmp_path, splits, strategy, weights, round_id, x_batch, y_batch,
                                record_ids, contributors) -> common_pb2.RoundResult:
    with ProcessStack(workers=1, data_dir=tmp_path / "one", worker_env={"FTPS_TORCH_THREADS": "1"}) as stack:
        assert len(stack.worker_addresses) == 1
        signer = stack.signer()
        task_id = _register_task(stack.addresses, signer, splits, strategy, weights)
        store = open_blob_store(StorageSettings(s3_endpoint=stack.addresses["s3"], s3_bucket=stack.bucket,
                                                s3_access_key="ftps", s3_secret_key="ftps-secret-key"))
        batch = store.put_bytes(f"test/rounds/{round_id}/batch.npz", archives.records_to_npz(x_batch, y_batch))
        channel = grpcutil.make_channel(stack.addresses["scorer"], token=signer.issue("test", "admin"))
        scorer = scorer_pb2_grpc.LiraScorerServiceStub(channel)
        scorer.StartScoring(scorer_pb2.StartScoringRequest(
            task_id=task_id, round_id=round_id, batch=batch, record_ids=record_ids,
            contributors=contributors), timeout=60)
        states = [s.state for s in scorer.WatchScoring(scorer_pb2.WatchScoringRequest(round_id=round_id),
                                                     timeout=ROUND_TIMEOUT)]
        result = scorer.GetScoringResult(scorer_pb2.GetScoringResultRequest(round_id=round_id), timeout=60)
        channel.close()
        assert states[-1] == common_pb2.ROUND_STATE_DONE, result.status.message
        log = (stack.log_dir / "worker-0.log").read_text()
        assert log.count(f"job {round_id}-j") == SETTINGS["n_models"] // SETTINGS["models_per_job"]
    return result


@pytest.mark.timeout(400)
def test_a_round_on_two_worker_processes_scores_exactly_as_on_one(
        tmp_path, digits_splits, digits_strategy, digits_base_weights):
    x, y = digits_records(digits_splits, M, seed=3)
    two, subs, jobs = _round_with_two_workers(tmp_path, digits_splits, digits_strategy,
                                              digits_base_weights, x, y)
    # The scorer's pool spread the round's jobs over both worker processes.
    assert sum(jobs.values()) == SETTINGS["n_models"] // SETTINGS["models_per_job"], jobs
    assert all(jobs.values()), f"a worker process got no job: {jobs}"

    # The batch exactly as the gateway assembled it, from the result's (contributor, record, index).
    scores = _by_index(two)
    assert [s.index for s in scores] == list(range(M))
    rows = {"alice": list(subs["alice"].record_ids), "bob": list(subs["bob"].record_ids)}
    offset = {"alice": 0, "bob": M // 2}
    order = [offset[s.contributor] + rows[s.contributor].index(s.record_id) for s in scores]
    assert sorted(order) == list(range(M))

    one = _same_round_with_one_worker(tmp_path, digits_splits, digits_strategy, digits_base_weights,
                                      two.status.round_id, x[order], y[order],
                                      [s.record_id for s in scores], [s.contributor for s in scores])

    assert [(s.record_id, s.contributor) for s in _by_index(one)] == \
        [(s.record_id, s.contributor) for s in scores]
    np.testing.assert_array_equal(np.array([_row(s) for s in _by_index(one)]),
                                  np.array([_row(s) for s in scores]))
    assert one.batch.auc == two.batch.auc
    assert [(m.method, m.auc) for m in one.method_metrics] == [(m.method, m.auc) for m in two.method_metrics]
    # Not a vacuous match: the models learned and the records got different scores.
    assert len({s.auc for s in scores}) > 1 and all(s.n_in == s.n_out == 4 for s in scores)


def test_stack_children_die_with_a_killed_parent(tmp_path):
    """A local stack's children get SIGTERM when the stack process dies, even by SIGKILL
    (``PR_SET_PDEATHSIG``, set by every service and the store at start)."""
    from services.finetune_worker.sandbox import _running as running

    parent_code = (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, PRIVACYSCORE_PARENT_PID=str(os.getpid()))\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; from ftps.common.grpcutil import "
        "die_with_parent; die_with_parent(); print(\"armed\", flush=True); time.sleep(120)'], env=env, "
        "stdout=subprocess.PIPE, text=True)\n"
        "assert child.stdout.readline().strip() == 'armed'\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        child_pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not running(child_pid):  # gone, or a zombie waiting for init to reap it
                break
            time.sleep(0.1)
        else:
            os.kill(child_pid, signal.SIGKILL)
            pytest.fail("the child outlived its SIGKILLed parent")
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.timeout(240)
def test_a_killed_service_is_restarted_on_its_port_and_serves_again(tmp_path, caplog):
    """``ftps-stack up --processes``: kill -9 the registry, the supervisor starts it again on the
    same address, with the same (kept) data; a second death waits twice as long before the restart."""
    caplog.set_level("INFO", logger="stack.processes")
    with ProcessStack(workers=1, data_dir=tmp_path, persistent=True,
                      worker_env={"FTPS_TORCH_THREADS": "1"}) as stack:
        assert "s3" not in stack.children  # blobs are files in the data dir
        token = stack.signer().issue("acme", "builder")
        addr = stack.addresses
        b = BuilderClient(registry=addr["registry"], gateway=addr["gateway"], scorer=addr["scorer"], token=token)
        task = b.create_task("survives", common_pb2.TaskSettings(**SETTINGS), owner="acme")
        b.close()
        for kill in (1, 2):
            victim = stack.children["registry"].proc
            os.kill(victim.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while stack.restarts.get("registry", 0) < kill:
                assert time.monotonic() < deadline, "the registry was not restarted"
                time.sleep(0.1)
            again = stack.children["registry"]
            assert again.proc.pid != victim.pid and again.address == addr["registry"]
            channel = grpcutil.make_channel(addr["registry"])
            grpcutil.wait_healthy(channel, timeout=60, service="ftps.v1.BuilderRegistryService")
            channel.close()
            b = BuilderClient(registry=addr["registry"], gateway=addr["gateway"], scorer=addr["scorer"],
                              token=token)
            assert [t.task_id for t in b.list_tasks()] == [task.task_id]  # kept across the restart
            b.close()
        assert stack.exited() == []
    delays = [r.getMessage() for r in caplog.records if "exited with code -9" in r.getMessage()]
    assert len(delays) == 2 and "restarting it in 0.5s" in delays[0] and "restarting it in 1.0s" in delays[1], delays
