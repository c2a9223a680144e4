"""Run untrusted fine-tuning strategies in sandboxed child processes (DESIGN.md §4).

The worker process never executes strategy code. A ``SandboxChild`` is a
``python -m services.finetune_worker.sandbox_child ROOT`` process with a minimal environment, its
own session (process group), a scratch home directory as working directory, and its job channel
on stdin. Before any strategy code runs, the child

- lowers its resource limits: address space (``memory_mb``; data segment on CUDA, whose driver
  reserves huge address ranges), CPU seconds (a hard limit over its life, a soft one per job),
  processes, file size, open files, no core dumps;
- asks the OOM killer to pick it and everything it starts first (oom_score_adj 1000);
- enters a new network namespace (only a downed loopback inside), via ``unshare(CLONE_NEWNET)``
  or, without CAP_SYS_ADMIN, ``unshare(CLONE_NEWUSER | CLONE_NEWNET)``; when the kernel refuses
  both the job still runs and a warning is logged;
- restricts itself with Landlock (Linux >= 5.13; any uid): files readable only in the
  interpreter, its import path, the repository's packages, system libraries, a few files of
  /etc, /proc and /sys; writable only beneath its own sandbox root (home and job directories);
  no ptrace of processes outside (so no /proc/PID/environ or mem of the worker), no signals to
  them (ABI 6, Linux >= 6.12); TCP refused when there is no network namespace (ABI 4). When the
  kernel has no Landlock the job still runs and a warning is logged;
- imports torch and runs every engine once on a built-in model (the ~2-3 s a job used to pay);
- when started as root: at its first job, after reading that job's inputs, drops to a fresh
  unprivileged uid/gid used by this child only, with no_new_privs, so it cannot raise its limits
  back, signal the worker, or read other children's directories or root-only files.

A child serves the jobs of **one task** (``SandboxPool`` keys children by task and strategy; a
child never sees another key's data), one job at a time, each with its own wall-time limit and
CPU budget, until it has served ``max_jobs``, stayed idle ``idle_s``, or a job failed (any
failure discards the child). Per job the parent writes the job's files (``FinetuneJob.to_files``:
strategy, weights and records blobs as they came, masks npy, json; nothing pickled) into a fresh
directory only the child's gid can read, and an output directory only the child's uid can write;
the child reports progress and the outcome as JSON lines on its stdout (the strategy's own prints
go to its stderr) and leaves ``phi.npy`` in the output directory, which the parent opens without
following links; the rest of the job's result comes as a report that the parent reads field by
field, each field only with its type (``JobResult.from_report``). Between jobs every process the job
left behind (its process group, and its uid when it has its own) is killed.

The job channel is bounded too: overlong lines are dropped, at most ``_MAX_QUEUED_MESSAGES``
messages wait (the child blocks beyond), and a child that writes more than ``_MAX_JUNK_BYTES`` of
non-protocol bytes or ``_MAX_IGNORED_MESSAGES`` stray messages into it fails its job at once.

Failures come back as the matching EngineError (StrategyError, WeightsError, RecordsError) or
SandboxError; the worker process itself is never affected. What is *not* isolated: without
Landlock, the filesystem is readable (and world-writable places such as /tmp writable) where
file permissions allow (there is no mount namespace); a non-root worker cannot change uid, so
all its children share one uid (RLIMIT_NPROC then counts the worker's tasks too, and processes
that leave the child's process group are not found between jobs); memory is limited per process
(a strategy's processes together can use more: the OOM killer then picks them first), disk
space in the scratch directory only by RLIMIT_FSIZE per file; and the jobs of one task in one
child share that process (a strategy that changes process-wide state in one job can affect the
task's next job in the same child: the child resets torch's default dtype and grad mode, seeds
every model, and declarative recipes cannot change anything else).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ftps.common import archives
from ftps.common.cpus import usable_cpus
from ftps.ml.jobs import FinetuneJob, JobResult
from ftps.ml.strategy import EngineError, StrategyError, WeightsError
from ftps.records import RecordsError

__all__ = ["SandboxChild", "SandboxError", "SandboxPool", "isolation_status", "run_sandboxed"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_MODULE = "services.finetune_worker.sandbox_child"

# Everything the child may ever emit or keep: bounded so a hostile strategy cannot exhaust the
# worker's memory through its pipes.
_TAIL_BYTES = 4096
_MAX_PROTOCOL_LINE = 16384
# Protocol messages waiting for the job's thread (the child blocks on its writes beyond that),
# bytes of non-protocol output tolerated on the job channel over a child's life, and messages a
# job may send that the parent ignores (stale, repeated or implausible ones).
_MAX_QUEUED_MESSAGES = 256
_MAX_JUNK_BYTES = 1 << 20
_MAX_IGNORED_MESSAGES = 10_000
_ERROR_MESSAGE_LIMIT = 4096
# Environment passed through to the child when set (threading, engine and GPU selection).
_PASSTHROUGH_ENV = (
    "FTPS_TORCH_THREADS",
    "FTPS_ENGINE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
)
# Per-child uids when the worker runs as root: far above any system or login uid.
_JOB_UID_BASE = 1_900_000_000
_JOB_UID_SPAN = 100_000_000
# CPU seconds a child may spend starting (importing torch, warming up the engines).
_STARTUP_CPU_S = 120
# A child left without jobs this long exits by itself; the pool closes idle children much
# sooner, and a child whose worker died sees its job channel close and exits at once.
_CHILD_IDLE_EXIT_S = 7 * 86400
_KNOWN_ERRORS: dict[str, type[EngineError]] = {
    "StrategyError": StrategyError,
    "WeightsError": WeightsError,
    "RecordsError": RecordsError,
}
_isolation_lock = threading.Lock()
_last_isolation: dict | None = None
_warned: set[str] = set()


class SandboxError(EngineError):
    """The sandboxed strategy process failed: timeout, crash, signal, resource limit."""


class _Tail:
    """The last ``limit`` bytes written to it."""

    def __init__(self, limit: int = _TAIL_BYTES) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if len(self._buf) > self._limit:
                del self._buf[: len(self._buf) - self._limit]

    def clear(self) -> None:
        with self._lock:
            self._buf.clear()

    def text(self) -> str:
        with self._lock:
            return self._buf.decode("utf-8", "replace").strip()


def _drain(stream, tail: _Tail) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail.add(chunk)


class _ChannelAbuse(Exception):
    """Queued by the protocol reader when the child wrote too much that is not protocol."""


def _parse_message(line: bytes) -> dict | None:
    try:
        msg = json.loads(line)
    except Exception:  # noqa: BLE001 - ValueError, UnicodeDecodeError, RecursionError ([[[[...)
        return None
    return msg if isinstance(msg, dict) else None


def _read_protocol(stream, lines: queue.Queue, tail: _Tail, stop: threading.Event) -> None:
    """Split the child's stdout into protocol messages (dicts) on ``lines``, then None at its
    end. Overlong lines are dropped, not buffered; what is not a message goes to ``tail``, and
    past ``_MAX_JUNK_BYTES`` of it (only a strategy writing into the channel produces any) the
    reader queues a _ChannelAbuse and stops reading. ``lines`` is bounded: while nobody takes
    messages the child blocks on its writes; ``stop`` ends the reader."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                lines.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    pending = bytearray()
    overlong = False
    junk = 0
    for chunk in iter(lambda: stream.read1(65536), b""):
        pending += chunk
        while True:
            nl = pending.find(b"\n")
            if nl < 0:
                if len(pending) > _MAX_PROTOCOL_LINE:
                    junk += len(pending)
                    tail.add(bytes(pending[-_TAIL_BYTES:]))
                    pending.clear()
                    overlong = True
                break
            line = bytes(pending[:nl])
            del pending[: nl + 1]
            if overlong:
                overlong = False
                junk += nl + 1
                continue
            msg = _parse_message(line)
            if msg is None:
                junk += nl + 1
                tail.add(line + b"\n")
            elif not put(msg):
                return
        if junk > _MAX_JUNK_BYTES:
            put(_ChannelAbuse(f"strategy wrote over {_MAX_JUNK_BYTES // 1024} KB that is not "
                              "sandbox protocol into the sandbox's job channel"))
            return
    if pending and not overlong:
        msg = _parse_message(bytes(pending))
        if msg is not None and not put(msg):
            return
    put(None)


