"""Modelling tasks and their blobs: the builder registry's domain logic (no gRPC here).

Tasks are rows of a database (:mod:`services.builder_registry.store`, table ``registry_tasks``), shared
by every replica; blobs are objects (bucket ``FTPS_S3_BUCKET``)::

    registry/tasks/{task_id}/{kind}/{sha256}/{file}           base-model.safetensors, strategy.py,
                                                              builder-data.npz or .beton (a version's
                                                              BlobRef points here; equal bytes, one object)
    registry/staging/{task_id}/{sha256}/{upload}/{file}       an upload being checked (deleted after)

An upload stores its blob first, at a key named by its content (two replicas never write different
bytes to one key), then in one transaction under the task's row lock takes the next version and sets
the reference: concurrent uploads to one task get versions 1, 2, 3, ... and none is lost. A failure
in between leaves an unreferenced object, never a reference to a missing one.

A base model or strategy upload is checked against the task's other half by a fine-tune worker
(``checker.ModelChecker``) before it becomes the task's current version; ``UploadHeader.defer_check``
postpones the check to the other half's upload (a new architecture needs both).
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from typing import Iterable, Iterator

import numpy as np

from ftps.common import archives, serde
from ftps.common.clock import now_ts
from ftps.common.paging import page_size
from ftps.common.auth import Principal, authorized_task
from ftps.common.errors import (
    FailedPrecondition, FtpsError, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
)
from ftps.records import RecordsError, beton, checks, tabular
from ftps.records.builder import decode_untrusted
from ftps.common.storage import ObjectStore, check_id
from ftps.common.task_rules import MAX_MODELS, MAX_RECORDS, min_records, valid_batch_size, valid_n_models
from ftps.ml.strategy import check_source
from ftps.privacy import dp
from ftps.v1 import common_pb2, registry_pb2
from services.builder_registry.checker import ModelChecker
from services.builder_registry.store import TaskStore

log = logging.getLogger(__name__)

PREFIX = "registry/tasks/"
STAGING = "registry/staging/"
_PAIR = {common_pb2.BLOB_KIND_BASE_MODEL: common_pb2.BLOB_KIND_STRATEGY,
         common_pb2.BLOB_KIND_STRATEGY: common_pb2.BLOB_KIND_BASE_MODEL}
_FILES = {
    common_pb2.BLOB_KIND_BASE_MODEL: ("base-model", "base-model.safetensors"),
    common_pb2.BLOB_KIND_STRATEGY: ("strategy", "strategy.py"),
    common_pb2.BLOB_KIND_BUILDER_DATA: ("builder-data", "builder-data.npz"),
}
_FIELD = {
    common_pb2.BLOB_KIND_BASE_MODEL: "base_model",
    common_pb2.BLOB_KIND_STRATEGY: "strategy",
    common_pb2.BLOB_KIND_BUILDER_DATA: "builder_data",
}

# Decoding an uploaded .beton once, in a child: far above what a valid file of the byte limit takes.
BETON_TIMEOUT_S = 300.0

DEFAULTS = dict(n_models=32, batch_threshold=200, method=common_pb2.METHOD_ONLINE_PER_RECORD,
                alpha=0.05, shadow_models=16, num_classes=10, models_per_job=4, dp_delta=dp.DEFAULT_DELTA)
FLOAT32_MAX = 3.4028234663852886e38


def with_defaults(settings: common_pb2.TaskSettings) -> common_pb2.TaskSettings:
    """Fill unset (zero) fields with defaults and check every field; InvalidArgument names it."""
    s = common_pb2.TaskSettings()
    s.CopyFrom(settings)
    if s.HasField("schema") and s.schema.class_names and not s.num_classes:
        s.num_classes = len(s.schema.class_names)  # a tabular task's classes are named
    for name, value in DEFAULTS.items():
        if not getattr(s, name):
            setattr(s, name, value)
    if not valid_n_models(s.n_models):
        raise InvalidArgument(f"settings.n_models must be even and in [4, {MAX_MODELS}], got {s.n_models}",
                              reason="INVALID_SETTINGS", field="settings.n_models")
    if not valid_batch_size(s.batch_threshold):
        raise InvalidArgument(f"settings.batch_threshold must be in [2, {MAX_RECORDS}], got {s.batch_threshold}",
                              reason="INVALID_SETTINGS", field="settings.batch_threshold")
    if s.method not in serde.METHOD_NAMES:
        raise InvalidArgument(f"settings.method {s.method} is not a known method", reason="UNKNOWN_METHOD",
                              field="settings.method")
    if not 0 <= s.contributor_growth_limit <= MAX_MODELS:
        raise InvalidArgument(f"settings.contributor_growth_limit must be in [0, {MAX_MODELS}], got "
                              f"{s.contributor_growth_limit}", reason="INVALID_SETTINGS",
                              field="settings.contributor_growth_limit")
    if s.mask_unit not in common_pb2.MaskUnit.values():
        raise InvalidArgument(f"settings.mask_unit {s.mask_unit} is not a mask unit", reason="INVALID_SETTINGS",
                              field="settings.mask_unit")
    if not 0.0 < s.alpha < 0.5:
        raise InvalidArgument(f"settings.alpha must be in (0, 0.5), got {s.alpha}",
                              reason="INVALID_SETTINGS", field="settings.alpha")
    if not (math.isfinite(s.dp_delta) and 0.0 < s.dp_delta <= 0.01):
        raise InvalidArgument(f"settings.dp_delta must be in (0, 0.01], got {s.dp_delta:g}",
                              reason="INVALID_SETTINGS", field="settings.dp_delta")
    if not 2 <= s.shadow_models <= MAX_MODELS:
        raise InvalidArgument(f"settings.shadow_models must be in [2, {MAX_MODELS}], got {s.shadow_models}",
                              reason="INVALID_SETTINGS", field="settings.shadow_models")
    schema = tabular.of_settings(s)
    if schema is not None:
        # A tabular task: its model inputs are the encoded rows, [schema width].
        schema.check(s.num_classes)
        if not s.record_shape:
            s.record_shape.append(schema.width)
        if list(s.record_shape) != [schema.width]:
            raise InvalidArgument(
                f"settings.record_shape {list(s.record_shape)} does not match the schema, whose rows encode "
                f"to [{schema.width}] model inputs; leave record_shape empty", reason="INVALID_SETTINGS",
                field="settings.record_shape")
        if s.HasField("value_range"):
            raise InvalidArgument("settings.value_range applies to image tasks; a tabular task's ranges are per "
                                  "feature (schema.features[i].range)", reason="INVALID_SETTINGS",
                                  field="settings.value_range")
    if not s.record_shape or len(s.record_shape) > 4 or any(d <= 0 or d > 4096 for d in s.record_shape):
        raise InvalidArgument(
            f"settings.record_shape must be 1-4 positive dims, got {list(s.record_shape)}",
            reason="INVALID_SETTINGS", field="settings.record_shape")
    if not 2 <= s.num_classes <= 100_000:
        raise InvalidArgument(f"settings.num_classes must be in [2, 100000], got {s.num_classes}",
                              reason="INVALID_SETTINGS", field="settings.num_classes")
    if s.builder_mix < 0:
        raise InvalidArgument(f"settings.builder_mix must be >= 0, got {s.builder_mix}",
                              reason="INVALID_SETTINGS", field="settings.builder_mix")
    if not 1 <= s.models_per_job <= s.n_models:
        raise InvalidArgument(f"settings.models_per_job must be in [1, n_models], got {s.models_per_job}",
                              reason="INVALID_SETTINGS", field="settings.models_per_job")
    if s.HasField("value_range"):
        lo, hi = s.value_range.min, s.value_range.max
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or max(abs(lo), abs(hi)) > FLOAT32_MAX:
            raise InvalidArgument(f"settings.value_range must be finite float32 bounds with min < max, "
                                  f"got [{lo:g}, {hi:g}]", reason="INVALID_SETTINGS", field="settings.value_range")
    # A task whose rounds are bound to fail is refused now, with the smallest values that work.
    need = min_records(s.n_models)
    if s.batch_threshold < need:
        fewer = [n for n in range(4, s.n_models, 2) if min_records(n) <= s.batch_threshold]
        raise InvalidArgument(
            f"settings: {s.n_models} models need batch_threshold >= {need} (each pair of models must "
            f"train on its own half of the batch); raise batch_threshold to {need}"
            + (f" or lower n_models to {fewer[-1]}" if fewer else ""),
            reason="INVALID_SETTINGS", field="settings.batch_threshold")
    return s


class Registry:
    """The registry's domain logic over ``tasks`` (the database) and ``store`` (the blobs). It keeps
    no task in memory: replicas sharing one database see each other's tasks and uploads at once."""

    def __init__(self, store: ObjectStore, tasks: TaskStore, *, max_bytes: dict[int, int],
                 max_expanded_bytes: int = archives.DEFAULT_MAX_EXPANDED_BYTES,
                 checker: ModelChecker | None = None, beton_timeout_s: float = BETON_TIMEOUT_S) -> None:
        self._store = store
        self._tasks = tasks
        self._max_bytes = max_bytes
        self._max_expanded_bytes = max_expanded_bytes
        self._beton_timeout_s = beton_timeout_s
        self._checker = checker

    def _set_ready(self, task: registry_pb2.Task) -> None:
        task.ready = all(getattr(task, f).key for f in _FIELD.values()) and (
            self._checker is None or self._pair_checked(task))

    def create_task(self, name: str, settings: common_pb2.TaskSettings, owner: str,
                    who: Principal) -> registry_pb2.Task:
        who.require_role("builder", "admin", what="create tasks")
        if who.role == "builder":
            if owner and owner != who.subject:
                raise PermissionDenied(f"builder {who.subject!r} may not create tasks for {owner!r}")
            owner = who.subject
        if not name or len(name) > 200:
            raise InvalidArgument("name is required (at most 200 characters)", reason="FIELD_REQUIRED", field="name")
        if owner:
            check_id(owner, "owner")
        task = registry_pb2.Task(task_id="t-" + uuid.uuid4().hex[:12], name=name, owner=owner,
                                 settings=with_defaults(settings), created_at=now_ts())
        self._set_ready(task)
        self._tasks.create(task)
        log.info("task %s created (%s)", task.task_id, name)
        return task

    def get_task(self, task_id: str, who: Principal, *, action: str = "read",
                 contributors_may: bool = True) -> registry_pb2.Task:
        check_id(task_id, "task_id")
        return authorized_task(who, task_id, self._task, action=action, contributors_may=contributors_may)

    def _task(self, task_id: str) -> registry_pb2.Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id")
        return task

    def list_tasks(self, who: Principal, *, size: int = 0,
                   token: str = "") -> tuple[list[registry_pb2.Task], str]:
        """One page of the tasks ``who`` may see, oldest first -> (tasks, next_page_token): every
        task for admin/service, a builder's own, a contributor's token tasks (all if it names none)."""
        if who.is_privileged:
            owner, ids = None, None
        elif who.role == "builder":
            owner, ids = who.subject, None
        else:
            owner, ids = None, (who.tasks or None)
        return self._tasks.list(owner=owner, task_ids=ids, page_size=page_size(size), page_token=token)

    def upload(self, header: registry_pb2.UploadHeader, chunks: Iterable[bytes],
               who: Principal) -> common_pb2.BlobRef:
        """Receive a blob, verify declared size and sha256, validate its content, then store it."""
        task = self.get_task(header.task_id, who, action="upload to", contributors_may=False)
        if header.kind not in _FILES:
            raise InvalidArgument(f"header.kind {header.kind} is not a blob kind", reason="BLOB_KIND_INVALID",
                                  field="header.kind")
        limit = self._max_bytes[header.kind]
        if header.size <= 0:
            raise InvalidArgument("header.size must be the positive total size in bytes", field="header.size")
        if header.size > limit:
            raise ResourceExhausted(f"header.size {header.size} exceeds the limit of {limit} bytes "
                                    f"for {_FILES[header.kind][0]}", reason="BLOB_TOO_LARGE", field="header.size")
        if len(header.sha256) != 64 or any(c not in "0123456789abcdef" for c in header.sha256):
            raise InvalidArgument("header.sha256 must be 64 lowercase hex characters", field="header.sha256")
        digest = hashlib.sha256()
        parts: list[bytes] = []
        received = 0
        for chunk in chunks:
            received += len(chunk)
            if received > header.size:
                raise InvalidArgument(f"upload is larger than its declared size {header.size}",
                                      reason="BLOB_SIZE_MISMATCH")
            digest.update(chunk)
            parts.append(chunk)
        if received != header.size:
            raise InvalidArgument(f"upload ended after {received} of {header.size} declared bytes",
                                  reason="BLOB_SIZE_MISMATCH")
        if digest.hexdigest() != header.sha256:
            raise InvalidArgument(f"upload sha256 {digest.hexdigest()} does not match the declared {header.sha256}",
                                  reason="BLOB_CHECKSUM_MISMATCH")
        return self._accept(task, header.kind, b"".join(parts), header.sha256, defer_check=header.defer_check)

    def upload_records(self, header: registry_pb2.UploadBuilderDataHeader,
                       chunks: Iterable[common_pb2.Records], who: Principal) -> common_pb2.BlobRef:
        """Builder data as Records chunks (UploadBuilderData): each chunk decoded and checked like a
        contributor's records (errors name the chunk, numbered from 1 after the header), the running
        size bounded by the builder-data limit, then stored as the npz an UploadBlob BUILDER_DATA
        upload would be (same checks, versioning and readiness: :meth:`_accept`)."""
        task = self.get_task(header.task_id, who, action="upload to", contributors_may=False)
        kind = common_pb2.BLOB_KIND_BUILDER_DATA
        limit = self._max_bytes[kind]
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        total = 0
        n = 0
        for n, records in enumerate(chunks, start=1):
            x, y = _chunk_records(n, records, task.settings)
            total += x.nbytes + y.nbytes
            if total > limit:
                raise ResourceExhausted(f"chunk {n}: builder data exceeds the limit of {limit} bytes",
                                        reason="BLOB_TOO_LARGE", field="records", metadata={"chunk": n})
            xs.append(x)
            ys.append(y)
        if not xs:
            raise InvalidArgument("builder data stream holds no records chunk after its header",
                                  reason="RECORDS_EMPTY", field="records")
        data = archives.records_to_npz(np.concatenate(xs), np.concatenate(ys))
        del xs, ys
        if len(data) > limit:
            raise ResourceExhausted(f"builder data ({len(data)} bytes as npz) exceeds the limit of {limit} bytes",
                                    reason="BLOB_TOO_LARGE", field="records")
        return self._accept(task, kind, data, hashlib.sha256(data).hexdigest())

    def _accept(self, task: registry_pb2.Task, kind: int, data: bytes, sha256: str, *,
                defer_check: bool = False) -> common_pb2.BlobRef:
        """The one home of storing a received blob: validate it, check the pair (unless deferred),
        store it by content, then take the next version under the task's row lock."""
        _validate_blob(kind, data, task.settings, max_expanded_bytes=self._max_expanded_bytes,
                       beton_timeout_s=self._beton_timeout_s)
        check = None
        if not defer_check:
            check = self._check_pair(task, kind, data, sha256)
        # The blob first (outside any transaction or lock), then the row that points to it.
        folder, filename = _FILES[kind]
        if kind == common_pb2.BLOB_KIND_BUILDER_DATA and beton.is_beton(data):
            filename = "builder-data.beton"  # stored as uploaded; readers tell the formats apart
        stored = self._store.put_bytes(f"{PREFIX}{task.task_id}/{folder}/{sha256}/{filename}", data)
        field = _FIELD[kind]

        def add_version(t: registry_pb2.Task) -> None:
            ref = getattr(t, field)
            version = ref.version + 1  # under the row lock: another replica's upload is already counted
            ref.CopyFrom(stored)
            ref.version = version
            if check is not None:
                t.model_check.CopyFrom(check)
            self._set_ready(t)

        task = self._tasks.update(task.task_id, add_version)
        ref = getattr(task, field)
        log.info("task %s: %s v%d stored (%d bytes)%s", task.task_id, folder, ref.version, len(data),
                 "" if self._checker is None or kind not in _PAIR else
                 ", checked against the other half" if check is not None else ", not checked yet")
        return ref

    def _pair_checked(self, task: registry_pb2.Task) -> bool:
        c = task.model_check
        return c.base_model_sha256 == task.base_model.sha256 and c.strategy_sha256 == task.strategy.sha256

    def _check_pair(self, task: registry_pb2.Task, kind: int, data: bytes,
                    sha256: str) -> common_pb2.ModelCheck | None:
        """A base model or strategy against the task's current other half, by a worker (the
        registry never runs uploaded code): None when there is nothing to check."""
        other = getattr(task, _FIELD[_PAIR[kind]]) if kind in _PAIR else None
        if self._checker is None or other is None or not other.key:
            return None
        filename = _FILES[kind][1]
        # Per upload: two replicas checking equal bytes must not delete each other's staged copy.
        staged = self._store.put_bytes(f"{STAGING}{task.task_id}/{sha256}/{uuid.uuid4().hex}/{filename}", data)
        try:
            base, strategy = (staged, other) if kind == common_pb2.BLOB_KIND_BASE_MODEL else (other, staged)
            check = self._checker.check(task.task_id, base, strategy, task.settings)
        finally:
            self._store.delete(staged.key)
        check.base_model_sha256, check.strategy_sha256 = base.sha256, strategy.sha256
        check.checked_at.CopyFrom(now_ts())
        return check


