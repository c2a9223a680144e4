"""Run an untrusted fine-tuning strategy in a sandboxed child process (DESIGN.md §4).

The worker process never executes strategy code. ``run_sandboxed`` writes the job's inputs into a
fresh scratch directory (safetensors, npz, npy and json; nothing pickled) and runs
``python -m services.finetune_worker.sandbox_child SCRATCH`` with a minimal environment, the scratch
directory as working directory and home, its own session (process group), and a wall-time limit.
Before any strategy code runs, the child

- lowers its resource limits: address space (``memory_mb``; data segment on CUDA, whose driver
  reserves huge address ranges), CPU seconds, processes, file size, open files, no core dumps;
- enters a new network namespace (only a downed loopback inside), via ``unshare(CLONE_NEWNET)``
  or, without CAP_SYS_ADMIN, ``unshare(CLONE_NEWUSER | CLONE_NEWNET)``; when the kernel refuses
  both the job still runs and a warning is logged;
- when started as root: drops to a fresh unprivileged uid/gid used by this job only, with
  no_new_privs, so it cannot raise its limits back, signal the worker, or read other jobs'
  scratch directories or root-only files.

It reports progress as JSON lines on its stdout (the strategy's own prints go to its stderr) and
leaves ``phi.npy`` or ``error.json`` ``{"type", "message"}`` behind. Failures come back as the
matching EngineError (StrategyError, WeightsError, RecordsError) or SandboxError; the worker
process itself is never affected. What is *not* isolated: the filesystem is still readable where
file permissions allow (no mount namespace), and a non-root worker cannot change uid, so jobs of
a non-root worker share one uid.
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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ftps.ml.datasets import save_records
from ftps.ml.strategy import EngineError, RecordsError, StrategyError, WeightsError

__all__ = ["SandboxError", "isolation_status", "run_sandboxed"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_MODULE = "services.finetune_worker.sandbox_child"

# Everything the child may ever emit or keep: bounded so a hostile strategy cannot exhaust the
# worker's memory through its pipes.
_TAIL_BYTES = 4096
_MAX_PROTOCOL_LINE = 4096
_ERROR_MESSAGE_LIMIT = 4096
# Environment passed through to the child when set (threading and GPU selection).
_PASSTHROUGH_ENV = (
    "FTPS_TORCH_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
)
# Per-job uids when the worker runs as root: far above any system or login uid.
_JOB_UID_BASE = 1_900_000_000
_JOB_UID_SPAN = 100_000_000
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

    def text(self) -> str:
        with self._lock:
            return self._buf.decode("utf-8", "replace").strip()


def _drain(stream, tail: _Tail) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail.add(chunk)


def _read_protocol(stream, lines: queue.Queue, tail: _Tail) -> None:
    """Split the child's stdout into protocol lines; overlong lines are dropped, not buffered."""
    pending = bytearray()
    overlong = False
    for chunk in iter(lambda: stream.read1(65536), b""):
        pending += chunk
        while True:
            nl = pending.find(b"\n")
            if nl < 0:
                if len(pending) > _MAX_PROTOCOL_LINE:
                    tail.add(bytes(pending[-_TAIL_BYTES:]))
                    pending.clear()
                    overlong = True
                break
            line = bytes(pending[:nl])
            del pending[: nl + 1]
            if overlong:
                overlong = False
                continue
            lines.put(line)
    if pending and not overlong:
        lines.put(bytes(pending))
    lines.put(None)


def _child_env(scratch: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    for name in _PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _write_inputs(
    scratch: Path,
    *,
    strategy_source: str,
    base_weights: bytes,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    models: Sequence[tuple[int, int, np.ndarray]],
    builder_x: np.ndarray | None,
    builder_y: np.ndarray | None,
    builder_mix: int | None,
    device: str | None,
    limits: dict,
) -> None:
    (scratch / "strategy.txt").write_text(strategy_source, encoding="utf-8")
    (scratch / "base.safetensors").write_bytes(bytes(base_weights))
    save_records(scratch / "train.npz", train_x, train_y)
    save_records(scratch / "eval.npz", eval_x, eval_y)
    has_builder = builder_x is not None and builder_y is not None
    if has_builder:
        save_records(scratch / "builder.npz", builder_x, builder_y)
    masks = np.zeros((len(models), len(train_x)), dtype=np.bool_)
    specs = []
    for row, (index, seed, mask) in enumerate(models):
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(train_x),):
            raise RecordsError(
                f"inclusion mask of model {index} must be bool [{len(train_x)}], got "
                f"{mask.dtype} {mask.shape}"
            )
        masks[row] = mask
        specs.append({"index": int(index), "seed": int(seed)})
    np.save(scratch / "masks.npy", masks, allow_pickle=False)
    job = {
        "models": specs,
        "builder_mix": builder_mix,
        "has_builder": has_builder,
        "device": device,
        "limits": limits,
    }
    (scratch / "job.json").write_text(json.dumps(job), encoding="utf-8")


