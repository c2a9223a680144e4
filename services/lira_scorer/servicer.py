"""Thin gRPC layer over :mod:`services.lira_scorer.rounds`."""

from __future__ import annotations

from ftps.common.auth import current
from ftps.common.grpcutil import rpc
from ftps.v1 import scorer_pb2_grpc
from services.lira_scorer.rounds import Scorer


class LiraScorerServicer(scorer_pb2_grpc.LiraScorerServicer):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    @rpc
    def PrepareOffline(self, request, context):
        return self.scorer.prepare_offline(request.task_id, refit=request.refit, who=current())

    @rpc
    def GetOffline(self, request, context):
        return self.scorer.get_offline(request.task_id, current())

    @rpc
    def StartRound(self, request, context):
        return self.scorer.start_round(request.task_id, request.round_id, request.batch,
                                       list(request.record_ids), list(request.contributors), current())

    @rpc
    def WatchRound(self, request, context):
        yield from self.scorer.watch(request.round_id, is_active=context.is_active, who=current())

    @rpc
    def GetResult(self, request, context):
        return self.scorer.get_result(request.round_id, current())
