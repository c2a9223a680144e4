"""The embedded default: the four services in one process, on loopback, with their state either
kept in the data dir or thrown away at stop.

The same ``create_server`` functions run each service on its own (``python -m services.X``) and as
pods; here they share a process and talk gRPC over 127.0.0.1 exactly as they would apart.

Kept (``persistent=True``, ``ftps-stack up``): metadata in ``<data_dir>/metadata.db`` (SQLite),
blobs as files under ``<data_dir>/blobs`` (no store server); a restart on the same data dir shows
the same tasks, submissions and scores. Thrown away (the demo, tests): blobs in an S3-protocol
server in memory (moto) and metadata in a temporary SQLite file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ftps.common import grpcutil
from ftps.common.embedded_s3 import EmbeddedS3

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"gateway": 50051, "registry": 50052, "scorer": 50053, "worker": 50054, "s3": 9000}


def default_data_dir() -> Path:
    return Path(os.environ.get("FTPS_DATA_DIR", Path.home() / ".local" / "share" / "ftps"))


def signing_key_file(data_dir: Path) -> Path:
    return data_dir / "signing.key"


def metadata_url(data_dir: Path) -> str:
    """The kept stacks' metadata database: one SQLite file, each service with tables of its own."""
    return f"sqlite:///{Path(data_dir).resolve()}/metadata.db"


def blob_dir(data_dir: Path) -> Path:
    """The kept stacks' blobs (a :class:`ftps.common.storage.FileBlobStore` folder)."""
    return Path(data_dir).resolve() / "blobs"


@dataclass
class EmbeddedStack:
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    bucket: str = "ftps"
    worker_settings: dict = field(default_factory=dict)
    data_dir: Path = field(default_factory=default_data_dir)
    auth: bool = True
    persistent: bool = False  # keep metadata and blobs in data_dir (see the module's docstring)
    database_url: str = ""  # the services' metadata database; empty: by ``persistent``
    metrics: bool = False  # serve each service's /metrics on a free port (metrics_addresses)
    metrics_addresses: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None
    _servers: list[grpcutil.Server] = field(default_factory=list)
    _s3: EmbeddedS3 | None = None

    def start(self) -> dict[str, str]:
        from services.builder_registry.__main__ import create_server as registry_server
        from services.builder_registry.config import RegistrySettings
        from services.contributor_gateway.__main__ import create_server as gateway_server
        from services.contributor_gateway.config import GatewaySettings
        from services.finetune_worker.__main__ import create_server as worker_server
        from services.finetune_worker.config import WorkerSettings
        from ftps.common.cpus import usable_cpus
        from services.lira_scorer.__main__ import create_server as scorer_server
        from services.lira_scorer.config import ScorerSettings

        from ftps.common import tracing
        from ftps.common.storage import file_url

        # One process, four services: one tracer provider under a neutral name; each server's spans
        # say which service answered (ftps.service). Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set.
        tracing.configure("ftps-stack")
        try:
            if self.persistent:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self.addresses["s3"] = file_url(blob_dir(self.data_dir))
                self.database_url = self.database_url or metadata_url(self.data_dir)
            else:
                self._s3 = EmbeddedS3(self.host, self.ports["s3"])
                self.addresses["s3"] = self._s3.start()
            if not self.database_url:  # as ephemeral as the in-memory object store beside it
                self._tmp = tempfile.TemporaryDirectory(prefix="ftps-meta-")
                self.database_url = f"sqlite:///{self._tmp.name}/metadata.db"
            common = dict(s3_endpoint=self.addresses["s3"], s3_bucket=self.bucket,
                          s3_access_key="ftps", s3_secret_key="ftps-secret-key",
                          database_url=self.database_url)
            if self.auth:
                # Generated on first start, kept in the data dir: tokens outlive a restart.
                from ftps.common.auth import load_or_create_key_file

                load_or_create_key_file(self.key_file)
                common["auth_key_file"] = str(self.key_file)
            else:
                common["auth_disabled"] = True  # the services refuse to start with neither
            if self.metrics:
                common["metrics_listen"] = f"{self.host}:0"
            # Concurrent jobs of one thread each beat one job on every thread on small models
            # (README, Results: 2 processes 1.74x, 2 threads 1.35x); capped for memory.
            worker = {"max_concurrent_jobs": max(1, min(4, usable_cpus()))} | self.worker_settings
            self.addresses["worker"] = self._serve(worker_server(WorkerSettings(**common, **worker)), "worker")
            self.addresses["registry"] = self._serve(registry_server(RegistrySettings(
                **common, worker_addrs=self.addresses["worker"])), "registry")
            self.addresses["scorer"] = self._serve(scorer_server(ScorerSettings(
                **common, registry_addr=self.addresses["registry"], worker_addrs=self.addresses["worker"],
                jobs_per_worker=worker["max_concurrent_jobs"])),
                "scorer")
            self.addresses["gateway"] = self._serve(gateway_server(GatewaySettings(
                **common, registry_addr=self.addresses["registry"], scorer_addr=self.addresses["scorer"])),
                "gateway")
        except BaseException:
            self.stop()
            raise
        return self.addresses

    @property
    def key_file(self) -> Path:
        return signing_key_file(self.data_dir)

    def signer(self):
        """The token signer of this stack (None when auth is off)."""
        from ftps.common.auth import TokenSigner, load_or_create_key_file

        return TokenSigner(load_or_create_key_file(self.key_file)) if self.auth else None

    def _serve(self, server: grpcutil.Server, name: str) -> str:
        listen = f"{self.host}:{self.ports[name]}"
        try:
            port = server.start(listen)
        except (OSError, RuntimeError) as exc:
            raise OSError(f"{name}: cannot listen on {listen} ({exc}); pick another port") from exc
        self._servers.append(server)
        if server.metrics_port is not None:
            self.metrics_addresses[name] = f"http://{self.host}:{server.metrics_port}/metrics"
        return f"{self.host}:{port}"

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop(grace=1.0)
        self._servers.clear()
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.database_url = ""

    def __enter__(self) -> "EmbeddedStack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
