"""Reading tasks from the builder registry, for the services that need them (gateway, scorer)."""

from __future__ import annotations

import threading
import time
from typing import Callable

import grpc

from ftps.common.errors import FailedPrecondition
from ftps.common.rpc_status import from_rpc_error
from ftps.v1 import registry_pb2, registry_pb2_grpc


def registry_getter(channel: grpc.Channel, *, timeout: float = 30.0,
                    cache_s: float = 0.0) -> Callable[[str], registry_pb2.Task]:
    """``get_task(task_id)``; a registry status is relayed as the matching domain error.

    ``cache_s`` > 0 keeps each task that long: for callers that read only what never changes after
    creation (settings, owner) — the gateway, once per submit. The scorer needs the current blob
    refs and asks every time."""
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(channel)
    cache: dict[str, tuple[float, registry_pb2.Task]] = {}
    lock = threading.Lock()

    def get_task(task_id: str) -> registry_pb2.Task:
        if cache_s > 0:
            with lock:
                hit = cache.get(task_id)
            if hit is not None and time.monotonic() - hit[0] < cache_s:
                return hit[1]
        try:
            task = stub.GetTask(registry_pb2.GetTaskRequest(task_id=task_id), timeout=timeout,
                                wait_for_ready=True)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, context="registry") from exc
        if cache_s > 0:
            with lock:
                if len(cache) > 10_000:
                    cache.clear()
                cache[task_id] = (time.monotonic(), task)
        return task

    return get_task


def require_ready(task: registry_pb2.Task) -> None:
    """FailedPrecondition unless the task's uploads are all in (and its base model was checked
    against its strategy, where the registry checks models)."""
    missing = [f for f in ("base_model", "strategy", "builder_data") if not getattr(task, f).key]
    if missing:
        raise FailedPrecondition(f"task {task.task_id} is missing uploads: {', '.join(missing)}",
                                 reason="TASK_NOT_READY")
    if not task.ready:
        raise FailedPrecondition(f"task {task.task_id}: its base model was not checked against its strategy "
                                 "(uploaded with defer_check): upload one of them again", reason="TASK_NOT_READY")