def _validate_blob(kind: int, data: bytes, settings: common_pb2.TaskSettings, *,
                   max_expanded_bytes: int = archives.DEFAULT_MAX_EXPANDED_BYTES,
                   beton_timeout_s: float = BETON_TIMEOUT_S) -> None:
    # Archives are bounded before they are read: what they declare (member count and sizes, each
    # array's dtype and shape, the safetensors header and offsets) is checked against the task and
    # max_expanded_bytes before anything of that size is inflated or allocated.
    limits = archives.ArchiveLimits(max_bytes=max_expanded_bytes)
    if kind == common_pb2.BLOB_KIND_BASE_MODEL:
        # safetensors only: a header plus raw tensors, never a pickle.
        try:
            tensors = archives.load_safetensors(data, what="base_model", limits=limits)
        except archives.ArchiveError as exc:
            raise InvalidArgument(str(exc), reason="BASE_MODEL_INVALID") from exc
        if not tensors:
            raise InvalidArgument("base model holds no tensors", reason="BASE_MODEL_INVALID")
        for name, t in tensors.items():
            if t.dtype.kind == "f" and not np.isfinite(t).all():
                raise InvalidArgument(f"base model tensor {name[:200]!r} holds NaN or infinite values",
                                      reason="BASE_MODEL_INVALID")
    elif kind == common_pb2.BLOB_KIND_STRATEGY:
        check_source(data)  # syntax only; it runs in the worker's sandbox
    elif kind == common_pb2.BLOB_KIND_BUILDER_DATA:
        if beton.is_beton(data):
            x, y = _beton_records(data, settings, max_expanded_bytes=max_expanded_bytes, timeout_s=beton_timeout_s)
        else:
            # x [m, *record_shape] floats and y [m] labels, m bounded by the byte limit.
            arrays = archives.npz_arrays(data, what="builder_data", limits=limits,
                                         expect=archives.records_spec(settings.record_shape))
            x, y = arrays["x"], arrays["y"]
        x, y = checks.for_task(x, y, settings, field="builder_data", encoded=True)
        if len(x) < 8:
            raise InvalidArgument(f"builder data has {len(x)} records; at least 8 are needed",
                                  reason="BUILDER_DATA_INVALID")


