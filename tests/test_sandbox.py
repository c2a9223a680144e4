"""The sandbox: hostile strategies fail their job with a clear error; the worker keeps working;
warm children serve one task's jobs and nothing else.

Every test spawns real children (about 2-3 s each: importing torch dominates).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from ftps.ml.engine import run_job, save_weights
from ftps.ml.jobs import FinetuneJob
from ftps.ml.strategy import StrategyError, WeightsError, load_strategy
from ftps.records import RecordsError
from ftps.records.npz import Records
from services.finetune_worker.sandbox import SandboxError, SandboxPool, run_sandboxed
from tests.conftest import digits_records

HOSTILE = """
import os, socket, time
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

def finetune(model, x, y, *, seed, device):
{body}
    return model
"""


def hostile(body: str) -> str:
    return HOSTILE.format(body="\n".join("    " + line for line in body.strip().splitlines()))


@pytest.fixture(scope="module")
def tiny_weights() -> bytes:
    torch.manual_seed(0)
    return save_weights(load_strategy(hostile("pass")).build_model())


@pytest.fixture(scope="module")
def records(digits_splits):
    return digits_records(digits_splits, 30, seed=4)


@pytest.fixture
def scratch_root(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    yield root
    assert list(root.iterdir()) == [], "scratch directory left behind"


def finetune_job(source, weights, records, models=None) -> FinetuneJob:
    x, y = records
    return FinetuneJob(strategy_source=source, base_weights=weights, train_records=Records.of(x, y),
                       models=models or [(0, 7, np.arange(len(x)) % 2 == 0)])


def run(source, weights, records, scratch_root, *, models=None, **kw):
    return run_sandboxed(finetune_job(source, weights, records, models), scratch_root=scratch_root,
                         **kw).phi


def _network_namespaces_allowed() -> bool:
    flags = "0x40000000" if os.geteuid() == 0 else "0x50000000"  # NEWNET (| NEWUSER)
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flags}) != 0)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def test_good_job_matches_in_process(digits_strategy, digits_base_weights, records, scratch_root):
    x, _ = records
    models = [(3, 11, np.arange(len(x)) % 2 == 0), (4, 12, np.arange(len(x)) % 2 == 1)]
    progress = []
    phi = run(digits_strategy, digits_base_weights, records, scratch_root, models=models,
              on_progress=lambda done, total: progress.append((done, total)))
    expected = run_job(finetune_job(digits_strategy, digits_base_weights, records, models)).phi
    np.testing.assert_array_equal(phi, expected)
    assert progress == [(1, 2), (2, 2)]


def test_records_reach_the_child_as_they_came(tiny_weights, records, scratch_root):
    """A records blob goes to the child byte for byte, not decoded and encoded again."""
    x, y = records
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=y)
    blob = buf.getvalue()
    assert blob != Records.of(x, y).to_npz()  # what encoding the arrays again would give
    job = FinetuneJob(strategy_source=hostile("import zlib\ndata = open('../in-0/train.npz', 'rb').read()\n"
                                              "raise ValueError(f'{len(data)} {zlib.crc32(data)}')"),
                      base_weights=tiny_weights, train_records=Records.load(blob),
                      models=[(0, 7, np.arange(len(x)) % 2 == 0)])
    with pytest.raises(StrategyError, match=f"ValueError: {len(blob)} {zlib.crc32(blob)}"):
        run_sandboxed(job, scratch_root=scratch_root)


def test_strategy_that_raises(tiny_weights, records, scratch_root):
    source = hostile("print('about to fail')\nraise ValueError('bad idea')")
    with pytest.raises(StrategyError, match=r"finetune\(\) raised ValueError: bad idea"):
        run(source, tiny_weights, records, scratch_root)


def test_strategy_that_never_returns(tiny_weights, records, scratch_root):
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match="strategy timed out after 5 s"):
        run(hostile("while True:\n    time.sleep(1)"), tiny_weights, records, scratch_root,
            timeout_s=5)
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("allocate", ["bytearray(256 * 2**20)", "torch.empty(2**28)"])
def test_strategy_that_allocates_without_bound(allocate, tiny_weights, records, scratch_root):
    source = hostile(f"hoard = []\nwhile True:\n    hoard.append({allocate})")
    with pytest.raises(SandboxError, match=r"strategy exceeded memory limit \(4096 MB\)"):
        run(source, tiny_weights, records, scratch_root, memory_mb=4096)


def test_strategy_that_exits_and_the_next_job_still_runs(digits_strategy, digits_base_weights,
                                                          tiny_weights, records, scratch_root):
    with pytest.raises(SandboxError, match="strategy process exited with code 3 before finishing"):
        run(hostile("os._exit(3)"), tiny_weights, records, scratch_root)
    with pytest.raises(SandboxError, match="killed by signal SIGSEGV"):
        run(hostile("import ctypes\nctypes.string_at(0)"), tiny_weights, records, scratch_root)
    phi = run(digits_strategy, digits_base_weights, records, scratch_root)
    assert phi.shape == (1, len(records[0])) and np.isfinite(phi).all()


@pytest.mark.skipif(not _network_namespaces_allowed(), reason="kernel refuses network namespaces")
def test_strategy_has_no_network(tiny_weights, records, scratch_root):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        source = hostile(f"socket.create_connection(('127.0.0.1', {port}), timeout=2)")
        with pytest.raises(StrategyError, match="OSError.*(unreachable|refused)"):
            run(source, tiny_weights, records, scratch_root)
    finally:
        server.close()


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and marker.encode() in open(f"/proc/{entry.name}/cmdline", "rb").read():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop happens only for a root worker")
def test_strategy_runs_without_the_workers_privileges(tiny_weights, records, scratch_root, tmp_path):
    secret = tmp_path / "other-task.npz"
    secret.write_bytes(b"records of another task")
    secret.chmod(0o600)
    with pytest.raises(StrategyError, match="PermissionError"):
        run(hostile(f"open({str(secret)!r}).read()"), tiny_weights, records, scratch_root)
    # Leave a process behind outside the process group, then try to kill the worker.
    marker = f"{time.time_ns() % 10**9 + 10**9}"
    body = f"""
