"""python -m services.builder_registry — serve the builder registry."""

from __future__ import annotations

import logging
import sys

from ftps.common import grpcutil
from ftps.common.db import Database
from ftps.common.storage import open_blob_store
from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.builder_registry.checker import WorkerChecker
from services.builder_registry.config import RegistrySettings
from services.builder_registry.registry import Registry
from services.builder_registry.servicer import BuilderRegistryServicer
from services.builder_registry.store import SqlTaskStore

MiB = 1024 * 1024
log = logging.getLogger(__name__)


def open_tasks(settings: RegistrySettings) -> SqlTaskStore:
    return SqlTaskStore(Database(settings.database_url, name="registry database"))


def migrate(settings: RegistrySettings) -> None:
    tasks = open_tasks(settings)
    try:
        tasks.migrate()
    finally:
        tasks.db.dispose()


def create_server(settings: RegistrySettings) -> grpcutil.Server:
    # First: without a signing key (or auth_disabled) the service must not start, and says so at once.
    security = grpcutil.Security.from_settings(settings, "builder-registry")
    tasks = open_tasks(settings)
    if settings.db_migrate:
        tasks.migrate()
    store = open_blob_store(settings)
    store.ensure_bucket()
    targets = [t.strip() for t in settings.worker_addrs.split(",") if t.strip()]
    checker = None
    if targets:
        checker = WorkerChecker(targets, lambda t: security.channel(t, max_message_mb=settings.max_message_mb),
                                timeout_s=settings.check_timeout_s)
    else:
        log.warning("builder registry: no FTPS_WORKER_ADDRS: base models are not checked against their "
                    "strategy at upload (a mismatch fails at round time)")
    registry = Registry(store, tasks, max_bytes={
        common_pb2.BLOB_KIND_BASE_MODEL: settings.max_base_model_mb * MiB,
        common_pb2.BLOB_KIND_STRATEGY: settings.max_strategy_kb * 1024,
        common_pb2.BLOB_KIND_BUILDER_DATA: settings.max_builder_data_mb * MiB,
    }, max_expanded_bytes=settings.max_expanded_mb * MiB, checker=checker)
    server = security.server(max_message_mb=settings.max_message_mb, limits=grpcutil.Limits.from_settings(settings),
                             metrics_listen=settings.metrics_listen)
    server.add(registry_pb2_grpc.add_BuilderRegistryServiceServicer_to_server,
               BuilderRegistryServicer(registry), grpcutil.full_name(registry_pb2, "BuilderRegistryService"))
    return server


def main(argv: list[str] | None = None) -> int:
    return grpcutil.run_service(RegistrySettings, create_server, argv, module="services.builder_registry",
                                description="FT-PrivacyScore builder registry", migrate=migrate)


if __name__ == "__main__":
    sys.exit(main())
