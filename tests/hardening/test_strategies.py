"""Hostile strategies through the real worker: a gRPC fine-tune worker (services.finetune_worker)
on 127.0.0.1:0, its blobs in the S3-protocol test store. Every hostile job is contained, fails with
a clear reason, and the worker serves a normal job afterwards.

The probing strategies report what they saw in their failure message (``REPORT {json}``): each
probe is ``"ok ..."`` when the strategy could do it, else the exception it got. Cases:

1. network: connect/send to listeners of this test on loopback (TCP, TCP6, UDP, abstract unix);
2. reads: the worker's environment and memory, another task's blob in the object store (with a
   valid presigned URL), another task's job files while its job runs, a worker data directory
   with default permissions, this test's tmp files;
3. writes outside the scratch directory: /tmp, /var/tmp, /dev/shm, the worker's cwd, the repo,
   the job's input directory, the sandbox root, through a symlink planted in the scratch dir;
4. a fork bomb whose processes leave the process group: stopped by RLIMIT_NPROC, nothing left;
5. 50 MB printed to stdout/stderr, and 50 MB written straight into the job channel: the worker
   keeps only tails (its memory is watched), the job fails or succeeds cleanly.

Unbounded allocation and a strategy that never returns are in tests/test_sandbox.py
(test_strategy_that_allocates_without_bound, test_strategy_that_never_returns), as are the crash,
the uid drop and the warm-child tests; they are not repeated here.

What each protection needs (the tests skip, saying so, when the worker reports it missing):
the network namespace needs CAP_SYS_ADMIN or unprivileged user namespaces; the job's own uid needs
a root worker; the filesystem, ptrace and signal restrictions need Landlock (Linux >= 5.13, signal
scoping >= 6.12). ``isolation_status()`` is what the worker's sandbox child reported.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from ftps.common import grpcutil
from ftps.common import archives, serde
from ftps.common.storage import ObjectStore
from ftps.ml.engine import save_weights
from ftps.ml.strategy import load_strategy
from ftps.v1 import worker_pb2, worker_pb2_grpc
from services.finetune_worker.__main__ import create_server
from services.finetune_worker.config import WorkerSettings
from services.finetune_worker.sandbox import _running, isolation_status
from tests.conftest import digits_records

REPO = Path(__file__).resolve().parents[2]
CANARY = "canary-" + uuid.uuid4().hex

# A probing strategy: its body (@BODY@) runs in finetune(); it fills REPORT through probe() and
# the job then fails with the report as its message. NORMAL is the same strategy behaving.
PROBE = '''
import json, os, socket, sys, time
from torch import nn

REPORT = {}


def probe(name, fn):
    try:
        REPORT[name] = "ok " + repr(fn())[:40]
    except BaseException as e:
        REPORT[name] = type(e).__name__


def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def finetune(model, x, y, *, seed, device):
@BODY@
    raise RuntimeError("REPORT " + json.dumps(REPORT, sort_keys=True))
'''
NORMAL = PROBE.replace("@BODY@", "    return model")


def probing(body: str, **values) -> str:
    """The probing strategy running ``body`` (``{name}`` replaced by repr(values[name]))."""
    for name, value in values.items():
        body = body.replace("{" + name + "}", repr(value))
    return PROBE.replace("@BODY@", "\n".join("    " + line for line in body.strip().splitlines()))


def report_of(details: str) -> dict:
    m = re.search(r"REPORT (\{.*\})", details)
    assert m, f"no report in the job's failure: {details[:2000]}"
    return json.loads(m.group(1))


def could(report: dict) -> dict:
    """The probes that succeeded."""
    return {k: v for k, v in report.items() if isinstance(v, str) and v.startswith("ok")}


def _live_pids(match) -> list[int]:
    """Processes (not zombies) for which match(their /proc entry) is true (tests/test_sandbox.py's
    _processes_with counts zombies, which linger until their parent reaps them)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if _running(int(entry.name)) and match(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Worker:
    """The worker under test: a gRPC stub plus helpers to upload a strategy and run a job."""

    def __init__(self, stub, store: ObjectStore, records, weights: bytes) -> None:
        self.stub = stub
        self.store = store
        self.x, self.y = records
        self.weights = store.put_bytes("shared/w.safetensors", weights)
        self.records = store.put_bytes("shared/r.npz", archives.records_to_npz(self.x, self.y))
        self.status: dict = {}

    def job(self, source: str, task: str) -> worker_pb2.RunJobRequest:
        strategy = self.store.put_bytes(f"{task}/strategy.py", source.encode())
        mask = (np.arange(len(self.x)) % 2).astype(np.uint8).tobytes()
        return worker_pb2.RunJobRequest(job=worker_pb2.FinetuneJob(
            task_id=task, job_id=f"{task}-{uuid.uuid4().hex[:6]}", strategy=strategy,
            base_model=self.weights, records=self.records,
            models=[worker_pb2.ModelSpec(index=0, seed=1, mask=mask)]))

    def fails(self, source: str, task: str, timeout: float = 90) -> str:
        """Run a job that must fail as the task's fault -> the failure message."""
        with pytest.raises(grpc.RpcError) as e:
            self.stub.RunJob(self.job(source, task), timeout=timeout)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        return e.value.details()

    def report(self, body: str, task: str, **values) -> dict:
        return report_of(self.fails(probing(body, **values), task))

    def serves_a_normal_job(self, task: str = "t-normal") -> None:
        res = self.stub.RunJob(self.job(NORMAL, task), timeout=90)
        phi = serde.array_from_tensor(res.phi)
        assert phi.shape == (1, len(self.x)) and np.isfinite(phi).all()
        assert self.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5).device == "cpu"

    # What the sandbox children of this worker have in effect (None: unknown, treated as off).
    def has(self, what: str) -> bool:
        s = self.status
        return bool({
            "netns": (s.get("network") or {}).get("isolated"),
            "uid": (s.get("privileges") or {}).get("dropped"),
            "landlock": (s.get("filesystem") or {}).get("restricted"),
        }[what])


