"""Thin gRPC layer over :mod:`services.lira_scorer.rounds`."""

from __future__ import annotations

from ftps.common.auth import current
from ftps.common.grpcutil import rpc
from ftps.v1 import scorer_pb2_grpc
from services.lira_scorer.rounds import Scorer


class LiraScorerServicer(scorer_pb2_grpc.LiraScorerServiceServicer):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    @rpc
    def StartPreparation(self, request, context):
        return self.scorer.start_preparation(request.task_id, refit=request.refit, who=current())

    @rpc
    def GetPreparation(self, request, context):
        return self.scorer.get_preparation(request.task_id, current())

    @rpc
    def WatchPreparation(self, request, context):
        yield from self.scorer.watch_preparation(request.task_id, is_active=context.is_active, who=current())

    @rpc
    def StartScoring(self, request, context):
        return self.scorer.start_round(request.task_id, request.round_id, request.batch,
                                       list(request.record_ids), list(request.contributors), current())

    @rpc
    def WatchScoring(self, request, context):
        yield from self.scorer.watch(request.round_id, is_active=context.is_active, who=current())

    @rpc
    def GetScoringResult(self, request, context):
        return self.scorer.get_result(request.round_id, current())

    @rpc
    def GrowScoring(self, request, context):
        return self.scorer.grow_round(request.round_id, request.add_models, current())

    @rpc
    def CompareScoringRecipes(self, request, context):
        return self.scorer.compare_recipes(request.round_id, list(request.alternatives), current())

    @rpc
    def GetScoringComparison(self, request, context):
        return self.scorer.get_comparison(request.round_id, current())

    @rpc
    def EstimateRound(self, request, context):
        return self.scorer.estimate_round(request.task_id, n_models=request.n_models, n_records=request.n_records,
                                          who=current())
