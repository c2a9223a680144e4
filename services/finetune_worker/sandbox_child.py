"""The sandboxed child: ``python -m services.finetune_worker.sandbox_child SCRATCH``.

Started by ``services.finetune_worker.sandbox.run_sandboxed``; see there for the protocol. Order
matters: limits and namespaces while the process is still single-threaded and before anything
untrusted runs; imports and input files while still privileged; then the privilege drop; only
then the strategy. Only the standard library is imported at module level, so that
``unshare(CLONE_NEWUSER)`` (which requires a single-threaded process) can still succeed.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
MiB = 1024 * 1024

# Modules a strategy may import that live outside site-packages: imported here while still
# privileged, since the job uid may be unable to read the interpreter's standard library.
_PRELOAD = (
    "abc", "collections", "copy", "dataclasses", "encodings.idna", "functools", "itertools",
    "json", "logging", "math", "numbers", "operator", "random", "re", "socket", "statistics",
    "time", "traceback", "typing", "warnings",
)


class _Protocol:
    """JSON lines to the parent, on a private copy of the original stdout."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        # Everything else printed to stdout (the strategy's prints) goes to stderr.
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, msg: dict) -> None:
        self._out.write(json.dumps(msg) + "\n")
        self._out.flush()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _unshare(libc: ctypes.CDLL, flags: int) -> int:
    if libc.unshare(flags) == 0:
        return 0
    return ctypes.get_errno()


def _isolate_network() -> dict:
    """Enter a new network namespace (no interfaces but a downed loopback)."""
    if sys.platform != "linux":
        return {"isolated": False, "detail": f"not supported on {sys.platform}"}
    try:
        libc = _libc()
    except OSError as e:
        return {"isolated": False, "detail": f"no libc: {e}"}
    err = _unshare(libc, CLONE_NEWNET)
    if err == 0:
        return {"isolated": True, "detail": "unshare(CLONE_NEWNET)"}
    first = os.strerror(err)
    if os.geteuid() == 0:
        # Root without CAP_SYS_ADMIN: a user namespace would make the later uid drop impossible
        # (the job uid is unmapped there), so stay in the host network namespace.
        return {"isolated": False, "detail": f"unshare(CLONE_NEWNET): {first}"}
    uid, gid = os.getuid(), os.getgid()
    err = _unshare(libc, CLONE_NEWUSER | CLONE_NEWNET)
    if err != 0:
        return {
            "isolated": False,
            "detail": f"unshare(CLONE_NEWNET): {first}; "
            f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(err)}",
        }
    # Map our ids so that file ownership looks unchanged inside the namespace (best effort).
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError:
        pass
    return {"isolated": True, "detail": "unshare(CLONE_NEWUSER|CLONE_NEWNET)"}


def _lower(kind: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit (soft and hard: the hard limit cannot be raised back without privilege)."""
    hard = soft if hard is None else hard
    _, cur_hard = resource.getrlimit(kind)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(kind, (soft, hard))


def _tasks_of_uid(uid: int) -> int:
    """Threads currently owned by ``uid`` (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


def _apply_limits(limits: dict, device: str) -> dict:
    memory = int(limits["memory_mb"]) * MiB
    # The CUDA driver reserves large address ranges (not memory): limit the data segment there.
    memory_kind = "RLIMIT_DATA" if device.startswith("cuda") else "RLIMIT_AS"
    _lower(getattr(resource, memory_kind), memory)
    cpu_s = int(limits["cpu_s"])
    # SIGXCPU at the soft limit, SIGKILL at the hard one.
    _lower(resource.RLIMIT_CPU, cpu_s, cpu_s + 5)
    _lower(resource.RLIMIT_FSIZE, int(limits["fsize_mb"]) * MiB)
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_NOFILE, int(limits["nofile"]))
    margin = int(limits["nproc_margin"])
    job_uid = limits.get("uid")
    # RLIMIT_NPROC counts all tasks of the real uid: a fresh job uid starts at zero, a shared
    # worker uid at whatever the worker and its other jobs already use.
    nproc = margin if job_uid is not None else _tasks_of_uid(os.getuid()) + margin
    _lower(resource.RLIMIT_NPROC, nproc)
    return {"memory": f"{memory_kind}={limits['memory_mb']}MB", "cpu_s": cpu_s, "nproc": nproc}


def _drop_privileges(job_uid: int | None) -> dict:
    """Root -> the job's own uid/gid (no supplementary groups), then no_new_privs.

    Fails open, like the network namespace: the status says what happened and the parent
    logs a warning (a root container without CAP_SETUID cannot drop).
    """
    status: dict = {"dropped": False}
    if job_uid is not None and os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(job_uid)
            os.setuid(job_uid)
            status["dropped"] = True
        except OSError as e:
            status["error"] = f"{type(e).__name__}: {e}"
    try:
        _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except OSError:
        pass
    status["uid"] = os.geteuid()
    return status


_WARM_UP_STRATEGY = """
from torch import nn
def build_model():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8, 2))
RECIPE = {"optimizer": "%s", "lr": 0.01, "epochs": 1, "batch_size": 2, "momentum": 0.5,
          "augment": ["hflip", "random-crop"], "tta": ["hflip"]}
"""


def _warm_up(engine, np) -> None:
    """Run the engine once on a tiny built-in strategy, per optimizer.

    torch imports modules lazily on first use (building an optimizer imports torch._dynamo);
    after the privilege drop the interpreter's own files may be unreadable, so every lazy import
    of the engine's code paths has to happen here.
    """
    import torch

    from ftps.ml.strategy import OPTIMIZERS, load_strategy

    x = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 1, 2, 2)
    y = np.array([0, 1, 0, 1], dtype=np.int64)
    for optimizer in OPTIMIZERS:
        source = _WARM_UP_STRATEGY % optimizer
        weights = engine.save_weights(load_strategy(source).build_model())
        engine.finetune_and_score(
            strategy_source=source, base_weights=weights, train_x=x, train_y=y, eval_x=x,
            eval_y=y, models=[(0, 0, np.ones(4, dtype=bool))], device="cpu",
        )
    torch.manual_seed(0)


