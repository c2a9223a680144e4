"""The multi-process local mode: every service, N fine-tune workers among them, and (unless blobs
are files) the object store, each a separate OS process on loopback.

Each service starts exactly as its pod does (``python -m services.<name>``, settings in ``FTPS_*``
environment variables), so this mode exercises what Kubernetes runs: separate address spaces, gRPC
between processes, the scorer's worker pool fanning jobs out over several workers. The parent picks
free ports, creates the bucket (the Job's role in Kubernetes), waits until every service reports
SERVING on grpc.health.v1, and stops them all (SIGTERM, then SIGKILL after a grace period).

Once up, a supervisor thread restarts any process that dies, on the same port and settings (as a
Deployment's restart policy would), with backoff: 0.5 s doubling to 30 s between tries, back to
0.5 s once a process stayed up 60 s. ``persistent=True`` (``ftps-stack up --processes``) keeps
metadata and blobs in the data dir exactly as the embedded stack does (:mod:`stack.embedded`);
otherwise blobs live in an in-memory S3 server process and metadata in a temporary SQLite file.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ftps.common import grpcutil
from ftps.common.cpus import usable_cpus
from ftps.common.log import log_format
from stack.embedded import (
    DEFAULT_PORTS,
    blob_dir,
    default_data_dir,
    metadata_url,
    signing_key_file,
)

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# name -> (module started with ``python -m``, its service in grpc.health.v1)
SERVICES = {
    "registry": ("services.builder_registry", "ftps.v1.BuilderRegistryService"),
    "worker": ("services.finetune_worker", "ftps.v1.FinetuneWorkerService"),
    "scorer": ("services.lira_scorer", "ftps.v1.LiraScorerService"),
    "gateway": ("services.contributor_gateway", "ftps.v1.ContributorGatewayService"),
}
S3_MODULE = "stack.s3server"
S3_ACCESS_KEY, S3_SECRET_KEY = "ftps", "ftps-secret-key"


@dataclass
class Child:
    """One started process: what it is, where it listens, where its output goes."""

    name: str  # "s3", "registry", "scorer", "gateway", "worker-0", "worker-1", ...
    address: str
    log_path: Path
    proc: subprocess.Popen
    # What started it, to start it again the same way.
    module_args: list[str] = field(default_factory=list)
    env: Mapping[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessStack:
    """``ProcessStack(workers=2).start()`` -> addresses; ``stop()`` ends every process.

    ``ports`` takes the keys of :data:`stack.embedded.DEFAULT_PORTS`; 0 (or a missing key)
    picks a free port. Worker i listens on ``ports["worker"] + i`` (or a free port each).
    Each process's output goes to ``log_dir/<name>.log`` (default: the data dir's ``logs/``).
    ``env`` is added to every service's environment, ``worker_env`` to the workers'. Inherited
    ``FTPS_*`` variables that are service settings are dropped, so the stack is configured only
    by what is passed here; others (``FTPS_TORCH_THREADS``, ...) pass through. ``persistent``
    keeps metadata and blobs in ``data_dir`` (module docstring). A process that dies is restarted
    (module docstring; ``restarts`` counts them per name).
    """

    # Restart backoff, seconds: first delay, cap, and the uptime after which it starts over.
    RESTART_DELAY_S = 0.5
    RESTART_MAX_DELAY_S = 30.0
    RESTART_RESET_AFTER_S = 60.0

    def __init__(self, *, workers: int = 1, host: str = "127.0.0.1", ports: Mapping[str, int] | None = None,
                 bucket: str = "ftps", data_dir: Path | None = None, auth: bool = True,
                 log_dir: Path | None = None, log_level: str = "INFO", env: Mapping[str, str] | None = None,
                 worker_env: Mapping[str, str] | None = None, startup_timeout: float = 90.0,
                 persistent: bool = False, metrics: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.host = host
        self.ports = {name: 0 for name in DEFAULT_PORTS} | dict(ports or {})
        self.bucket = bucket
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.auth = auth
        self.log_dir = Path(log_dir) if log_dir is not None else self.data_dir / "logs"
        self.log_level = log_level
        self.env = dict(env or {})
        self.worker_env = dict(worker_env or {})
        self.startup_timeout = startup_timeout
        self.persistent = persistent
        self.metrics = metrics  # each service's /metrics on a free port (metrics_addresses)
        self.metrics_addresses: dict[str, str] = {}  # "gateway", "worker-0", ... -> http://host:port/metrics
        self.addresses: dict[str, str] = {}
        self.worker_addresses: list[str] = []
        self.children: dict[str, Child] = {}
        self.restarts: dict[str, int] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> dict[str, str]:
        """Start everything and wait until it is healthy; on any failure stop what started."""
        self._stopping.clear()
        try:
            self._start()
        except BaseException:
            self.stop(grace=2.0)
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
        self._supervisor.start()
        return self.addresses

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        services = ["registry", "scorer", "gateway"] + [f"worker-{i}" for i in range(self.workers)]
        names = services + ([] if self.persistent else ["s3"])
        metric_names = [f"metrics-{name}" for name in services] if self.metrics else []
        ports = self._pick_ports(names + metric_names)  # in one pass: no port handed out twice
        metrics_ports = {name: ports.pop(f"metrics-{name}") for name in services if self.metrics}
        addr = {name: f"{self._connect_host()}:{port}" for name, port in ports.items()}
        self.worker_addresses = [addr[f"worker-{i}"] for i in range(self.workers)]
        self.addresses = {"registry": addr["registry"], "scorer": addr["scorer"],
                          "gateway": addr["gateway"], "worker": ",".join(self.worker_addresses)}

        if self.persistent:
            from ftps.common.storage import file_url

            self.addresses["s3"] = file_url(blob_dir(self.data_dir))
            database_url = metadata_url(self.data_dir)
        else:
            self.addresses["s3"] = addr["s3"]
            s3 = self._spawn("s3", [S3_MODULE, "--host", self.host, "--port", str(ports["s3"])], addr["s3"],
                             env={})
            self._ensure_bucket(s3)
            # As ephemeral as the in-memory object store beside it.
            self._tmp = tempfile.TemporaryDirectory(prefix="ftps-meta-")
            database_url = f"sqlite:///{self._tmp.name}/metadata.db"

        common = {"FTPS_S3_ENDPOINT": self.addresses["s3"], "FTPS_S3_BUCKET": self.bucket,
                  "FTPS_S3_ACCESS_KEY": S3_ACCESS_KEY, "FTPS_S3_SECRET_KEY": S3_SECRET_KEY,
                  "FTPS_LOG_LEVEL": self.log_level,
                  # The parent's log format (FTPS_LOG_FORMAT; inherited FTPS_* settings are dropped).
                  "FTPS_LOG_FORMAT": log_format(),
                  # One SQLite file shared by the services, each with tables of its own.
                  "FTPS_DATABASE_URL": database_url}
        if self.auth:
            from ftps.common.auth import load_or_create_key_file

            load_or_create_key_file(self.key_file)  # generated once, kept: tokens outlive a restart
            common["FTPS_AUTH_KEY_FILE"] = str(self.key_file)
        else:
            common["FTPS_AUTH_DISABLED"] = "true"  # the services refuse to start with neither
        common |= self.env
        listen = {name: f"{self.host}:{port}" for name, port in ports.items()}
        self.metrics_addresses = {name: f"http://{self._connect_host()}:{port}/metrics"
                                  for name, port in metrics_ports.items()}

        def metrics_env(name: str) -> dict[str, str]:
            return {"FTPS_METRICS_LISTEN": f"{self.host}:{metrics_ports[name]}"} if name in metrics_ports else {}
        worker_env = dict(self.worker_env)
        if "FTPS_TORCH_THREADS" not in worker_env and "FTPS_TORCH_THREADS" not in os.environ:
            # N workers on one machine: share the CPUs instead of each taking all of them.
            worker_env["FTPS_TORCH_THREADS"] = str(max(1, usable_cpus() // self.workers))
        started = [self._spawn("registry", ["services.builder_registry"], addr["registry"],
                               env=common | metrics_env("registry") | {
                                   "FTPS_LISTEN": listen["registry"], "FTPS_WORKER_ADDRS": self.addresses["worker"]})]
        for i in range(self.workers):
            name = f"worker-{i}"
            started.append(self._spawn(name, ["services.finetune_worker"], addr[name], env=common | metrics_env(name) | {
                "FTPS_LISTEN": listen[name], "FTPS_WORKER_ID": name} | worker_env))
        started.append(self._spawn("scorer", ["services.lira_scorer"], addr["scorer"],
                                   env=common | metrics_env("scorer") | {
                                       "FTPS_LISTEN": listen["scorer"], "FTPS_REGISTRY_ADDR": addr["registry"],
                                       "FTPS_WORKER_ADDRS": self.addresses["worker"]}))
        started.append(self._spawn("gateway", ["services.contributor_gateway"], addr["gateway"],
                                   env=common | metrics_env("gateway") | {
                                       "FTPS_LISTEN": listen["gateway"], "FTPS_REGISTRY_ADDR": addr["registry"],
                                       "FTPS_SCORER_ADDR": addr["scorer"]}))
        # They start concurrently (imports dominate); each is then waited for in turn.
        deadline = time.monotonic() + self.startup_timeout
        for child in started:
            self._wait_healthy(child, deadline)

    def stop(self, grace: float = 10.0) -> None:
        """Stop restarting, then SIGTERM every process, SIGKILL (with whatever it started) those
        alive after ``grace``."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        children = list(reversed(self.children.values()))
        for child in children:
            _signal(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # e.g. a worker still waiting on a job; its sandbox child runs in a session of its
                # own, so it is found by parentage, not by process group.
                stragglers = _descendants(child.proc.pid)
                log.warning("%s did not stop within %.0fs; killing it and %d process(es) it started",
                            child.name, grace, len(stragglers))
                for pid in [child.proc.pid, *stragglers]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                child.proc.wait(timeout=10)
        self.children.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def exited(self) -> list[str]:
        """Names of the processes that are not running now (the supervisor restarts them)."""
        return [c.name for c in list(self.children.values()) if c.proc.poll() is not None]

    # -- supervision ---------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Restart every process that dies, with backoff per process, until :meth:`stop`."""
        delay: dict[str, float] = {}
        due: dict[str, float] = {}  # name -> when to start it again
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            for child in list(self.children.values()):
                name = child.name
                if child.proc.poll() is None:
                    continue
                if name not in due:
                    uptime = now - child.started_at
                    if uptime >= self.RESTART_RESET_AFTER_S or name not in delay:
                        delay[name] = self.RESTART_DELAY_S
                    due[name] = now + delay[name]
                    log.error("%s (pid %d) exited with code %s after %.1fs; restarting it in %.1fs "
                              "(log %s)", name, child.proc.pid, child.proc.returncode, uptime,
                              delay[name], child.log_path)
                    continue
                if now < due[name]:
                    continue
                del due[name]
                delay[name] = min(delay[name] * 2, self.RESTART_MAX_DELAY_S)
                try:
                    again = self._spawn(name, child.module_args, child.address, env=child.env, append=True)
                except OSError as exc:  # e.g. out of processes: try again after the next delay
                    log.error("%s could not be restarted: %s", name, exc)
                    due[name] = time.monotonic() + delay[name]
                    continue
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.warning("restarted %s (pid %d) on %s, restart %d", name, again.proc.pid,
                            child.address, self.restarts[name])
                if name == "s3":  # an in-memory store comes back empty, without the bucket
                    try:
                        self._ensure_bucket(again)
                    except RuntimeError as exc:
                        log.error("%s", exc)

    def __enter__(self) -> "ProcessStack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- auth ----------------------------------------------------------------------------------
    @property
    def key_file(self) -> Path:
        return signing_key_file(self.data_dir)

    def signer(self):
        """The token signer of this stack (None when auth is off)."""
        from ftps.common.auth import TokenSigner, load_or_create_key_file

        return TokenSigner(load_or_create_key_file(self.key_file)) if self.auth else None

    # -- helpers -------------------------------------------------------------------------------
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def _pick_ports(self, names: list[str]) -> dict[str, int]:
        """Explicit ports as given; free ports for the rest. The probe sockets stay open until all
        are chosen, or the OS could hand the same free port out twice."""
        out: dict[str, int] = {}
        probes: list[socket.socket] = []
        try:
            for name in names:
                kind, _, index = name.partition("-")
                given = self.ports.get(kind, 0)
                if given:
                    out[name] = given + (int(index) if index else 0)
                    continue
                s = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
                s.bind((self.host, 0))
                probes.append(s)
                out[name] = s.getsockname()[1]
        finally:
            for s in probes:
                s.close()
        return out

    def _child_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        settings = _settings_env_names()
        env = {k: v for k, v in os.environ.items() if k not in settings}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
        env["PYTHONUNBUFFERED"] = "1"
        env[grpcutil.PARENT_PID_ENV] = str(os.getpid())  # the children die with this process, even when it is killed
        env.update(extra)
        return env

    def _spawn(self, name: str, module_args: list[str], address: str, *, env: Mapping[str, str],
               append: bool = False) -> Child:
        log_path = self.log_dir / f"{name}.log"
        # One run of the stack per file; a restart appends, keeping what the dead process said.
        with open(log_path, "ab" if append else "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", *module_args], env=self._child_env(env),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=PROJECT_ROOT, start_new_session=True)
        child = Child(name=name, address=address, log_path=log_path, proc=proc,
                      module_args=list(module_args), env=dict(env))
        self.children[name] = child
        log.debug("started %s (pid %d) on %s", name, proc.pid, address)
        return child

    def _died(self, child: Child) -> RuntimeError:
        return RuntimeError(f"{child.name} exited with code {child.proc.returncode} before it was ready "
                            f"(log {child.log_path}):\n{child.log_tail()}")

    def _ensure_bucket(self, s3: Child) -> None:
        from ftps.common.errors import Unavailable
        from ftps.common.settings import StorageSettings
        from ftps.common.storage import ObjectStore

        store = ObjectStore(StorageSettings(s3_endpoint=s3.address, s3_bucket=self.bucket,
                                            s3_access_key=S3_ACCESS_KEY, s3_secret_key=S3_SECRET_KEY),
                            retries=0)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if s3.proc.poll() is not None:
                raise self._died(s3)
            try:
                store.ensure_bucket()
                return
            except Unavailable:
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise RuntimeError(f"the object store on {s3.address} did not answer within "
                                       f"{self.startup_timeout:.0f}s") from None
                time.sleep(0.1)

    def _wait_healthy(self, child: Child, deadline: float) -> None:
        service = SERVICES[child.name.partition("-")[0]][1]
        while True:
            if child.proc.poll() is not None:
                raise self._died(child)
            # A fresh channel per try: a reused one backs off ever longer between reconnects.
            channel = grpcutil.make_channel(child.address)
            try:
                grpcutil.wait_healthy(channel, timeout=0.5, service=service)
                return
            except (grpc.FutureTimeoutError, grpc.RpcError, RuntimeError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} on {child.address} was not healthy within "
                                       f"{self.startup_timeout:.0f}s (log {child.log_path}):\n"
                                       f"{child.log_tail()}") from None
            finally:
                channel.close()


def _settings_env_names() -> set[str]:
    """``FTPS_<FIELD>`` of every service's settings."""
    from services.builder_registry.config import RegistrySettings
    from services.contributor_gateway.config import GatewaySettings
    from services.finetune_worker.config import WorkerSettings
    from services.lira_scorer.config import ScorerSettings

    return {"FTPS_" + name.upper()
            for cls in (RegistrySettings, GatewaySettings, WorkerSettings, ScorerSettings)
            for name in cls.model_fields}


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the ppid is the 2nd field after the last ')'.
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
