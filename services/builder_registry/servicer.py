"""Thin gRPC layer over :mod:`services.builder_registry.registry`."""

from __future__ import annotations

from ftps.common.auth import current
from ftps.common.grpcutil import rpc
from ftps.v1 import registry_pb2, registry_pb2_grpc
from services.builder_registry.registry import Registry, iter_builder_data, iter_upload


class BuilderRegistryServicer(registry_pb2_grpc.BuilderRegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @rpc
    def CreateTask(self, request, context):
        return self.registry.create_task(request.name, request.settings, request.owner, current())

    @rpc
    def GetTask(self, request, context):
        return self.registry.get_task(request.task_id, current())

    @rpc
    def ListTasks(self, request, context):
        tasks, token = self.registry.list_tasks(current(), size=request.page_size, token=request.page_token)
        return registry_pb2.ListTasksResponse(tasks=tasks, next_page_token=token)

    @rpc
    def UploadBlob(self, request_iterator, context):
        header, chunks = iter_upload(request_iterator)
        return self.registry.upload(header, chunks, current())

    @rpc
    def UploadBuilderData(self, request_iterator, context):
        header, chunks = iter_builder_data(request_iterator)
        return self.registry.upload_records(header, chunks, current())
