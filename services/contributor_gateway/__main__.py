"""python -m services.contributor_gateway — serve the contributor gateway."""

from __future__ import annotations

import sys
from typing import Iterator

import grpc

from ftps.common import grpcutil
from ftps.common.db import Database
from ftps.common.rpc_status import from_rpc_error
from ftps.common.metrics import GatewayMetrics
from ftps.common.registry_client import registry_getter
from ftps.common.storage import open_blob_store
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from services.contributor_gateway.config import GatewaySettings
from services.contributor_gateway.gateway import Gateway
from services.contributor_gateway.servicer import ContributorGatewayServicer
from services.contributor_gateway.store import MIGRATIONS, VERSION_TABLE, SqlSubmissionStore


class ScorerClient:
    """The gateway's :class:`ScorerPort` over gRPC; statuses relayed as domain errors."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = scorer_pb2_grpc.LiraScorerServiceStub(channel)

    def start_round(self, task_id, round_id, batch, record_ids, contributors) -> common_pb2.RoundStatus:
        try:
            return self._stub.StartScoring(scorer_pb2.StartScoringRequest(
                task_id=task_id, round_id=round_id, batch=batch, record_ids=record_ids,
                contributors=contributors), timeout=60, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="scorer") from exc

    def watch_round(self, round_id: str) -> Iterator[common_pb2.RoundStatus]:
        try:
            yield from self._stub.WatchScoring(scorer_pb2.WatchScoringRequest(round_id=round_id),
                                             wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="scorer") from exc

    def grow_round(self, round_id: str, add_models: int) -> common_pb2.RoundStatus:
        try:
            return self._stub.GrowScoring(scorer_pb2.GrowScoringRequest(round_id=round_id, add_models=add_models),
                                          timeout=60, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="scorer") from exc

    def compare_recipes(self, round_id: str, alternatives) -> common_pb2.RecipeComparison:
        try:
            return self._stub.CompareScoringRecipes(scorer_pb2.CompareScoringRecipesRequest(
                round_id=round_id, alternatives=alternatives), timeout=120, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="scorer") from exc

    def get_comparison(self, round_id: str) -> common_pb2.RecipeComparison:
        try:
            return self._stub.GetScoringComparison(scorer_pb2.GetScoringComparisonRequest(round_id=round_id),
                                                   timeout=60, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="scorer") from exc

    def get_result(self, round_id: str) -> common_pb2.RoundResult:
        try:
            return self._stub.GetScoringResult(scorer_pb2.GetScoringResultRequest(round_id=round_id), timeout=60,
                                        wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="scorer") from exc


def create_server(settings: GatewaySettings) -> grpcutil.Server:
    # First: without a signing key (or auth_disabled) the service must not start, and says so at once.
    security = grpcutil.Security.from_settings(settings, "contributor-gateway")
    store = open_blob_store(settings)
    store.ensure_bucket()
    registry = security.channel(settings.registry_addr, max_message_mb=settings.max_message_mb)
    scorer = security.channel(settings.scorer_addr, max_message_mb=settings.max_message_mb)
    db = Database(settings.database_url, name="gateway database")
    submissions = SqlSubmissionStore.open(db, migrate=settings.db_migrate)
    server = security.server(max_message_mb=settings.max_message_mb, limits=grpcutil.Limits.from_settings(settings),
                             metrics_listen=settings.metrics_listen)
    gateway = Gateway(store, registry_getter(registry, cache_s=settings.task_cache_s), ScorerClient(scorer),
                      submissions, max_records_per_request=settings.max_records_per_request,
                      max_pending_per_contributor=settings.max_pending_per_contributor,
                      reconcile_s=settings.reconcile_s, round_grace_s=settings.round_grace_s,
                      metrics=GatewayMetrics(server.metrics_registry))
    server.add(gateway_pb2_grpc.add_ContributorGatewayServiceServicer_to_server,
               ContributorGatewayServicer(gateway), grpcutil.full_name(gateway_pb2, "ContributorGatewayService"))
    server.on_stop(gateway.close)
    server.on_stop(db.dispose)
    return server


def migrate(settings: GatewaySettings) -> None:
    """The gateway's tables to the code's version (``--migrate-only``: the migration Job)."""
    db = Database(settings.database_url, name="gateway database")
    try:
        db.migrate(MIGRATIONS, version_table=VERSION_TABLE)
    finally:
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    return grpcutil.run_service(GatewaySettings, create_server, argv, module="services.contributor_gateway",
                                description="FT-PrivacyScore contributor gateway", migrate=migrate)


if __name__ == "__main__":
    sys.exit(main())
