"""python -m services.lira_scorer — serve the LiRA scorer."""

from __future__ import annotations

import sys

from ftps.common import grpcutil
from ftps.common.db import Database
from ftps.common.metrics import ScorerMetrics
from ftps.common.registry_client import registry_getter
from ftps.common.storage import open_blob_store
from ftps.v1 import scorer_pb2, scorer_pb2_grpc
from services.lira_scorer.config import ScorerSettings
from services.lira_scorer.rounds import Scorer
from services.lira_scorer.servicer import LiraScorerServicer
from services.lira_scorer.store import SqlOfflineStore, SqlPreparationStore, SqlRoundStore, migrate
from services.lira_scorer.workers import WorkerPool


def create_server(settings: ScorerSettings) -> grpcutil.Server:
    # First: without a signing key (or auth_disabled) the service must not start, and says so at once.
    security = grpcutil.Security.from_settings(settings, "lira-scorer")
    db = Database(settings.database_url, name="scorer database")
    if settings.db_migrate:
        migrate(db)
    store = open_blob_store(settings)
    store.ensure_bucket()
    targets = [t.strip() for t in settings.worker_addrs.split(",") if t.strip()]
    server = security.server(max_message_mb=settings.max_message_mb, limits=grpcutil.Limits.from_settings(settings),
                             metrics_listen=settings.metrics_listen)
    metrics = ScorerMetrics(server.metrics_registry)
    pool = WorkerPool(targets, jobs_per_worker=settings.jobs_per_worker, timeout_s=settings.job_timeout_s,
                      attempts=settings.job_attempts, max_message_mb=settings.max_message_mb,
                      channel=security.channel, metrics=metrics)
    registry = security.channel(settings.registry_addr, max_message_mb=settings.max_message_mb)
    scorer = Scorer(store, registry_getter(registry), pool, rounds=SqlRoundStore(db), offline=SqlOfflineStore(db),
                    preparations=SqlPreparationStore(db),
                    heldout_max=settings.heldout_max, replica_id=settings.replica_id,
                    lease_s=settings.round_lease_s, metrics=metrics)
    # The lease loop (renewals, takeovers) lives as long as the server; rounds running here are
    # released when it stops, for another replica to take over at once.
    scorer.start()
    server.on_stop(scorer.close)
    server.on_stop(db.dispose)
    server.add(scorer_pb2_grpc.add_LiraScorerServiceServicer_to_server, LiraScorerServicer(scorer),
               grpcutil.full_name(scorer_pb2, "LiraScorerService"))
    return server


def migrate_only(settings: ScorerSettings) -> None:
    db = Database(settings.database_url, name="scorer database")
    try:
        migrate(db)
    finally:
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    return grpcutil.run_service(ScorerSettings, create_server, argv, module="services.lira_scorer",
                                description="FT-PrivacyScore LiRA scorer", migrate=migrate_only)


if __name__ == "__main__":
    sys.exit(main())