def _child_env(home: Path, threads: int | None = None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    for name in _PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    if threads:
        env["FTPS_TORCH_THREADS"] = str(threads)
    return env


def job_cpu_seconds(timeout_s: float) -> int:
    """A job's CPU budget: its wall time on every CPU this process may use, plus slack."""
    return math.ceil(timeout_s * usable_cpus()) + 10


class SandboxChild:
    """One sandboxed child process (see the module docstring).

    ``device`` and ``memory_mb`` are fixed for its life; ``max_jobs`` bounds the jobs it serves
    and, with ``job_cpu_s`` (each job's CPU budget), its hard CPU limit; ``idle_s``: it exits by
    itself after that long without a job. ``task_key`` is the
    task it is bound to after its first job (None before). Not thread-safe: one job at a time.
    """

    def __init__(self, *, device: str, memory_mb: int, job_cpu_s: int, max_jobs: int = 1,
                 idle_s: float = _CHILD_IDLE_EXIT_S,
                 scratch_root: str | os.PathLike | None = None, threads: int | None = None) -> None:
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
        self.device = device
        self.threads = threads  # torch threads of its jobs (None: $FTPS_TORCH_THREADS, else every CPU)
        self.memory_mb = memory_mb
        self.max_jobs = max_jobs
        self.task_key: str | None = None
        self.jobs_done = 0
        self.last_used = time.monotonic()
        self._job_cpu_s = job_cpu_s
        self._timeout_s = 0.0
        self._ready = False
        self._proc: subprocess.Popen | None = None
        self._readers: list[tuple[threading.Thread, object]] = []
        self._lines: queue.Queue = queue.Queue(maxsize=_MAX_QUEUED_MESSAGES)
        self._stop_readers = threading.Event()
        self._out_tail, self._err_tail = _Tail(), _Tail()
        is_root = os.geteuid() == 0
        uid = _JOB_UID_BASE + secrets.randbelow(_JOB_UID_SPAN) if is_root else None
        self._root = Path(tempfile.mkdtemp(prefix="ftps-sandbox-", dir=scratch_root))
        self._home = self._root / "home"
        self.limits = {
            "memory_mb": int(memory_mb),
            "startup_cpu_s": _STARTUP_CPU_S,
            "cpu_hard_s": _STARTUP_CPU_S + max_jobs * job_cpu_s + 5,
            "job_cpu_s": job_cpu_s,
            "fsize_mb": 1024,
            "nofile": 1024,
            "nproc_margin": 128,
            "uid": uid,
        }
        try:
            self._home.mkdir(mode=0o700)
            if uid is not None:
                # The child may traverse its root (not list it) and owns only its home.
                self._root.chmod(0o711)
                try:
                    os.chown(self._home, uid, uid)
                except OSError as e:  # root without CAP_CHOWN: run without the drop, say so
                    _warn_once("chown", "sandbox: cannot hand the scratch directory to a job "
                               "uid (%s); strategies keep the worker's uid", e)
                    self.limits["uid"] = None
            (self._root / "child.json").write_text(json.dumps({
                "device": device, "limits": self.limits, "idle_exit_s": idle_s,
            }), encoding="utf-8")
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-s", "-m", CHILD_MODULE, str(self._root)],
                cwd=self._home,
                env=_child_env(self._home, self.threads),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            self.close()
            raise
        self._readers = [
            (threading.Thread(target=_read_protocol,
                              args=(self._proc.stdout, self._lines, self._out_tail,
                                    self._stop_readers),
                              daemon=True), self._proc.stdout),
            (threading.Thread(target=_drain, args=(self._proc.stderr, self._err_tail),
                              daemon=True), self._proc.stderr),
        ]
        for t, _ in self._readers:
            t.start()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def uid(self) -> int | None:
        return self.limits["uid"]

    def rss_mb(self) -> float:
        """Resident memory of the child, MiB (0 when it is gone)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0.0

    def wait_ready(self, deadline: float) -> None:
        """Block until the child finished starting (raises SandboxError on a failed start)."""
        while not self._ready:
            msg = self._next_message(deadline, "starting")
            if msg.get("ready") is True:
                self._ready = True
            elif "setup_error" in msg:
                self._fail_report(msg["setup_error"])

    def run(self, job: FinetuneJob, *, timeout_s: float,
            on_progress: Callable[[int, int], None] | None = None) -> JobResult:
        """Run one job -> its JobResult (PHI float64 [len(job.models), len(job.evaluated)]);
        ``timeout_s`` counts from now, waiting for a child that is still starting included.
        Raises the job's EngineError or SandboxError; after any failure the child is closed."""
        if self._proc is None or self.jobs_done >= self.max_jobs:
            raise SandboxError("sandbox child cannot take another job")
        # Before anything of the child's is touched: a job that cannot be written costs no child.
        files = job.to_files()
        n_models, n_records = len(job.models), len(job.evaluated)
        deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        k = self.jobs_done
        job_dir, out_dir = self._root / f"in-{k}", self._root / f"out-{k}"
        try:
            self.wait_ready(deadline)
            self._write_job(job_dir, out_dir, files)
            self._err_tail.clear()
            self._out_tail.clear()
            line = json.dumps({"job": k, "in": f"../{job_dir.name}", "out": f"../{out_dir.name}",
                               "cpu_s": self._job_cpu_s}) + "\n"
            try:
                self._proc.stdin.write(line.encode())
                self._proc.stdin.flush()
            except OSError:
                pass  # it died: the next read says how
            last_done = 0
            ignored = 0
            report = None
            while True:
                msg = self._next_message(deadline, "running")
                if msg.get("job") != k:
                    ignored += 1
                elif "sandbox" in msg:
                    _log_isolation(msg["sandbox"])
                elif "error" in msg:
                    self._fail_report(msg["error"])
                elif msg.get("finished") is True:
                    report = msg.get("result")
                    break
                else:
                    done = msg.get("done")
                    # Only plausible, monotonic progress is forwarded: the child is not trusted.
                    if (type(done) is int and msg.get("total") == n_models
                            and last_done < done <= n_models):
                        last_done = done
                        if on_progress is not None:
                            on_progress(done, n_models)
                    else:
                        ignored += 1
                if ignored > _MAX_IGNORED_MESSAGES:
                    raise SandboxError(f"strategy flooded the sandbox's job channel (over "
                                       f"{_MAX_IGNORED_MESSAGES} stray messages)")
            result = JobResult.from_report(_read_phi(out_dir / "phi.npy", n_models, n_records), report)
        except BaseException:
            self.close()
            raise
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)
        self.jobs_done += 1
        self.last_used = time.monotonic()
        self._kill_leftovers()
        return result

    def close(self) -> None:
        """Stop the child (and everything it started) and remove its directory. Idempotent."""
        proc, self._proc = self._proc, None
        self._stop_readers.set()
        if proc is not None:
            _kill_group(proc)
            if self.limits["uid"] is not None:
                _kill_uid(self.limits["uid"])  # processes that left the group with setsid()
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for t, stream in self._readers:
            t.join(timeout=1)
            # A pipe still held by an escaped grandchild keeps its reader blocked: closing the
            # stream under it could deadlock, so leave that one to the daemon thread.
            if not t.is_alive():
                stream.close()
        self._readers = []
        shutil.rmtree(self._root, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------

    def _write_job(self, job_dir: Path, out_dir: Path, files: dict[str, bytes]) -> None:
        # Created here, in a directory the child cannot write: no link can be planted in the way.
        job_dir.mkdir(mode=0o700)
        for name, data in files.items():
            (job_dir / name).write_bytes(data)
        out_dir.mkdir(mode=0o700)
        uid = self.limits["uid"]
        if uid is not None:
            os.chown(job_dir, 0, uid)
            job_dir.chmod(0o750)  # readable by the child's gid only
            os.chown(out_dir, uid, uid)

    def _next_message(self, deadline: float, what: str) -> dict:
        """The child's next protocol message (a dict), or SandboxError on timeout or exit."""
        assert self._proc is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxError(f"strategy timed out after {self._timeout_s:g} s")
            try:
                msg = self._lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                # A grandchild may hold stdout open after the child exited.
                if self._proc.poll() is not None and self._lines.empty():
                    self._fail_exit()
                continue
            if msg is None or isinstance(msg, _ChannelAbuse):
                # The reader has stopped: this stays at the end for later calls.
                try:
                    self._lines.put_nowait(msg)
                except queue.Full:  # pragma: no cover - nothing else puts once it stopped
                    pass
                if msg is None:
                    self._fail_exit()
                raise SandboxError(str(msg))
            return msg

    def _fail_exit(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + 10
        while self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        returncode = self._proc.poll()
        if returncode is None:
            raise SandboxError("strategy process closed its output but did not exit")
        raise SandboxError(_describe_exit(returncode, self.limits, self._err_tail,
                                          self._out_tail))

    def _fail_report(self, report: object) -> None:
        try:
            kind, message = str(report["type"]), str(report["message"])[:_ERROR_MESSAGE_LIMIT]
            phase = str(report.get("phase", "job"))
        except (KeyError, TypeError, AttributeError) as e:
            raise SandboxError(f"sandbox sent an unreadable error report: {e}") from e
        if kind in _KNOWN_ERRORS:
            raise _KNOWN_ERRORS[kind](message)
        if kind == "MemoryError":
            if phase == "setup":
                raise SandboxError(
                    f"sandbox could not start within memory_mb={self.limits['memory_mb']} "
                    f"(importing torch alone needs a few GB of address space): {message}"
                )
            raise SandboxError(
                f"strategy exceeded memory limit ({self.limits['memory_mb']} MB): {message}"
            )
        detail = self._err_tail.text()
        raise SandboxError(
            f"sandbox {phase} failed: {kind}: {message}"
            + (f"\n--- last output ---\n{detail}" if detail and phase == "setup" else "")
        )

    def _kill_leftovers(self) -> None:
        """SIGKILL what the last job left running: its process group but the child, and its uid
        but the child when it has a uid of its own; return once they are dead (zombies, which
        the child reaps before its next job, count as dead)."""
        if self._proc is None:
            return
        me, uid = self._proc.pid, self.limits["uid"]
        killed = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                mine = uid is not None and entry.stat().st_uid == uid
                if not mine:
                    fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                    mine = int(fields[2]) == me  # process group id
                if mine:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        deadline = time.monotonic() + 2
        while killed and time.monotonic() < deadline:
            killed = [pid for pid in killed if _running(pid)]
            if killed:
                time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _read_phi(path: Path, n_models: int, n_records: int) -> np.ndarray:
    """Open the child's phi.npy without following links, bounded in size, and check it."""
    expected = n_models * n_records * 8
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise SandboxError(f"sandbox finished without a readable phi.npy: {e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > expected + 4096:
            raise SandboxError("sandbox returned a phi.npy that is not a plain file of the "
                               "expected size")
        try:
            # The strategy could have written any header: checked against the expected shape
            # before anything is allocated (np.load would allocate what the header declares).
            phi = archives.read_npy(f.read(expected + 4097), what="phi.npy",
                                    limits=archives.ArchiveLimits(max_bytes=expected + 4096),
                                    spec=archives.ArraySpec((n_models, n_records), "f"))
        except (ValueError, OSError) as e:  # archives.ArchiveError is a ValueError
            raise SandboxError(f"sandbox returned an unreadable phi.npy: {e}") from e
    if not isinstance(phi, np.ndarray) or phi.dtype != np.float64 or \
            phi.shape != (n_models, n_records):
        raise SandboxError(
            f"sandbox returned phi {getattr(phi, 'dtype', None)} {getattr(phi, 'shape', None)}, "
            f"expected float64 {(n_models, n_records)}"
        )
    # NaN marks records with non-finite logits (ftps.ml.training.compute_phi); the scorer isolates them.
    if np.isinf(phi).any():
        raise SandboxError("sandbox returned infinite phi (NaN marks a non-finite statistic)")
    return phi


def _resolve_device(device: str | None) -> str:
    if device is None:
        from ftps.ml.engine import resolve_device  # imports torch: only when we must choose

        return str(resolve_device(None))
    return device


def run_sandboxed(
    job: FinetuneJob,
    *,
    device: str | None = None,
    timeout_s: float = 600,
    memory_mb: int = 4096,
    scratch_root: str | os.PathLike | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
) -> JobResult:
    """``ftps.ml.engine.run_job(job)`` in a fresh sandboxed child, closed afterwards -> its
    JobResult. ``SandboxPool.run`` reuses children instead.

    ``timeout_s`` is the wall time of the whole child (including ~2-4 s to import torch and
    warm up); ``memory_mb`` its address-space limit (a CUDA build of torch needs ~3.3 GB of
    address space just to import). ``on_progress(done, total)`` is called in the caller's
    thread.

    Raises StrategyError / WeightsError / RecordsError as the engine would in-process, and
    SandboxError for a timeout, a crash, a signal, or an exceeded limit.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    child = SandboxChild(device=_resolve_device(device), memory_mb=memory_mb,
                         job_cpu_s=job_cpu_seconds(timeout_s), max_jobs=1,
                         scratch_root=scratch_root, threads=threads)
    try:
        return child.run(job, timeout_s=timeout_s, on_progress=on_progress)
    finally:
        child.close()


class SandboxPool:
    """Warm sandbox children for a worker: one task per child, reused across its jobs.

    ``run(task_key=...)`` takes an idle child bound to ``task_key``, else a spare (started but
    never used), else starts one; after a successful job the child goes back to the pool, after
    any failure it is closed. At most ``max_idle`` children wait idle (least recently used are
    closed first), none longer than ``idle_s``, none beyond ``max_jobs_per_child`` jobs, none
    holding more than ``max_idle_rss_mb`` of memory (a child importing torch alone holds ~0.7 GB
    with the CUDA build; one that fine-tuned a large model keeps what it allocated).
    With ``spare=True`` one unbound child is kept started (``prestart``; restarted after a job
    took it, once that job is over), so that the first job of a new task does not wait for torch
    to import.
    """

    def __init__(self, *, device: str | None = None, memory_mb: int = 4096,
                 timeout_s: float = 600, max_idle: int = 2, idle_s: float = 300,
                 max_jobs_per_child: int = 64, max_idle_rss_mb: float = 2048,
                 spare: bool = False, scratch_root: str | os.PathLike | None = None,
                 threads: int | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
        self.device = _resolve_device(device)
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.max_jobs_per_child = max_jobs_per_child
        self.max_idle_rss_mb = max_idle_rss_mb
        self.spare = spare
        self.scratch_root = scratch_root
        self.threads = threads
        self._idle: list[SandboxChild] = []
        self._spare: SandboxChild | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="sandbox-reaper",
                                        daemon=True)
        self._reaper.start()
        self.stats = {"started": 0, "reused": 0, "spare_used": 0}
        self._children: weakref.WeakSet[SandboxChild] = weakref.WeakSet()  # every child started, busy or not

    def _spawn(self) -> SandboxChild:
        child = SandboxChild(device=self.device, memory_mb=self.memory_mb,
                             job_cpu_s=job_cpu_seconds(self.timeout_s),
                             max_jobs=self.max_jobs_per_child,
                             scratch_root=self.scratch_root, threads=self.threads)
        with self._lock:
            self.stats["started"] += 1
            self._children.add(child)
        return child

    def children_alive(self) -> int:
        """Children of this pool whose process is alive (idle, spare or running a job)."""
        with self._lock:
            children = list(self._children)
        return sum(1 for c in children if c.alive)

    def prestart(self) -> None:
        """Start the spare child now unless there is one (returns at once: the child imports
        torch in the background)."""
        with self._lock:
            if self._closed or self._spare is not None:
                return
        child = self._spawn()
        with self._lock:
            if self._closed or self._spare is not None:
                extra = child
            else:
                self._spare, extra = child, None
        if extra is not None:
            extra.close()

    def wait_spare(self, timeout: float = 60) -> bool:
        """Wait until the spare child is ready (True), or give up (False). For benchmarks."""
        with self._lock:
            spare = self._spare
        if spare is None:
            return False
        try:
            spare.wait_ready(time.monotonic() + timeout)
        except SandboxError:
            return False
        return True

    def _acquire(self, key: str) -> SandboxChild:
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            for child in reversed(self._idle):
                if child.task_key == key:
                    self._idle.remove(child)
                    if child.alive:
                        self.stats["reused"] += 1
                        return child
                    child.close()
                    break
            spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            with self._lock:
                self.stats["spare_used"] += 1
        else:
            if spare is not None:
                spare.close()
            spare = self._spawn()
        spare.task_key = key
        return spare

    def run(self, job: FinetuneJob, *, task_key: str, timeout_s: float | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> JobResult:
        """``run_sandboxed`` on a warm child of ``task_key`` (any string naming the task and its
        strategy; children never serve two keys). ``timeout_s`` (default the pool's) must not
        exceed the pool's."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not 0 < timeout_s <= self.timeout_s:
            raise ValueError(f"timeout_s must be in (0, {self.timeout_s}], got {timeout_s}")
        child = self._acquire(task_key)
        try:
            return child.run(job, timeout_s=timeout_s, on_progress=on_progress)
        finally:
            self._release(child)
            if self.spare:
                # Between jobs, not during one: starting a child costs ~3 CPU-seconds.
                self.prestart()

    def _release(self, child: SandboxChild) -> None:
        """Back to the idle children; closed if it failed, is used up, or the pool is closed."""
        evicted = []
        too_big = child.alive and child.rss_mb() > self.max_idle_rss_mb
        with self._lock:
            if self._closed or child.jobs_done >= child.max_jobs or not child.alive or too_big:
                evicted.append(child)
            else:
                self._idle.append(child)
                while len(self._idle) > self.max_idle:
                    evicted.append(self._idle.pop(0))
        for c in evicted:
            c.close()

    def _reap_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                expired = [c for c in self._idle
                           if now - c.last_used > self.idle_s or not c.alive]
                self._idle = [c for c in self._idle if c not in expired]
            for c in expired:
                c.close()

    def idle_children(self) -> list[SandboxChild]:
        with self._lock:
            return list(self._idle)

    def close(self) -> None:
        """Close every idle and spare child (children running a job close when it ends)."""
        with self._lock:
            self._closed = True
            children = self._idle + ([self._spare] if self._spare is not None else [])
            self._idle, self._spare = [], None
        self._stop.set()
        for c in children:
            c.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
        log.error("sandbox child %d did not die after SIGKILL", proc.pid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a child's uid (only that child ever runs as it), pass after
    pass until one finds none it has not killed yet: a process still forking while an earlier
    pass killed its siblings could otherwise be missed (a killed one cannot fork any more)."""
    killed: set[int] = set()
    for _ in range(100):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in killed:
                continue
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.add(int(entry.name))
                    found = True
            except (OSError, ValueError):
                continue
        if not found:
            return


def isolation_status() -> dict | None:
    """What the last sandbox child reported about its isolation, e.g.
    ``{"network": {"isolated": True, "detail": "unshare(CLONE_NEWNET)"}, "filesystem":
    {"restricted": True, "detail": "landlock ABI 7", ...}, "privileges": {"uid": 1912345678,
    "dropped": True}, "limits": {...}}``; None before the first job."""
    with _isolation_lock:
        return None if _last_isolation is None else dict(_last_isolation)


def _warn_once(key: str, message: str, *args: object) -> None:
    with _isolation_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def _log_isolation(status: object) -> None:
    global _last_isolation
    if not isinstance(status, dict):
        return
    with _isolation_lock:
        first = _last_isolation is None
        _last_isolation = status
    log.log(logging.INFO if first else logging.DEBUG, "sandbox isolation: %s", status)
    net = status.get("network")
    if isinstance(net, dict) and not net.get("isolated"):
        _warn_once("netns", "sandbox: the kernel refused a new network namespace (%s); "
                   "strategies run with the worker's network access", net.get("detail"))
    fs = status.get("filesystem")
    if isinstance(fs, dict) and not fs.get("restricted"):
        _warn_once("landlock", "sandbox: no Landlock restriction (%s); strategies can read and "
                   "write whatever their uid may", fs.get("detail"))
    priv = status.get("privileges")
    if isinstance(priv, dict) and priv.get("error"):
        _warn_once("uid", "sandbox: could not drop to a job uid (%s); strategies run as uid %s",
                   priv.get("error"), priv.get("uid"))


_MEMORY_HINTS = ("bad_alloc", "Cannot allocate memory", "can't allocate memory", "MemoryError",
                 "out of memory")


def _describe_exit(returncode: int, limits: dict, err_tail: _Tail, out_tail: _Tail) -> str:
    output = "\n".join(t for t in (err_tail.text(), out_tail.text()) if t)
    memory_hint = any(h in output for h in _MEMORY_HINTS)
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            what = (f"strategy exceeded its CPU time limit ({limits['job_cpu_s']} CPU-seconds "
                    "per job)")
        elif sig == signal.SIGXFSZ:
            what = f"strategy exceeded the file size limit ({limits['fsize_mb']} MB)"
        elif memory_hint:
            what = (
                f"strategy exceeded memory limit ({limits['memory_mb']} MB) and was killed "
                f"by {name}"
            )
        elif sig == signal.SIGKILL:
            what = "strategy process was killed by SIGKILL (out of memory?)"
        else:
            what = f"strategy process was killed by signal {name}"
    elif memory_hint:
        what = f"strategy exceeded memory limit ({limits['memory_mb']} MB) (exit code {returncode})"
    elif returncode == 0:
        what = "strategy process exited without producing a result"
    else:
        what = f"strategy process exited with code {returncode} before finishing"
    if output:
        what += f"\n--- last output ---\n{output}"
    return what
