"""The sandboxed child: ``python -m services.finetune_worker.sandbox_child ROOT``.

Started by ``services.finetune_worker.sandbox.SandboxChild``; see there for the protocol. One
child serves the jobs of one task, one at a time, until its parent closes its job channel.

Order matters: limits, namespaces and the Landlock restriction while the process is still
single-threaded and before anything untrusted runs; imports and the engine's warm-up while still
privileged; the first job's input files and the modules its strategy needs while still
privileged; then the privilege drop; only then the strategy. Only the standard library is
imported at module level, so that ``unshare(CLONE_NEWUSER)`` and ``landlock_restrict_self``
(which require, or only cover, a single-threaded process) still can.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import stat
import sys
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]
# The repository's packages a child imports (the rest of the repository stays unreadable).
_REPO_PACKAGES = ("ftps", "services")

# Landlock (linux/landlock.h): the same syscall numbers on every architecture but alpha.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_READ = _FS_READ_FILE | _FS_READ_DIR
_READ_EXEC = _READ | _FS_EXECUTE
# System files a process may need after the restriction (the dynamic loader, name lookups,
# time zones); nothing else of /etc (where deployments mount secrets) is readable.
_ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
    "nsswitch.conf", "hosts", "host.conf", "gai.conf", "resolv.conf", "protocols", "services",
    "os-release", "mime.types",
)
_ERROR_MESSAGE_LIMIT = 4096

# Modules a strategy may import that live outside site-packages: imported here while still
# privileged, since the job uid may be unable to read the interpreter's standard library.
_PRELOAD = (
    "abc", "collections", "copy", "dataclasses", "encodings.idna", "functools", "itertools",
    "json", "logging", "math", "numbers", "operator", "random", "re", "socket", "statistics",
    "time", "traceback", "typing", "warnings",
)
# Imported before the privilege drop only when the first job's strategy names them as a word
# (torchvision alone adds ~1-2 s to a child's start-up, opacus ~3-9 s).
_PRELOAD_IF_NAMED = {
    "torchvision": ("torchvision", "torchvision.models"),
    # a RECIPE with "dp" (DP-SGD): the engine imports opacus on first use, which after the drop
    # fails on files of the interpreter's the job uid cannot read
    "dp": ("opacus", "opacus.accountants", "opacus.accountants.utils", "opacus.optimizers"),
}


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


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_abi(libc: ctypes.CDLL) -> int:
    """The kernel's Landlock ABI version (> 0), or -errno when it has none."""
    abi = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return abi if abi > 0 else -ctypes.get_errno()


def _readable_paths(device: str, sandbox_root: str) -> list[tuple[str, int]]:
    """What a child may still read (execute, write) once restricted: the interpreter and its
    import path, the repository's packages, system libraries and a few system files, /proc and
    /sys, a few devices (all of /dev on CUDA). Its own sandbox root is added by the caller."""
    rules: list[tuple[str, int]] = []
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        rules.append((d, _READ_EXEC))
    for d in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable))}:
        rules.append((d, _READ_EXEC))
    repo = str(REPO_ROOT)
    for entry in sys.path:
        if not entry:
            continue
        entry = os.path.realpath(entry)
        contains = [p for p in (repo, sandbox_root) if p == entry or p.startswith(entry + "/")]
        # A path entry holding the repository (or the scratch directories) may be listed (the
        # import system lists it) but not read beyond the packages named below.
        rules.append((entry, _FS_READ_DIR if contains else _READ_EXEC))
    rules.append((repo, _FS_READ_DIR))
    rules += [(os.path.join(repo, name), _READ) for name in _REPO_PACKAGES]
    rules += [(os.path.join("/etc", name), _READ) for name in _ETC_FILES]
    rules += [("/proc", _READ), ("/sys", _READ)]
    rules += [("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV),
              ("/dev/zero", _FS_READ_FILE), ("/dev/full", _FS_READ_FILE | _FS_WRITE_FILE),
              ("/dev/random", _FS_READ_FILE), ("/dev/urandom", _FS_READ_FILE)]
    if device.startswith("cuda"):
        rules.append(("/dev", _READ | _FS_WRITE_FILE | _FS_IOCTL_DEV))
    return rules


def _restrict_filesystem(device: str, *, network_isolated: bool) -> dict:
    """Landlock this process and everything it starts: files are readable only where
    ``_readable_paths`` says, writable only beneath the sandbox root (our cwd's parent: the
    scratch home and the job directories); other processes cannot be ptraced (their
    /proc/PID/environ, mem, fd included) and, with ABI >= 6, not signalled; without a network
    namespace of our own, TCP bind and connect are refused (ABI >= 4).

    Must run while the process is single-threaded: Landlock restricts the calling thread and
    the threads and processes it creates, not threads that already exist. Fails open, like the
    network namespace: the status says what happened and the parent logs a warning.
    """
    if sys.platform != "linux":
        return {"restricted": False, "detail": f"not supported on {sys.platform}"}
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # pragma: no cover - serve() calls us before anything starts a thread
        return {"restricted": False, "detail": f"{threads} threads: too late to restrict"}
    try:
        libc = _libc()
        libc.syscall.restype = ctypes.c_long
    except OSError as e:
        return {"restricted": False, "detail": f"no libc: {e}"}
    abi = _landlock_abi(libc)
    if abi <= 0:
        return {"restricted": False, "detail": f"no Landlock: {os.strerror(-abi)}"}
    handled = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        handled |= _FS_REFER
    if abi >= 3:
        handled |= _FS_TRUNCATE
    if abi >= 5:
        handled |= _FS_IOCTL_DEV
    attr = _RulesetAttr(handled_access_fs=handled)
    size = 8
    if abi >= 4 and not network_isolated:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP  # no rule: none allowed
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                           ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return {"restricted": False,
                "detail": f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}"}
    try:
        sandbox_root = os.path.realpath("..")
        rules = _readable_paths(device, sandbox_root) + [(sandbox_root, handled)]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # absent here
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _FS_FILE_ONLY
                rule = _PathBeneathAttr(allowed_access=access & handled, parent_fd=fd)
                if libc.syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                ctypes.c_uint32(0)) != 0:
                    err = ctypes.get_errno()
                    return {"restricted": False,
                            "detail": f"landlock_add_rule({path}): {os.strerror(err)}"}
            finally:
                os.close(fd)
        # Required of an unprivileged process; the child never gains privileges by exec anyway.
        libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))
        if libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                        ctypes.c_uint32(0)) != 0:
            return {"restricted": False,
                    "detail": f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}"}
    finally:
        os.close(ruleset)
    return {"restricted": True, "detail": f"landlock ABI {abi}", "abi": abi,
            "tcp_denied": bool(attr.handled_access_net), "signals_scoped": abi >= 6}


