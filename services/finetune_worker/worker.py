"""The fine-tune worker's domain logic: validate a job, fetch its blobs, run it in the sandbox."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import numpy as np

from ftps.common import tracing
from ftps.common.errors import FailedPrecondition, InvalidArgument
from ftps.common.metrics import WorkerMetrics
from ftps.common.serde import tensor_from_array
from ftps.common.storage import ObjectStore, check_id
from ftps.ml.jobs import CHECK_ONLY, FinetuneJob, JobResult, ModelSpec
from ftps.ml.strategy import JOB_ERRORS
from ftps.records.builder import builder_data
from ftps.records.npz import Records
from ftps.v1 import common_pb2, worker_pb2
from services.finetune_worker.sandbox import SandboxError, SandboxPool, run_sandboxed

log = logging.getLogger(__name__)

MAX_MODELS_PER_JOB = 1024


class BlobCache:
    """Blobs by sha256 (content-addressed, so never stale), least recently used evicted first."""

    def __init__(self, store: ObjectStore, max_bytes: int) -> None:
        self._store = store
        self._max = max_bytes
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: common_pb2.BlobRef, field: str) -> bytes:
        if not ref.key or not ref.sha256:
            raise InvalidArgument(f"job.{field} is required (key and sha256)", reason="FIELD_REQUIRED",
                                  field=f"job.{field}")
        with self._lock:
            if ref.sha256 in self._items:
                self._items.move_to_end(ref.sha256)
                return self._items[ref.sha256]
        data = self._store.get_ref(ref)
        with self._lock:
            self._items[ref.sha256] = data
            while sum(len(v) for v in self._items.values()) > self._max and len(self._items) > 1:
                self._items.popitem(last=False)
        return data


class Worker:
    """Runs jobs in sandboxed children: with ``warm_sandboxes`` one child per task serves that
    task's jobs (``SandboxPool``), otherwise a fresh child per job (``run_sandboxed``)."""

    def __init__(self, store: ObjectStore, *, device: str, max_concurrent_jobs: int,
                 timeout_s: float, memory_mb: int, cache_bytes: int, engine: str = "auto",
                 precision: str = "auto", warm_sandboxes: bool = True, sandbox_idle_s: float = 300,
                 sandbox_max_jobs: int = 64, spare_sandbox: bool = True, threads: int | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        from ftps.ml.engines import PRECISION_REQUESTS, REQUESTS

        if engine not in REQUESTS:
            raise ValueError(f"engine must be one of {list(REQUESTS)}, got {engine!r}")
        if precision not in PRECISION_REQUESTS:
            raise ValueError(f"precision must be one of {list(PRECISION_REQUESTS)}, got {precision!r}")
        self.device = device
        self.engine = engine
        self.precision = precision
        self._cache = BlobCache(store, cache_bytes)
        self._slots = threading.Semaphore(max_concurrent_jobs)
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._threads = threads
        self._pool: SandboxPool | None = None
        if warm_sandboxes:
            self._pool = SandboxPool(device=device, memory_mb=memory_mb, timeout_s=timeout_s,
                                     max_idle=max(1, max_concurrent_jobs), idle_s=sandbox_idle_s,
                                     max_jobs_per_child=sandbox_max_jobs, spare=spare_sandbox, threads=threads)
            if spare_sandbox:
                self._pool.prestart()
        self._metrics = metrics
        self._cold_children = 0  # without warm sandboxes: one child per running job
        self._cold_lock = threading.Lock()
        if metrics is not None:
            metrics.watch_children(self.sandbox_children_alive)

    def sandbox_children_alive(self) -> int:
        if self._pool is not None:
            return self._pool.children_alive()
        return self._cold_children

    def close(self) -> None:
        """Stop the warm sandbox children (jobs still running finish first)."""
        if self._pool is not None:
            self._pool.close()

    def run_job(self, job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
        with tracing.span("worker.job", ftps__task=job.task_id, ftps__job=job.job_id, ftps__models=len(job.models),
                          ftps__engine=self.engine, ftps__device=self.device) as span:
            result = self._metered_job(job)
            if result.engine:  # what "auto" turned out to be
                span.set_attribute("ftps.engine_used", result.engine)
            span.set_attribute("ftps.seconds", result.seconds)
            return result

    def _metered_job(self, job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
        if self._metrics is None:
            return self._run_job(job)
        self._metrics.job_started()
        try:
            result = self._run_job(job)
        finally:
            self._metrics.job_ended()
        self._metrics.models_finetuned.inc(len(result.model_indices))
        return result

    def _run_job(self, job: worker_pb2.FinetuneJob) -> worker_pb2.RunJobResponse:
        finetune = self._finetune_job(job)
        result = self._sandboxed(f"{job.task_id}/{job.strategy.sha256}", f"job {job.job_id} failed", finetune)
        log.info("job %s: %d model(s) x %d record(s) in %.1fs on %s, engine %s, %s", job.job_id,
                 len(finetune.models), len(finetune.evaluated), result.seconds, self.device, result.engine or "?",
                 result.precision or "?")
        return worker_pb2.RunJobResponse(job_id=job.job_id, model_indices=[m.index for m in finetune.models],
                                         phi=tensor_from_array(np.asarray(result.phi, dtype=np.float64)),
                                         device=self.device, seconds=result.seconds, engine=result.engine,
                                         precision=result.precision,
                                         dp_epsilon=result.dp_epsilon, dp_delta=result.dp_delta,
                                         dp_noise_multiplier=result.dp_noise_multiplier)

    def _finetune_job(self, job: worker_pb2.FinetuneJob) -> FinetuneJob:
        """The proto's job as the domain's, its blobs fetched and its records validated (once, in
        this process; the blobs go on to the sandbox as they came). InvalidArgument says what
        is wrong with the request."""
        # Ids name sandbox folders and log lines: whole-match them like every other service.
        check_id(job.task_id, "job.task_id")
        check_id(job.job_id, "job.job_id")
        if not job.models:
            raise InvalidArgument("job.models is empty", reason="JOB_INVALID", field="job.models")
        if len(job.models) > MAX_MODELS_PER_JOB:
            raise InvalidArgument(f"job.models has {len(job.models)} models; at most {MAX_MODELS_PER_JOB}",
                                  reason="JOB_INVALID", field="job.models")
        if job.builder_mix < 0:
            raise InvalidArgument("job.builder_mix must be >= 0", reason="JOB_INVALID", field="job.builder_mix")
        strategy = self._cache.get(job.strategy, "strategy")
        weights = self._cache.get(job.base_model, "base_model")
        train = _records(self._cache.get(job.records, "records"), "records")
        evaluated = None
        if job.eval_records.key:
            evaluated = _records(self._cache.get(job.eval_records, "eval_records"), "eval_records")
        builder = None
        if job.builder_mix:
            builder = _builder_records(self._cache.get(job.builder_data, "builder_data"))
        models = []
        for i, spec in enumerate(job.models):
            mask = np.frombuffer(spec.mask, dtype=np.uint8)
            if len(mask) != len(train):
                raise InvalidArgument(f"job.models[{i}].mask has {len(mask)} entries for {len(train)} records",
                                      reason="JOB_INVALID", field=f"job.models[{i}].mask")
            if mask.max(initial=0) > 1:
                raise InvalidArgument(f"job.models[{i}].mask must hold only 0 and 1", reason="JOB_INVALID",
                                      field=f"job.models[{i}].mask")
            models.append(ModelSpec(spec.index, spec.seed, mask.astype(bool)))
        return FinetuneJob(strategy_source=_source(strategy), base_weights=weights, train_records=train,
                           models=tuple(models), eval_records=evaluated, builder_records=builder,
                           builder_mix=job.builder_mix, engine=self.engine, precision=self.precision)

    def check_model(self, req: worker_pb2.CheckModelRequest) -> common_pb2.ModelCheck:
        """Build the strategy's model in the sandbox, load the weights into it and run probe
        records of the task's shape through it; FailedPrecondition says why they do not fit."""
        check_id(req.task_id, "task_id")
        shape = tuple(int(d) for d in req.record_shape)
        if not shape or len(shape) > 4 or any(d <= 0 or d > 4096 for d in shape):
            raise InvalidArgument(f"record_shape must be 1-4 positive dims, got {list(shape)}",
                                  reason="INVALID_SETTINGS", field="record_shape")
        if req.num_classes < 2:
            raise InvalidArgument(f"num_classes must be >= 2, got {req.num_classes}", reason="INVALID_SETTINGS",
                                  field="num_classes")
        strategy = self._cache.get(req.strategy, "strategy")
        weights = self._cache.get(req.base_model, "base_model")
        probe = Records.of(np.zeros((2, *shape), dtype=np.float32), np.zeros(2, dtype=np.int64))
        check = FinetuneJob(strategy_source=_source(strategy), base_weights=weights, train_records=probe,
                            models=(ModelSpec(0, 0, np.zeros(2, dtype=bool)),), engine=CHECK_ONLY)
        # In the task's warm child (as its jobs): its first round job then starts at once.
        result = self._sandboxed(f"{req.task_id}/{req.strategy.sha256}", "model check failed", check)
        classes = -1 if result.classes is None else result.classes
        if classes != req.num_classes:
            raise FailedPrecondition(f"the model returns {classes} logits per record but the task has "
                                     f"num_classes = {req.num_classes}", reason="MODEL_CHECK_FAILED")
        log.info("task %s: base model %s fits strategy %s (%d classes, %s parameters) in %.1fs", req.task_id,
                 req.base_model.sha256[:12], req.strategy.sha256[:12], classes, result.parameters, result.seconds)
        return common_pb2.ModelCheck(base_model_sha256=req.base_model.sha256, strategy_sha256=req.strategy.sha256,
                                     num_classes=classes, parameters=result.parameters or 0,
                                     device=self.device, seconds=result.seconds)


    def _sandboxed(self, task_key: str, failed: str, job: FinetuneJob) -> JobResult:
        """``run_job(job)`` in a sandboxed child, within a job slot -> its result, ``seconds``
        the time it took here. With warm sandboxes one child per task and strategy
        (``task_key``): a child never sees another task's data. A failure of the strategy,
        weights or data is the task's, not the worker's: FailedPrecondition("{failed}: ...")."""
        with self._slots:
            t0 = time.perf_counter()
            try:
                if self._pool is not None:
                    result = self._pool.run(job, task_key=task_key)
                else:
                    with self._cold_lock:
                        self._cold_children += 1
                    try:
                        result = run_sandboxed(job, device=self.device, timeout_s=self._timeout_s,
                                               memory_mb=self._memory_mb, threads=self._threads)
                    finally:
                        with self._cold_lock:
                            self._cold_children -= 1
            except (*JOB_ERRORS, SandboxError) as exc:
                raise FailedPrecondition(f"{failed}: {exc}", reason="MODEL_CHECK_FAILED" if failed.startswith(
                    "model check") else "STRATEGY_FAILED") from exc
            return dataclasses.replace(result, seconds=time.perf_counter() - t0)


def _source(strategy: bytes) -> str:
    try:
        return strategy.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"strategy is not UTF-8: {exc}", reason="STRATEGY_INVALID") from exc


def _records(data: bytes, field: str) -> Records:
    try:
        return Records.load(data)
    except ValueError as exc:
        raise InvalidArgument(f"job.{field}: {exc}", reason="ARCHIVE_INVALID", field=f"job.{field}") from exc


def _builder_records(data: bytes) -> Records:
    """The task's builder data as the registry stored it: an npz, or a .beton read through FFCV's
    loader here (the registry decoded it once in a child at upload, so these bytes were checked)."""
    try:
        return builder_data(data, what="job.builder_data")
    except ValueError as exc:
        raise InvalidArgument(str(exc), reason="ARCHIVE_INVALID", field="job.builder_data") from exc


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {requested} requested but CUDA is not available")
    return requested
