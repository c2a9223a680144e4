"""Thin gRPC layer over :mod:`services.finetune_worker.worker`."""

from __future__ import annotations

from ftps.common.auth import current
from ftps.common.grpcutil import rpc
from ftps.v1 import worker_pb2, worker_pb2_grpc
from services.finetune_worker.worker import Worker


class FinetuneWorkerServicer(worker_pb2_grpc.FinetuneWorkerServiceServicer):
    def __init__(self, worker: Worker, info: worker_pb2.WorkerInfo) -> None:
        self.worker = worker
        self.info = info

    @rpc
    def RunJob(self, request, context):
        current().require_role("service", "admin", what="run fine-tuning jobs")
        return self.worker.run_job(request.job)

    @rpc
    def CheckModel(self, request, context):
        current().require_role("service", "admin", what="check models")
        return self.worker.check_model(request)

    @rpc
    def GetInfo(self, request, context):
        current().require_role("service", "admin", what="read worker info")
        return self.info