if os.fork() == 0:
    os.setsid()
    os.execvp("sleep", ["sleep", "{marker}"])
time.sleep(0.3)
os.kill(os.getppid(), 9)
"""
    with pytest.raises(StrategyError, match="PermissionError"):
        run(hostile(body), tiny_weights, records, scratch_root)
    time.sleep(0.2)
    assert _processes_with(marker) == []


def test_engine_errors_cross_the_sandbox(digits_strategy, tiny_weights, records, scratch_root):
    with pytest.raises(StrategyError, match=r"strategy defines no build_model\(\)"):
        run("RECIPE = {}\n", tiny_weights, records, scratch_root)
    with pytest.raises(WeightsError, match="weights do not match build_model"):
        run(digits_strategy, tiny_weights, records, scratch_root)
    # Caught where the job is built, before any child is started.
    x, _ = records
    with pytest.raises(RecordsError, match="inclusion mask of model 0"):
        finetune_job(digits_strategy, tiny_weights, records, [(0, 1, np.ones(len(x) + 1, dtype=bool))])


# --------------------------------------------------------------------------- warm children


def test_warm_child_serves_one_task_and_only_that_task(digits_strategy, digits_base_weights,
                                                       tiny_weights, records, scratch_root):
    x, _ = records
    models = [(3, 11, np.arange(len(x)) % 2 == 0), (4, 12, np.arange(len(x)) % 2 == 1)]

    def job(source, weights):
        return finetune_job(source, weights, records, models)

    expected = run_job(job(digits_strategy, digits_base_weights)).phi
    marker = f"{time.time_ns() % 10**9 + 2 * 10**9}"
    # Leaves a process behind in the child's process group: killed when the job is over.
    straggler = hostile(f'if os.fork() == 0:\n    os.execvp("sleep", ["sleep", "{marker}"])')
    pool = SandboxPool(memory_mb=4096, timeout_s=120, scratch_root=scratch_root)
    try:
        first = pool.run(job(digits_strategy, digits_base_weights), task_key="task-a")
        (child,) = pool.idle_children()
        assert first.engine == "sequential" and first.device == "cpu"
        assert first.cpu_limit_s is not None and first.cpu_limit_s > 0  # the child's, for this job
        pool.run(job(straggler, tiny_weights), task_key="task-a")
        assert _processes_with(marker) == []
        progress = []
        again = pool.run(job(digits_strategy, digits_base_weights), task_key="task-a",
                         on_progress=lambda done, total: progress.append((done, total)))
        assert pool.idle_children() == [child] and child.jobs_done == 3 and child.alive
        assert pool.stats == {"started": 1, "reused": 2, "spare_used": 0}
        assert progress == [(1, 2), (2, 2)]
        # Warm or fresh, the same job gives the same phi.
        np.testing.assert_array_equal(first.phi, expected)
        np.testing.assert_array_equal(again.phi, expected)

        # Another task gets a child of its own, which cannot look into the first one's.
        home = child._root / "home"
        peek = hostile(f"os.listdir({str(home)!r})")
        if os.geteuid() == 0:
            with pytest.raises(StrategyError, match="PermissionError"):
                pool.run(job(peek, tiny_weights), task_key="task-b")
        else:
            pool.run(job(digits_strategy, digits_base_weights), task_key="task-b")
        assert child.alive and pool.stats["started"] == 2
    finally:
        pool.close()
    assert not child.alive


def test_a_failed_job_discards_its_warm_child(digits_strategy, digits_base_weights, tiny_weights,
                                              records, scratch_root):
    pool = SandboxPool(memory_mb=4096, timeout_s=120, spare=True, scratch_root=scratch_root)
    try:
        pool.prestart()  # as the worker does at start: the first job takes the started spare
        pool.spare = False  # and no other one is started (it would only slow this test down)
        with pytest.raises(StrategyError, match="ValueError: bad idea"):
            pool.run(finetune_job(hostile("raise ValueError('bad idea')"), tiny_weights, records),
                     task_key="t")
        assert pool.idle_children() == [] and pool.stats["spare_used"] == 1
        with pytest.raises(ValueError, match="timeout_s must be in"):
            pool.run(finetune_job(digits_strategy, digits_base_weights, records), task_key="t",
                     timeout_s=121)
        phi = pool.run(finetune_job(digits_strategy, digits_base_weights, records), task_key="t").phi
        assert np.isfinite(phi).all() and len(pool.idle_children()) == 1
    finally:
        pool.close()


@pytest.mark.slow
def test_every_job_of_a_warm_child_has_its_own_cpu_budget(tiny_weights, records, scratch_root):
    from services.finetune_worker.sandbox import SandboxChild

    child = SandboxChild(device="cpu", memory_mb=4096, job_cpu_s=3, max_jobs=3,
                         scratch_root=scratch_root)
    try:
        child.run(finetune_job(hostile("t = time.process_time()\n"
                                       "while time.process_time() - t < 2:\n"
                                       "    pass"), tiny_weights, records), timeout_s=60)
        with pytest.raises(SandboxError, match=r"CPU time limit \(3 CPU-seconds per job\)"):
            child.run(finetune_job(hostile("while True:\n    pass"), tiny_weights, records),
                      timeout_s=60)
    finally:
        child.close()
