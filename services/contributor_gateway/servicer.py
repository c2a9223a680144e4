"""Thin gRPC layer over :mod:`services.contributor_gateway.gateway`."""

from __future__ import annotations

from ftps.common.auth import current
from ftps.common.errors import InvalidArgument
from ftps.common.grpcutil import rpc
from ftps.common.serde import array_from_tensor
from ftps.v1 import gateway_pb2_grpc
from services.contributor_gateway.gateway import Gateway


class ContributorGatewayServicer(gateway_pb2_grpc.ContributorGatewayServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @rpc
    def SubmitRecords(self, request, context):
        if not request.HasField("records"):
            raise InvalidArgument("records is required", reason="FIELD_REQUIRED", field="records")
        x = array_from_tensor(request.records.x, field="records.x")
        y = array_from_tensor(request.records.y, field="records.y")
        return self.gateway.submit(request.task_id, request.contributor, x, y, request.idempotency_key, current())

    @rpc
    def GetSubmission(self, request, context):
        return self.gateway.get_submission(request.submission_id, current())

    @rpc
    def ListSubmissions(self, request, context):
        return self.gateway.list_submissions(request.task_id, request.contributor, request.page_size,
                                             request.page_token, current())

    @rpc
    def GetScores(self, request, context):
        return self.gateway.get_scores(request.task_id, request.contributor, request.round_id, current(),
                                       page_size=request.page_size, page_token=request.page_token)

    @rpc
    def WatchScores(self, request, context):
        yield from self.gateway.watch_scores(request.task_id, request.contributor, is_active=context.is_active,
                                             who=current(), round_id=request.round_id)

    @rpc
    def StartRound(self, request, context):
        return self.gateway.start_round(request.task_id, force=request.force, who=current())

    @rpc
    def GrowRound(self, request, context):
        return self.gateway.grow_round(request.round_id, request.add_models, current())

    @rpc
    def CompareRecipes(self, request, context):
        return self.gateway.compare_recipes(request.round_id, list(request.alternatives), current())

    @rpc
    def GetComparison(self, request, context):
        return self.gateway.get_comparison(request.round_id, current())

    @rpc
    def GetRound(self, request, context):
        return self.gateway.get_round(request.round_id, current())

    @rpc
    def WatchRound(self, request, context):
        yield from self.gateway.watch_round(request.round_id, is_active=context.is_active, who=current())