def need(worker: Worker, *what: str) -> None:
    reasons = {
        "netns": "the kernel refused the sandbox a network namespace (needs CAP_SYS_ADMIN or "
                 "unprivileged user namespaces)",
        "uid": "the sandbox runs strategies under the worker's uid (a job uid of its own needs "
               "a root worker with CAP_SETUID/CAP_CHOWN)",
        "landlock": "no Landlock filesystem restriction in the sandbox (needs Linux >= 5.13 "
                    "with Landlock enabled)",
    }
    missing = [w for w in what if not worker.has(w)]
    if missing:
        pytest.skip("; ".join(reasons[w] for w in missing))


@pytest.fixture(scope="module")
def worker(s3_endpoint, digits_splits):
    bucket = "h-" + uuid.uuid4().hex[:12]
    with pytest.MonkeyPatch.context() as mp:
        # As in Kubernetes: the object store's secret is in the worker's environment.
        mp.setenv("FTPS_S3_SECRET_KEY", CANARY)
        settings = WorkerSettings(s3_endpoint=s3_endpoint, s3_bucket=bucket, s3_access_key="test",
                                  s3_secret_key=CANARY, listen="127.0.0.1:0", device="cpu",
                                  job_timeout_s=60, job_memory_mb=4096, max_concurrent_jobs=2,
                                  auth_disabled=True)
        store = ObjectStore(settings)
        store.ensure_bucket()
        server = create_server(settings)
        port = server.start("127.0.0.1:0")
        channel = grpcutil.make_channel(f"127.0.0.1:{port}")
        try:
            grpcutil.wait_healthy(channel, timeout=10)
            weights = save_weights(load_strategy(NORMAL).build_model())
            w = Worker(worker_pb2_grpc.FinetuneWorkerServiceStub(channel), store,
                       digits_records(digits_splits, 12, seed=8), weights)
            w.serves_a_normal_job()
            w.status = isolation_status() or {}
            yield w
        finally:
            channel.close()
            server.stop(0.5)


@pytest.fixture
def world_readable_dir():
    """A directory like a worker's or a stack's data dir: default umask, under /tmp."""
    d = Path(tempfile.mkdtemp(prefix="ftps-h8-data-"))
    d.chmod(0o755)
    (d / "secret.txt").write_text(CANARY)
    (d / "secret.txt").chmod(0o644)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


# --------------------------------------------------------------------------------- 1. network


