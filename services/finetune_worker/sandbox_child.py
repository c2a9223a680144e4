"""The sandboxed child: ``python -m services.finetune_worker.sandbox_child ROOT``.

Started by ``services.finetune_worker.sandbox.SandboxChild``; see there for the protocol. One
child serves the jobs of one task, one at a time, until its parent closes its job channel.

Order matters: limits and namespaces while the process is still single-threaded and before
anything untrusted runs; imports and the engine's warm-up while still privileged; the first job's
input files and the modules its strategy needs while still privileged; then the privilege drop;
only then the strategy. Only the standard library is imported at module level, so that
``unshare(CLONE_NEWUSER)`` (which requires a single-threaded process) can still succeed.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import sys
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
MiB = 1024 * 1024
_ERROR_MESSAGE_LIMIT = 4096

# Modules a strategy may import that live outside site-packages: imported here while still
# privileged, since the job uid may be unable to read the interpreter's standard library.
_PRELOAD = (
    "abc", "collections", "copy", "dataclasses", "encodings.idna", "functools", "itertools",
    "json", "logging", "math", "numbers", "operator", "random", "re", "socket", "statistics",
    "time", "traceback", "typing", "warnings",
)
# Imported before the privilege drop only when the first job's strategy names them (torchvision
# alone adds ~1-2 s to a child's start-up).
_PRELOAD_IF_NAMED = {"torchvision": ("torchvision", "torchvision.models")}


class _Protocol:
    """JSON lines to the parent on a private copy of the original stdout, jobs from the parent
    on a private copy of the original stdin; fds 0 and 1 are taken from the strategy."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        self._in = os.fdopen(os.dup(0), "r", encoding="utf-8")
        # Everything else printed to stdout (the strategy's prints) goes to stderr.
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

    def send(self, msg: dict) -> None:
        self._out.write(json.dumps(msg) + "\n")
        self._out.flush()

    def next_job(self, idle_s: float) -> dict | None:
        """The next job, or None when the parent closed the channel or none came in ``idle_s``."""
        ready, _, _ = select.select([self._in], [], [], idle_s)
        if not ready:
            return None
        line = self._in.readline()
        return json.loads(line) if line else None


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


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _apply_limits(limits: dict, device: str) -> dict:
    memory = int(limits["memory_mb"]) * MiB
    # The CUDA driver reserves large address ranges (not memory): limit the data segment there.
    memory_kind = "RLIMIT_DATA" if device.startswith("cuda") else "RLIMIT_AS"
    _lower(getattr(resource, memory_kind), memory)
    # The hard CPU limit covers the child's whole life (start-up and every job it may serve);
    # each job lowers the soft limit to what it may use (``_job_cpu_limit``). SIGXCPU at the soft
    # limit, SIGKILL at the hard one.
    hard = int(limits["cpu_hard_s"])
    _lower(resource.RLIMIT_CPU, min(int(limits["startup_cpu_s"]), hard), hard)
    _lower(resource.RLIMIT_FSIZE, int(limits["fsize_mb"]) * MiB)
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_NOFILE, int(limits["nofile"]))
    margin = int(limits["nproc_margin"])
    job_uid = limits.get("uid")
    # RLIMIT_NPROC counts all tasks of the real uid: a fresh job uid starts at zero, a shared
    # worker uid at whatever the worker and its other jobs already use.
    nproc = margin if job_uid is not None else _tasks_of_uid(os.getuid()) + margin
    _lower(resource.RLIMIT_NPROC, nproc)
    return {"memory": f"{memory_kind}={limits['memory_mb']}MB", "cpu_hard_s": hard,
            "nproc": nproc}


def _job_cpu_limit(cpu_s: float) -> int:
    """Soft CPU limit: what this process used so far plus the job's budget (under the hard)."""
    soft = math.ceil(_cpu_used() + cpu_s)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    return soft


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
def split_model(model):
    return model[:4], model[4:]
RECIPE = {"optimizer": "%s", "lr": 0.01, "epochs": 1, "batch_size": 2, "momentum": 0.5,
          "augment": %s, "tta": ["hflip"], "train": %s, "cache_features": %s}
"""


def _warm_up(engine, np) -> None:
    """Run every engine once on a tiny built-in strategy, every optimizer.

    torch imports modules lazily on first use (building an optimizer imports torch._dynamo,
    vmap imports torch._functorch); after the privilege drop the interpreter's own files may be
    unreadable, so every lazy import of the engine's code paths has to happen here.
    """
    import torch

    from ftps.ml.strategy import OPTIMIZERS, load_strategy

    x = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 1, 2, 2)
    y = np.array([0, 1, 0, 1], dtype=np.int64)
    runs = [(opt, '["hflip", "random-crop"]', '"all"', "False", "sequential")
            for opt in OPTIMIZERS]
    runs += [("adam", '["hflip"]', '"all"', "False", "stacked"),
             ("adam", "[]", '["4."]', "True", "sequential"),
             ("adam", "[]", '["4."]', "True", "stacked")]
    for optimizer, augment, train, cache, engine_name in runs:
        source = _WARM_UP_STRATEGY % (optimizer, augment, train, cache)
        weights = engine.save_weights(load_strategy(source).build_model())
        engine.finetune_and_score(
            strategy_source=source, base_weights=weights, train_x=x, train_y=y, eval_x=x,
            eval_y=y, models=[(0, 0, np.ones(4, dtype=bool)), (1, 1, np.ones(4, dtype=bool))],
            device="cpu", engine=engine_name,
        )
    torch.manual_seed(0)


def _preload_for(source: str) -> None:
    import importlib

    for name, modules in _PRELOAD_IF_NAMED.items():
        if name in source:
            for module in modules:
                try:
                    importlib.import_module(module)
                except ImportError:
                    pass  # the strategy's own import will say so


def _reap_children() -> None:
    """Collect the zombies of processes a previous job left behind (the worker killed them):
    they would otherwise count against this uid's process limit."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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