def run_sandboxed(
    *,
    strategy_source: str,
    base_weights: bytes,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    models: Sequence[tuple[int, int, np.ndarray]],
    builder_x: np.ndarray | None = None,
    builder_y: np.ndarray | None = None,
    builder_mix: int | None = 0,
    device: str | None = None,
    timeout_s: float = 600,
    memory_mb: int = 4096,
    scratch_root: str | os.PathLike | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """``ftps.ml.engine.finetune_and_score`` in a sandboxed child -> PHI float64 [len(models), m].

    ``timeout_s`` is the wall time of the whole child (including ~2-4 s to import torch);
    ``memory_mb`` its address-space limit (a CUDA build of torch needs ~3.3 GB of address space
    just to import). ``on_progress(done, total)`` is called in the caller's thread.

    Raises StrategyError / WeightsError / RecordsError as the engine would in-process, and
    SandboxError for a timeout, a crash, a signal, or an exceeded limit.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
    if device is None:
        from ftps.ml.engine import resolve_device  # imports torch: only when we must choose

        device = str(resolve_device(None))
    is_root = os.geteuid() == 0
    job_uid = _JOB_UID_BASE + secrets.randbelow(_JOB_UID_SPAN) if is_root else None
    limits = {
        "memory_mb": int(memory_mb),
        "cpu_s": math.ceil(timeout_s * _usable_cpus()) + 10,
        "fsize_mb": 1024,
        "nofile": 1024,
        "nproc_margin": 128,
        "uid": job_uid,
    }

    scratch = Path(tempfile.mkdtemp(prefix="ftps-job-", dir=scratch_root))
    proc: subprocess.Popen | None = None
    readers: list[tuple[threading.Thread, object]] = []
    try:
        if job_uid is not None:
            # Inputs stay root-owned and are read before the drop; the job uid may only write here.
            try:
                os.chown(scratch, job_uid, job_uid)
            except OSError as e:  # root without CAP_CHOWN: run without the drop, say so
                _warn_once("chown", "sandbox: cannot hand the scratch directory to a job uid "
                           "(%s); strategies keep the worker's uid", e)
                limits["uid"] = None
        _write_inputs(
            scratch,
            strategy_source=strategy_source,
            base_weights=base_weights,
            train_x=train_x,
            train_y=train_y,
            eval_x=eval_x,
            eval_y=eval_y,
            models=models,
            builder_x=builder_x,
            builder_y=builder_y,
            builder_mix=builder_mix,
            device=device,
            limits=limits,
        )
        proc = subprocess.Popen(
            [sys.executable, "-P", "-s", "-m", CHILD_MODULE, str(scratch)],
            cwd=scratch,
            env=_child_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        lines: queue.Queue = queue.Queue()
        out_tail, err_tail = _Tail(), _Tail()
        readers = [
            (threading.Thread(target=_read_protocol, args=(proc.stdout, lines, out_tail),
                              daemon=True), proc.stdout),
            (threading.Thread(target=_drain, args=(proc.stderr, err_tail), daemon=True),
             proc.stderr),
        ]
        for t, _ in readers:
            t.start()

        deadline = time.monotonic() + timeout_s
        last_done = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(proc)
                raise SandboxError(f"strategy timed out after {timeout_s:g} s")
            try:
                line = lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                # A grandchild may hold stdout open after the child exited.
                if proc.poll() is not None:
                    break
                continue
            if line is None:
                break
            last_done = _handle_line(line, len(models), last_done, on_progress, out_tail)

        try:
            returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise SandboxError(f"strategy timed out after {timeout_s:g} s") from None
        _kill_group(proc)  # anything the strategy left running in its process group
        if limits["uid"] is not None:
            _kill_uid(limits["uid"])  # and what left the group with setsid()
        for t, _ in readers:
            t.join(timeout=2)
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                last_done = _handle_line(line, len(models), last_done, on_progress, out_tail)
        return _collect(scratch, returncode, len(models), len(eval_x), limits, err_tail, out_tail)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        if limits["uid"] is not None:
            _kill_uid(limits["uid"])  # processes that left the group with setsid()
        for t, stream in readers:
            t.join(timeout=1)
            # A pipe still held by an escaped grandchild keeps its reader blocked: closing the
            # stream under it could deadlock, so leave that one to the daemon thread.
            if not t.is_alive():
                stream.close()
        shutil.rmtree(scratch, ignore_errors=True)


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
    """SIGKILL every process of a job uid (only this job ever runs as it)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _handle_line(
    line: bytes,
    total: int,
    last_done: int,
    on_progress: Callable[[int, int], None] | None,
    out_tail: _Tail,
) -> int:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        msg = None
    if not isinstance(msg, dict):
        out_tail.add(line + b"\n")
        return last_done
    if "sandbox" in msg:
        _log_isolation(msg["sandbox"])
        return last_done
    done = msg.get("done")
    # Only plausible, monotonic progress is forwarded: the child is not trusted.
    if type(done) is int and msg.get("total") == total and last_done < done <= total:
        if on_progress is not None:
            on_progress(done, total)
        return done
    return last_done


def isolation_status() -> dict | None:
    """What the last sandbox child reported about its isolation, e.g.
    ``{"network": {"isolated": True, "detail": "unshare(CLONE_NEWNET)"}, "privileges":
    {"uid": 1912345678, "dropped": True}, "limits": {...}}``; None before the first job."""
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
    priv = status.get("privileges")
    if isinstance(priv, dict) and priv.get("error"):
        _warn_once("uid", "sandbox: could not drop to a job uid (%s); strategies run as uid %s",
                   priv.get("error"), priv.get("uid"))


def _collect(
    scratch: Path,
    returncode: int,
    n_models: int,
    n_records: int,
    limits: dict,
    err_tail: _Tail,
    out_tail: _Tail,
) -> np.ndarray:
    error_path, phi_path = scratch / "error.json", scratch / "phi.npy"
    if error_path.is_file():
        _raise_reported(error_path, limits, err_tail)
    if returncode == 0 and phi_path.is_file():
        try:
            phi = np.load(phi_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SandboxError(f"sandbox returned an unreadable phi.npy: {e}") from e
        if phi.dtype != np.float64 or phi.shape != (n_models, n_records):
            raise SandboxError(
                f"sandbox returned phi {phi.dtype} {phi.shape}, expected float64 "
                f"{(n_models, n_records)}"
            )
        if not np.isfinite(phi).all():
            raise SandboxError("sandbox returned NaN or infinite phi")
        return phi
    raise SandboxError(_describe_exit(returncode, limits, err_tail, out_tail))


def _raise_reported(path: Path, limits: dict, err_tail: _Tail) -> None:
    try:
        report = json.loads(path.read_bytes()[: 4 * _ERROR_MESSAGE_LIMIT])
        kind, message = str(report["type"]), str(report["message"])[:_ERROR_MESSAGE_LIMIT]
        phase = str(report.get("phase", "job"))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise SandboxError(f"sandbox wrote an unreadable error report: {e}") from e
    if kind in _KNOWN_ERRORS:
        raise _KNOWN_ERRORS[kind](message)
    if kind == "MemoryError":
        if phase == "setup":
            raise SandboxError(
                f"sandbox could not start within memory_mb={limits['memory_mb']} (importing "
                f"torch alone needs a few GB of address space): {message}"
            )
        raise SandboxError(
            f"strategy exceeded memory limit ({limits['memory_mb']} MB): {message}"
        )
    detail = err_tail.text()
    raise SandboxError(
        f"sandbox {phase} failed: {kind}: {message}"
        + (f"\n--- last output ---\n{detail}" if detail and phase == "setup" else "")
    )


_MEMORY_HINTS = ("bad_alloc", "Cannot allocate memory", "can't allocate memory", "MemoryError",
                 "out of memory")


def _describe_exit(returncode: int, limits: dict, err_tail: _Tail, out_tail: _Tail) -> str:
    output = "\n".join(t for t in (err_tail.text(), out_tail.text()) if t)
    memory_hint = any(h in output for h in _MEMORY_HINTS)
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            what = f"strategy exceeded its CPU time limit ({limits['cpu_s']} CPU-seconds)"
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