def test_strategy_cannot_reach_the_tests_listeners(worker):
    need(worker, "netns")
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract = "\0ftps-h8-" + uuid.uuid4().hex
    unix.bind(abstract)
    unix.listen()
    listeners = [tcp, udp, unix]
    try:
        tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        listeners.append(tcp6)
        port6 = tcp6.getsockname()[1]
    except OSError:
        port6 = None  # no IPv6 on this machine
    try:
        body = """
def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect((host, port))
    s.sendall(b"LEAK")
    return "sent"

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(3):
        s.sendto(b"LEAK", ("127.0.0.1", {udp_port}))
    return "sent"

def unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({abstract})
    s.sendall(b"LEAK")
    return "sent"

def loopback_up():
    import fcntl, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 0x1 | 0x8))  # SIOCSIFFLAGS UP

probe("tcp", lambda: tcp("127.0.0.1", {port}))
probe("tcp_localhost", lambda: socket.create_connection(("localhost", {port}), timeout=2).sendall(b"LEAK"))
if {port6} is not None:
    probe("tcp6", lambda: tcp("::1", {port6}, socket.AF_INET6))
probe("udp", udp)
probe("unix_abstract", unix)
probe("loopback_up", loopback_up)
probe("tcp_after_loopback_up", lambda: tcp("127.0.0.1", {port}))
"""
        report = worker.report(body, "t-net", port=tcp.getsockname()[1],
                               udp_port=udp.getsockname()[1], abstract=abstract, port6=port6)
        assert {"tcp", "tcp_localhost", "udp", "unix_abstract", "tcp_after_loopback_up"} <= \
            set(report)
        # Whatever the strategy did, nothing arrived here.
        ready, _, _ = select.select(listeners, [], [], 1.0)
        assert ready == [], f"a listener of the test got something; the strategy saw {report}"
        assert not could(report), report
    finally:
        for s in listeners:
            s.close()
    worker.serves_a_normal_job()


# ----------------------------------------------------------------------------------- 2. reads


def _sandbox_root_with(marker: str, deadline: float) -> Path:
    """The sandbox root whose current job's strategy contains ``marker`` (a job in flight)."""
    scratch = Path(tempfile.gettempdir())
    while time.monotonic() < deadline:
        for root in scratch.glob("ftps-sandbox-*"):
            for strategy in root.glob("in-*/strategy.txt"):
                try:
                    if marker in strategy.read_text():
                        return root
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError(f"no sandbox is running the job with {marker}")


def _kill_child_of(root: Path) -> None:
    home = str(root / "home")
    for pid in _live_pids(lambda e: os.readlink(f"/proc/{e.name}/cwd") == home):
        os.kill(pid, signal.SIGKILL)


def test_strategy_cannot_read_other_tasks_or_the_workers_secrets(worker, world_readable_dir,
                                                                 tmp_path):
    # What each protection must block; probes of a protection the worker lacks are not checked.
    blocked_by = {
        "netns": {"s3_presigned", "s3_connect"},
        # a job uid of its own, or Landlock (its ptrace restriction and path rules)
        "uid|landlock": {"worker_environ", "worker_mem", "worker_fd", "victim_strategy",
                         "victim_records", "victim_home", "test_tmp_file"},
        # world-readable files: only Landlock keeps them from a strategy
        "landlock": {"data_dir", "victim_root", "worker_maps"},
    }
    active = {k: v for k, v in blocked_by.items() if any(worker.has(w) for w in k.split("|"))}
    if not active:
        need(worker, "netns", "uid", "landlock")
    victim_blob = worker.store.put_bytes("t-victim/records.npz", b"VICTIM " + CANARY.encode())
    url = worker.store.client.presigned_get_object(worker.store.bucket, victim_blob.key)
    # Control: with that URL, anything on the network reads the other task's blob.
    assert CANARY.encode() in urllib.request.urlopen(url, timeout=5).read()
    host, port = worker.store.client._base_url.host.split(":")  # noqa: SLF001 - the endpoint
    test_secret = tmp_path / "other-task.npz"
    test_secret.write_text(CANARY)

    # Another task's job, in flight (it sleeps) while the hostile one runs next to it.
    marker = "victim-" + uuid.uuid4().hex
    victim_source = NORMAL.replace("    return model", f"    time.sleep(50)  # {marker}\n"
                                                       "    return model")
    body = """
REPORT["env_keys"] = sorted(os.environ)
REPORT["env_has_secret"] = any({canary} in v for v in os.environ.values())
worker = os.getppid()
probe("worker_environ", lambda: open(f"/proc/{worker}/environ", "rb").read())
probe("worker_mem", lambda: open(f"/proc/{worker}/mem", "rb").read(1))
probe("worker_maps", lambda: open(f"/proc/{worker}/maps").read(100))
probe("worker_fd", lambda: os.listdir(f"/proc/{worker}/fd"))
probe("s3_presigned", lambda: __import__("urllib.request").request.urlopen({url}, timeout=3).read())
probe("s3_connect", lambda: socket.create_connection(({host}, {port}), timeout=3))
probe("victim_strategy", lambda: open({root} + "/in-0/strategy.txt").read())
probe("victim_records", lambda: open({root} + "/in-0/train.npz", "rb").read(10))
probe("victim_home", lambda: os.listdir({root} + "/home"))
probe("victim_root", lambda: os.listdir({root}))
probe("data_dir", lambda: open({data} + "/secret.txt").read())
probe("test_tmp_file", lambda: open({test_file}).read())
probe("own_inputs", lambda: len(open("../in-0/train.npz", "rb").read()))  # the control
"""
    root = None
    with futures.ThreadPoolExecutor(1) as pool:
        victim = pool.submit(worker.stub.RunJob, worker.job(victim_source, "t-victim"),
                             timeout=90)
        try:
            root = _sandbox_root_with(marker, time.monotonic() + 60)
            report = worker.report(
                body, "t-reader", canary=CANARY, url=url, host=host, port=int(port),
                root=str(root), data=str(world_readable_dir), test_file=str(test_secret))
        finally:
            if root is not None:
                _kill_child_of(root)  # the victim's job fails: its child was killed under it
            with pytest.raises(grpc.RpcError):
                victim.result(timeout=90)
    assert report["own_inputs"].startswith("ok"), report  # the probes themselves work
    # The child's environment is built from scratch, whatever the worker's holds.
    assert report["env_has_secret"] is False
    assert not [k for k in report["env_keys"] if k.startswith("FTPS_S3") or "SECRET" in k]
    leaks = {k: v for k, v in could(report).items() if k != "own_inputs"}
    for protection, probes in active.items():
        assert not set(leaks) & probes, f"despite {protection}, the strategy could: {leaks}"
    worker.serves_a_normal_job()


