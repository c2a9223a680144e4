"""Reading tasks from the builder registry, for the services that need them (gateway, scorer)."""

from __future__ import annotations

from typing import Callable

import grpc

from ftps.common.errors import from_rpc_error
from ftps.v1 import registry_pb2, registry_pb2_grpc


def registry_getter(channel: grpc.Channel, *, timeout: float = 30.0) -> Callable[[str], registry_pb2.Task]:
    """``get_task(task_id)``; a registry status is relayed as the matching domain error."""
    stub = registry_pb2_grpc.BuilderRegistryStub(channel)

    def get_task(task_id: str) -> registry_pb2.Task:
        try:
            return stub.GetTask(registry_pb2.GetTaskRequest(task_id=task_id), timeout=timeout,
                                wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="registry") from exc

    return get_task
