"""The upload check of a base model against its strategy, run by a fine-tune worker.

The registry never runs uploaded code: it asks a worker (``FinetuneWorker.CheckModel``), which
builds the strategy's model in its sandbox, loads the weights and runs probe records of the
task's shape through it.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import grpc

from ftps.common.errors import FtpsError, Unavailable
from ftps.common.rpc_status import from_rpc_error
from ftps.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class ModelChecker(Protocol):
    def check(self, task_id: str, base_model: common_pb2.BlobRef, strategy: common_pb2.BlobRef,
              settings: common_pb2.TaskSettings) -> common_pb2.ModelCheck:
        """The check's result; FailedPrecondition if they do not fit, Unavailable if no worker answers."""
        ...


class WorkerChecker:
    """Asks the workers at ``targets`` in turn until one answers (a worker that is down or busy
    past the deadline is skipped)."""

    def __init__(self, targets: list[str], channel: Callable[[str], grpc.Channel], *, timeout_s: float) -> None:
        if not targets:
            raise ValueError("WorkerChecker needs at least one worker target")
        self._targets = targets
        self._stubs = [worker_pb2_grpc.FinetuneWorkerServiceStub(channel(t)) for t in targets]
        self._timeout_s = timeout_s

    def check(self, task_id: str, base_model: common_pb2.BlobRef, strategy: common_pb2.BlobRef,
              settings: common_pb2.TaskSettings) -> common_pb2.ModelCheck:
        request = worker_pb2.CheckModelRequest(task_id=task_id, base_model=base_model, strategy=strategy,
                                               record_shape=settings.record_shape,
                                               num_classes=settings.num_classes)
        last: FtpsError | None = None
        for target, stub in zip(self._targets, self._stubs, strict=True):
            try:
                return stub.CheckModel(request, timeout=self._timeout_s)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                if not isinstance(err, Unavailable):
                    raise err from exc  # the worker's answer, e.g. why the weights do not fit
                err = from_rpc_error(exc, context=f"fine-tune worker {target}")
                log.warning("model check for task %s: %s", task_id, err)
                last = err
        raise Unavailable(f"cannot check the base model against the strategy: no fine-tune worker answered "
                          f"({last}); upload again later", reason="WORKERS_UNAVAILABLE")