def _beton_records(data: bytes, settings: common_pb2.TaskSettings, *, max_expanded_bytes: int,
                   timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Builder data uploaded as an FFCV .beton -> its records, decoded once.

    What the file declares and every pointer in it are checked with numpy here first; the decoding
    runs in a child process (``decode_untrusted``: timeout, address-space limit) because FFCV's
    decoders and libjpeg-turbo trust the file. A file that fails anywhere is BUILDER_DATA_INVALID
    with one line saying why; a registry without ffcv answers FAILED_PRECONDITION and stores nothing.
    """
    def invalid(message: str) -> InvalidArgument:
        return InvalidArgument(message, reason="BUILDER_DATA_INVALID", field="builder_data")

    if tabular.of_settings(settings) is not None:
        raise invalid("builder_data: this is a tabular task, whose builder data is rows (an .npz of encoded rows, "
                      "or a table); an FFCV .beton holds image or array records")
    try:
        head = beton.check_pages(data, what="builder_data")
    except RecordsError as exc:
        raise invalid(str(exc)) from exc
    if not 8 <= head.num_samples <= MAX_RECORDS:
        raise invalid(f"builder_data: the .beton holds {head.num_samples} records; 8 to {MAX_RECORDS} are accepted")
    shape = tuple(settings.record_shape)
    decoded = head.num_samples * (4 * math.prod(shape) + 8)  # float32 x and int64 y
    if decoded > max_expanded_bytes:
        raise invalid(f"builder_data: {head.num_samples} records of {list(shape)} decode to {decoded} bytes; the "
                      f"limit is {max_expanded_bytes} bytes")
    try:
        return decode_untrusted(data, what="builder_data", timeout_s=timeout_s, max_records_bytes=decoded,
                                expect_shape=shape)
    except beton.BetonUnavailable as exc:
        raise FailedPrecondition(f"this registry cannot read FFCV .beton files: {exc}; upload the records as an "
                                 f".npz instead", reason="FAILED_PRECONDITION", field="builder_data") from exc
    except RecordsError as exc:
        raise invalid(str(exc)) from exc


MAX_CHUNK_RECORDS = 10_000  # records in one UploadBuilderData chunk (registry.proto)


def _chunk_records(n: int, records: common_pb2.Records,
                   settings: common_pb2.TaskSettings) -> tuple[np.ndarray, np.ndarray]:
    """One UploadBuilderData chunk through the checks contributors' records get -> (float32 x,
    int64 y); an error keeps its reason and field and its message starts with ``chunk n: ``."""
    try:
        if not records.HasField("x") or not records.HasField("y"):
            raise InvalidArgument("records.x and records.y are required", reason="FIELD_REQUIRED", field="records")
        x = serde.array_from_tensor(records.x, field="records.x")
        y = serde.array_from_tensor(records.y, field="records.y")
        if len(x) > MAX_CHUNK_RECORDS:
            raise ResourceExhausted(f"records: {len(x)} records in one chunk; at most {MAX_CHUNK_RECORDS}",
                                    reason="TOO_MANY_RECORDS", field="records")
        return checks.for_task(x, y, settings)
    except FtpsError as exc:
        raise type(exc)(f"chunk {n}: {exc}", reason=exc.reason, field=exc.field,
                        metadata={**exc.metadata, "chunk": str(n)}) from None


def iter_upload(request_iterator: Iterator[registry_pb2.UploadBlobRequest]):
    """Split an upload stream into its header and an iterator of chunks (InvalidArgument if malformed)."""
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first upload message must be the header", reason="UPLOAD_OUT_OF_ORDER")

    def chunks() -> Iterator[bytes]:
        for msg in request_iterator:
            if msg.WhichOneof("part") != "chunk":
                raise InvalidArgument("only chunks may follow the upload header", reason="UPLOAD_OUT_OF_ORDER")
            yield msg.chunk

    return first.header, chunks()


def iter_builder_data(request_iterator: Iterator[registry_pb2.UploadBuilderDataRequest]):
    """Split an UploadBuilderData stream into its header and an iterator of Records chunks
    (InvalidArgument, UPLOAD_OUT_OF_ORDER, if the header is not first or comes again)."""
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first UploadBuilderData message must be the header", reason="UPLOAD_OUT_OF_ORDER")

    def chunks() -> Iterator[common_pb2.Records]:
        for n, msg in enumerate(request_iterator, start=1):
            if msg.WhichOneof("part") != "records":
                raise InvalidArgument(f"chunk {n}: only records may follow the header",
                                      reason="UPLOAD_OUT_OF_ORDER", metadata={"chunk": n})
            yield msg.records

    return first.header, chunks()