# ---------------------------------------------------------------------------------- 3. writes


def test_strategy_cannot_write_outside_its_scratch_dir(worker, world_readable_dir, tmp_path):
    if not (worker.has("uid") or worker.has("landlock")):
        need(worker, "uid", "landlock")
    # World-writable places (/tmp, /var/tmp, /dev/shm, a 1777 directory) are closed by Landlock
    # only; the rest by a job uid of its own too.
    world_writable_probes = {"write_tmp", "write_var_tmp", "write_dev_shm",
                             "write_world_writable_dir", "mkdir_tmp", "write_through_symlink"}
    name = "ftps-h8-" + uuid.uuid4().hex
    world_writable = Path(tempfile.mkdtemp(prefix="ftps-h8-shared-"))
    world_writable.chmod(0o1777)
    targets = {
        "tmp": f"/tmp/{name}",
        "var_tmp": f"/var/tmp/{name}",
        "dev_shm": f"/dev/shm/{name}",
        "worker_cwd": str(Path.cwd() / name),
        "repo_package": str(REPO / "ftps" / f"{name.replace('-', '_')}.py"),
        "data_dir": str(world_readable_dir / name),
        "world_writable_dir": str(world_writable / name),
        "test_tmp": str(tmp_path / name),
        "own_job_inputs": f"../in-0/{name}",
        "sandbox_root": f"../{name}",
    }
    body = """
for key, path in {targets}.items():
    probe("write_" + key, lambda path=path: open(path, "x").write("planted"))
probe("mkdir_tmp", lambda: os.mkdir({tmp_dir}))
def through_link():
    os.symlink({link_target}, "link")
    return open("link", "w").write("planted")
probe("write_through_symlink", through_link)
probe("own_scratch", lambda: open("mine.txt", "x").write("fine"))  # the control
"""
    link_target = f"/tmp/{name}-via-link"
    try:
        report = worker.report(body, "t-writer", targets=targets, tmp_dir=f"/tmp/{name}-dir",
                               link_target=link_target)
        planted = [p for p in [*targets.values(), f"/tmp/{name}-dir", link_target]
                   if not p.startswith("..") and os.path.lexists(p)]
    finally:
        for p in [*targets.values(), link_target]:
            if not p.startswith(".."):
                Path(p).unlink(missing_ok=True)
        if os.path.isdir(f"/tmp/{name}-dir"):
            os.rmdir(f"/tmp/{name}-dir")
        world_writable.rmdir()
    assert report["own_scratch"].startswith("ok"), report
    leaks = {k: v for k, v in could(report).items() if k != "own_scratch"}
    if worker.has("landlock"):
        assert not leaks and not planted, f"the strategy could write: {leaks}; planted: {planted}"
    else:
        assert not set(leaks) - world_writable_probes, f"the strategy could write: {leaks}"
    worker.serves_a_normal_job()