def _device(requested: str | None) -> str:
    # The parent resolves None before spawning; "cpu" is only a fallback for manual runs.
    return requested or "cpu"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def _report(scratch: Path, kind: str, message: str, phase: str) -> int:
    _write_json_atomic(
        scratch / "error.json", {"type": kind, "message": message[:8192], "phase": phase}
    )
    return 2


def _is_memory_failure(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, MemoryError):
            return True
        text = str(e)
        if any(h in text for h in ("can't allocate memory", "Cannot allocate memory",
                                   "out of memory", "bad_alloc", "failed to map segment")):
            return True
        e = e.__cause__
    return False


def run(scratch_dir: str) -> int:
    # Relative paths from here on: after the uid drop the scratch directory's ancestors may not
    # be searchable by the job uid (pytest's tmp dirs are 0700), but its cwd still is.
    os.chdir(scratch_dir)
    scratch = Path(".")
    protocol = _Protocol()
    job = json.loads((scratch / "job.json").read_text(encoding="utf-8"))
    device = _device(job.get("device"))
    status: dict = {}
    try:
        status["limits"] = _apply_limits(job["limits"], device)
        status["network"] = _isolate_network()
        import importlib

        for name in _PRELOAD:
            importlib.import_module(name)
        import numpy as np

        from ftps.ml import engine
        from ftps.ml.datasets import load_records
        from ftps.ml.strategy import EngineError, describe_exception

        source = (scratch / "strategy.txt").read_text(encoding="utf-8")
        base_weights = (scratch / "base.safetensors").read_bytes()
        train_x, train_y = load_records((scratch / "train.npz").read_bytes())
        eval_x, eval_y = load_records((scratch / "eval.npz").read_bytes())
        builder_x = builder_y = None
        if job["has_builder"]:
            builder_x, builder_y = load_records((scratch / "builder.npz").read_bytes())
        masks = np.load(scratch / "masks.npy", allow_pickle=False)
        models = [
            (spec["index"], spec["seed"], masks[row]) for row, spec in enumerate(job["models"])
        ]
        _warm_up(engine, np)
        status["privileges"] = _drop_privileges(job["limits"].get("uid"))
    except BaseException as e:  # noqa: BLE001 - anything here is a setup failure
        kind = "MemoryError" if _is_memory_failure(e) else type(e).__name__
        return _report(scratch, kind, str(e), "setup")
    protocol.send({"sandbox": status})

    try:
        phi = engine.finetune_and_score(
            strategy_source=source,
            base_weights=base_weights,
            train_x=train_x,
            train_y=train_y,
            eval_x=eval_x,
            eval_y=eval_y,
            models=models,
            builder_x=builder_x,
            builder_y=builder_y,
            builder_mix=job["builder_mix"],
            device=device,
            progress=lambda done, total: protocol.send({"done": done, "total": total}),
        )
    except BaseException as e:  # noqa: BLE001 - every failure becomes a report
        if isinstance(e, EngineError):
            return _report(scratch, type(e).__name__, str(e), "job")
        if _is_memory_failure(e):
            return _report(scratch, "MemoryError", str(e) or type(e).__name__, "job")
        return _report(scratch, "InternalError", describe_exception(e), "job")
    tmp = scratch / "phi.tmp.npy"
    np.save(tmp, phi, allow_pickle=False)
    os.replace(tmp, scratch / "phi.npy")
    return 0


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        print("usage: python -m services.finetune_worker.sandbox_child SCRATCH", file=sys.stderr)
        os._exit(64)
    try:
        code = run(argv[1])
    except BaseException as e:  # noqa: BLE001
        print(f"sandbox child failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 70
    sys.stderr.flush()
    # Skip interpreter teardown: atexit handlers and finalizers a strategy registered never run.
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
