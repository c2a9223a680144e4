"""python -m services.finetune_worker — serve a stateless fine-tune worker."""

from __future__ import annotations

import os
import socket
import sys

from ftps.common import grpcutil
from ftps.common.clock import now_ts
from ftps.common.cpus import usable_cpus
from ftps.common.metrics import WorkerMetrics
from ftps.common.storage import open_blob_store
from ftps.v1 import worker_pb2, worker_pb2_grpc
from services.finetune_worker.config import WorkerSettings
from services.finetune_worker.servicer import FinetuneWorkerServicer
from services.finetune_worker.worker import Worker, pick_device

MiB = 1024 * 1024


def threads_per_job(settings: WorkerSettings) -> int | None:
    """Torch threads of each job's child: the setting; else $FTPS_TORCH_THREADS (passed through);
    else, with concurrent jobs, the CPUs shared among them (None: the child takes every CPU)."""
    if settings.job_threads > 0:
        return settings.job_threads
    if os.environ.get("FTPS_TORCH_THREADS") or settings.max_concurrent_jobs <= 1:
        return None
    return max(1, usable_cpus() // settings.max_concurrent_jobs)


def create_server(settings: WorkerSettings) -> grpcutil.Server:
    # First: without a signing key (or auth_disabled) the service must not start, and says so at once.
    security = grpcutil.Security.from_settings(settings, "finetune-worker")

    import torch

    from ftps.ml.engine import configure_threads

    device = pick_device(settings.device)
    threads = threads_per_job(settings)
    store = open_blob_store(settings)
    server = security.server(
        max_message_mb=settings.max_message_mb, max_connection_age_s=settings.max_connection_age_s,
        limits=grpcutil.Limits.from_settings(settings), metrics_listen=settings.metrics_listen)
    worker = Worker(store, device=device, max_concurrent_jobs=settings.max_concurrent_jobs,
                    timeout_s=settings.job_timeout_s, memory_mb=settings.job_memory_mb,
                    cache_bytes=settings.blob_cache_mb * MiB, engine=settings.engine,
                    precision=settings.precision,
                    warm_sandboxes=settings.warm_sandboxes, sandbox_idle_s=settings.sandbox_idle_s,
                    sandbox_max_jobs=settings.sandbox_max_jobs,
                    spare_sandbox=settings.spare_sandbox, threads=threads,
                    metrics=WorkerMetrics(server.metrics_registry, gpu=device.startswith("cuda")))
    # threads: what every job's child uses (threads_per_job, else configure_threads: $FTPS_TORCH_THREADS,
    # else the CPUs this process may use), not torch's default in this process.
    info = worker_pb2.WorkerInfo(device=device, torch_version=torch.__version__,
                                 threads=threads or configure_threads(),
                                 worker_id=settings.worker_id or f"{socket.gethostname()}",
                                 engine=settings.engine, precision=settings.precision,
                                 started_at=now_ts())
    server.add(worker_pb2_grpc.add_FinetuneWorkerServiceServicer_to_server,
               FinetuneWorkerServicer(worker, info), grpcutil.full_name(worker_pb2, "FinetuneWorkerService"))
    # The warm sandbox children go with the server (they would otherwise wait for this process to
    # exit, which closes their job channel).
    server.on_stop(worker.close)
    return server


def main(argv: list[str] | None = None) -> int:
    return grpcutil.run_service(WorkerSettings, create_server, argv, module="services.finetune_worker",
                                description="FT-PrivacyScore fine-tune worker (stateless)")


if __name__ == "__main__":
    sys.exit(main())