def _error(kind: str, message: str, phase: str) -> dict:
    return {"type": kind, "message": message[:_ERROR_MESSAGE_LIMIT], "phase": phase}


class _Job:
    """One job's inputs, read from its directory (written by the parent, read-only to us)."""

    def __init__(self, directory: Path, np, load_records) -> None:
        self.source = (directory / "strategy.txt").read_text(encoding="utf-8")
        self.base_weights = (directory / "base.safetensors").read_bytes()
        spec = json.loads((directory / "job.json").read_text(encoding="utf-8"))
        self.train_x, self.train_y = load_records((directory / "train.npz").read_bytes())
        if spec.get("eval_is_train"):
            self.eval_x, self.eval_y = self.train_x, self.train_y
        else:
            self.eval_x, self.eval_y = load_records((directory / "eval.npz").read_bytes())
        self.builder_x = self.builder_y = None
        if spec["has_builder"]:
            self.builder_x, self.builder_y = load_records(
                (directory / "builder.npz").read_bytes())
        masks = np.load(directory / "masks.npy", allow_pickle=False)
        self.models = [(m["index"], m["seed"], masks[row])
                       for row, m in enumerate(spec["models"])]
        self.builder_mix = spec["builder_mix"]
        self.engine = spec.get("engine")


def serve(root_dir: str) -> int:
    # Relative paths from here on: after the uid drop the root directory's ancestors may not be
    # searchable by the job uid (pytest's tmp dirs are 0700), but our cwd and its parent are.
    home = Path(root_dir) / "home"
    os.chdir(home)
    protocol = _Protocol()
    config = json.loads(Path("../child.json").read_text(encoding="utf-8"))
    device = config.get("device") or "cpu"
    limits = config["limits"]
    status: dict = {}
    try:
        status["limits"] = _apply_limits(limits, device)
        status["network"] = _isolate_network()
        import importlib

        for name in _PRELOAD:
            importlib.import_module(name)
        import numpy as np
        import torch

        from ftps.ml import engine
        from ftps.ml.datasets import load_records
        from ftps.ml.strategy import EngineError, describe_exception

        _warm_up(engine, np)
    except BaseException as e:  # noqa: BLE001 - anything here is a setup failure
        kind = "MemoryError" if _is_memory_failure(e) else type(e).__name__
        protocol.send({"setup_error": _error(kind, str(e), "setup")})
        return 2
    protocol.send({"ready": True})

    dropped = False
    while True:
        job = protocol.next_job(float(config.get("idle_exit_s", 3600)))
        if job is None:
            return 0
        k = job["job"]
        _reap_children()
        try:
            inputs = _Job(Path(job["in"]), np, load_records)
            if not dropped:
                _preload_for(inputs.source)
                status["privileges"] = _drop_privileges(limits.get("uid"))
                dropped = True
                protocol.send({"job": k, "sandbox": status})
            cpu_soft_s = _job_cpu_limit(float(job["cpu_s"]))
        except BaseException as e:  # noqa: BLE001 - before any strategy code: a setup failure
            kind = "MemoryError" if _is_memory_failure(e) else type(e).__name__
            protocol.send({"job": k, "error": _error(kind, str(e), "setup")})
            return 2
        # Process-wide state a previous job of this task may have changed.
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        info: dict = {"cpu_soft_s": cpu_soft_s}
        try:
            phi = engine.finetune_and_score(
                strategy_source=inputs.source,
                base_weights=inputs.base_weights,
                train_x=inputs.train_x,
                train_y=inputs.train_y,
                eval_x=inputs.eval_x,
                eval_y=inputs.eval_y,
                models=inputs.models,
                builder_x=inputs.builder_x,
                builder_y=inputs.builder_y,
                builder_mix=inputs.builder_mix,
                device=device,
                engine=inputs.engine,
                info=info,
                progress=lambda done, total: protocol.send(
                    {"job": k, "done": done, "total": total}),
            )
        except BaseException as e:  # noqa: BLE001 - every failure becomes a report
            if isinstance(e, EngineError):
                report = _error(type(e).__name__, str(e), "job")
            elif _is_memory_failure(e):
                report = _error("MemoryError", str(e) or type(e).__name__, "job")
            else:
                report = _error("InternalError", describe_exception(e), "job")
            protocol.send({"job": k, "error": report})
            # The strategy failed: this child's state is suspect, the parent discards it.
            return 2
        out = Path(job["out"])
        tmp = out / "phi.tmp.npy"
        np.save(tmp, phi, allow_pickle=False)
        os.replace(tmp, out / "phi.npy")
        protocol.send({"job": k, "finished": True,
                       "info": {key: v for key, v in info.items()
                                if isinstance(v, (str, int, float, bool))}})


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        print("usage: python -m services.finetune_worker.sandbox_child ROOT", file=sys.stderr)
        os._exit(64)
    try:
        code = serve(argv[1])
    except BaseException as e:  # noqa: BLE001
        print(f"sandbox child failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 70
    sys.stderr.flush()
    # Skip interpreter teardown: atexit handlers and finalizers a strategy registered never run.
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