def _prefer_for_oom_kill() -> int | None:
    """Make this process and all it starts the OOM killer's first choice: RLIMIT_AS bounds each
    process, not a strategy's processes together. A strategy cannot lower it back (/proc is
    read-only under Landlock; a root child's write also sets the floor its job uid is held to)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        return None
    return 1000


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


def _warm_up(engine, jobs, np) -> None:
    """Run every engine once on a tiny built-in strategy, every optimizer.

    torch imports modules lazily on first use (building an optimizer imports torch._dynamo,
    vmap imports torch._functorch); after the privilege drop the interpreter's own files may be
    unreadable, so every lazy import of the engine's code paths has to happen here.
    """
    import torch

    from ftps.ml.strategy import OPTIMIZERS, load_strategy

    records = jobs.Records.of(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 1, 2, 2),
                              np.array([0, 1, 0, 1], dtype=np.int64))
    runs = [(opt, '["hflip", "random-crop"]', '"all"', "False", "sequential")
            for opt in OPTIMIZERS]
    runs += [("adam", '["hflip"]', '"all"', "False", "stacked"),
             ("adam", "[]", '["4."]', "True", "sequential"),
             ("adam", "[]", '["4."]', "True", "stacked")]
    for optimizer, augment, train, cache, engine_name in runs:
        source = _WARM_UP_STRATEGY % (optimizer, augment, train, cache)
        weights = engine.save_weights(load_strategy(source).build_model())
        engine.run_job(jobs.FinetuneJob(
            strategy_source=source, base_weights=weights, train_records=records,
            models=((0, 0, np.ones(4, dtype=bool)), (1, 1, np.ones(4, dtype=bool))),
            engine=engine_name), device="cpu")
    torch.manual_seed(0)


def _preload_for(source: str) -> None:
    import importlib
    import re

    for name, modules in _PRELOAD_IF_NAMED.items():
        if re.search(rf"\b{re.escape(name)}\b", source):
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


def _read_job(directory: Path, jobs, archives):
    """The job its parent wrote into ``directory`` (read-only to us), validated as it enters
    this process (``FinetuneJob.from_files``)."""
    job = jobs.FinetuneJob.from_files(lambda name: (directory / name).read_bytes())
    # Its header and offsets only: the engine loads the tensors (safetensors, never a pickle).
    archives.safetensors_index(job.base_weights, what="base.safetensors")
    return job


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
        status["limits"]["oom_score_adj"] = _prefer_for_oom_kill()
        status["network"] = _isolate_network()
        status["filesystem"] = _restrict_filesystem(
            device, network_isolated=status["network"]["isolated"])
        import importlib

        for name in _PRELOAD:
            importlib.import_module(name)
        import numpy as np
        import torch

        from ftps.common import archives
        from ftps.ml import engine, jobs
        from ftps.ml.strategy import JOB_ERRORS, describe_exception

        _warm_up(engine, jobs, np)
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
            inputs = _read_job(Path(job["in"]), jobs, archives)
            if not dropped:
                _preload_for(inputs.strategy_source)
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
        try:
            result = engine.run_job(inputs, device=device, progress=lambda done, total, k=k: protocol.send(
                {"job": k, "done": done, "total": total}))
        except BaseException as e:  # noqa: BLE001 - every failure becomes a report
            if isinstance(e, JOB_ERRORS):
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
        np.save(tmp, result.phi, allow_pickle=False)
        os.replace(tmp, out / "phi.npy")
        protocol.send({"job": k, "finished": True,
                       "result": {**result.report(), "cpu_limit_s": cpu_soft_s}})


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