# ------------------------------------------------------------------------------- 4. fork bomb


def test_fork_bomb_is_contained_and_leaves_nothing_behind(worker):
    need(worker, "uid")  # RLIMIT_NPROC of a uid of its own; cleanup of processes by that uid
    body = """
REPORT["root"] = os.path.abspath("..")
REPORT["uid"] = os.getuid()
def bomb():
    os.setsid()  # out of the child's process group
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.05)
if os.fork() == 0:
    try:
        bomb()
    finally:
        os._exit(0)
deadline = time.time() + 20
while time.time() < deadline:
    try:
        pid = os.fork()
    except OSError as e:
        REPORT["fork_refused"] = type(e).__name__
        break
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.05)
REPORT["processes"] = sum(1 for p in os.listdir("/proc") if p.isdigit()
                          and os.stat("/proc/" + p).st_uid == os.getuid())
"""
    t0 = time.monotonic()
    report = worker.report(body, "t-bomb")
    assert report.get("fork_refused") == "BlockingIOError", report  # EAGAIN: RLIMIT_NPROC
    assert report["processes"] <= 200, report
    uid, root = report["uid"], report["root"]
    mine = lambda e: e.stat().st_uid == uid or root.encode() in Path(  # noqa: E731
        f"/proc/{e.name}/cmdline").read_bytes()
    deadline = time.monotonic() + 5
    while (left := _live_pids(mine)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"processes of the fork bomb survived: {left}"
    assert time.monotonic() - t0 < 40
    worker.serves_a_normal_job("t-after-bomb")  # a new child, a new uid: it starts and runs
    worker.serves_a_normal_job()


# ---------------------------------------------------------------------------------- 5. output


class _PeakRss:
    """The peak resident memory of this process (the worker) while it is watched, MiB."""

    def __enter__(self):
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


def test_megabytes_of_output_are_not_buffered(worker):
    body = """
chunk = "x" * (1 << 20)
for _ in range(25):
    print(chunk)
    sys.stderr.write(chunk + "\\n")
print("LAST WORDS OF THE STRATEGY", flush=True)
os._exit(3)
"""
    with _PeakRss() as rss:
        details = worker.fails(probing(body), "t-printer")
    assert "exited with code 3" in details and "LAST WORDS OF THE STRATEGY" in details
    assert len(details) < 16384, len(details)  # the tail of its output, not 50 MB
    assert rss.growth < 40, f"the worker grew by {rss.growth:.0f} MB"
    worker.serves_a_normal_job()


# The strategy finds the child's job channel (its private copy of the original stdout) and
# writes into it: 50 MB of junk (one overlong line, then millions of short ones), or a line of
# JSON nested too deep to parse and then 50 MB of well-formed messages that are not for this job.
FIND_CHANNEL = """
import gc
channel = next(o for o in gc.get_objects() if type(o).__name__ == "_Protocol")._out
fd = channel.fileno()
"""


@pytest.mark.parametrize("flood,reason", [
    ("""
for _ in range(10):
    os.write(fd, b"y" * (1 << 20))
os.write(fd, b"\\n")
for _ in range(40):
    os.write(fd, b"x\\n" * (1 << 19))
""", "that is not sandbox protocol into the sandbox's job channel"),
    ("""
os.write(fd, b"[" * 10000 + b"\\n")
for _ in range(50):
    os.write(fd, b'{"job": -1}\\n' * 90000)
""", r"flooded the sandbox's job channel \(over 10000 stray messages\)"),
], ids=["junk", "messages"])
def test_megabytes_into_the_job_channel_are_not_buffered(worker, flood, reason):
    body = FIND_CHANNEL + flood + "return model"
    t0 = time.monotonic()
    with _PeakRss() as rss:
        details = worker.fails(probing(body), "t-flooder")
    assert re.search(reason, details), details
    assert time.monotonic() - t0 < 30  # not parsed to the end
    assert rss.growth < 40, f"the worker grew by {rss.growth:.0f} MB"
    worker.serves_a_normal_job()
