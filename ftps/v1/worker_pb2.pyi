import datetime

from ftps.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckModelRequest(_message.Message):
    __slots__ = ("task_id", "base_model", "strategy", "record_shape", "num_classes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RECORD_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    base_model: _common_pb2.BlobRef
    strategy: _common_pb2.BlobRef
    record_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, task_id: _Optional[str] = ..., base_model: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., strategy: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., record_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("index", "seed", "mask")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    index: int
    seed: int
    mask: bytes
    def __init__(self, index: _Optional[int] = ..., seed: _Optional[int] = ..., mask: _Optional[bytes] = ...) -> None: ...

class FinetuneJob(_message.Message):
    __slots__ = ("task_id", "job_id", "base_model", "strategy", "builder_data", "records", "eval_records", "models", "builder_mix")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BUILDER_DATA_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BUILDER_MIX_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    base_model: _common_pb2.BlobRef
    strategy: _common_pb2.BlobRef
    builder_data: _common_pb2.BlobRef
    records: _common_pb2.BlobRef
    eval_records: _common_pb2.BlobRef
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    builder_mix: int
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., base_model: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., strategy: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., builder_data: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., records: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., eval_records: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., builder_mix: _Optional[int] = ...) -> None: ...

class RunJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: FinetuneJob
    def __init__(self, job: _Optional[_Union[FinetuneJob, _Mapping]] = ...) -> None: ...

class RunJobResponse(_message.Message):
    __slots__ = ("job_id", "model_indices", "phi", "device", "seconds", "engine", "dp_epsilon", "dp_delta", "dp_noise_multiplier", "precision")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_INDICES_FIELD_NUMBER: _ClassVar[int]
    PHI_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_indices: _containers.RepeatedScalarFieldContainer[int]
    phi: _common_pb2.Tensor
    device: str
    seconds: float
    engine: str
    dp_epsilon: float
    dp_delta: float
    dp_noise_multiplier: float
    precision: str
    def __init__(self, job_id: _Optional[str] = ..., model_indices: _Optional[_Iterable[int]] = ..., phi: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., device: _Optional[str] = ..., seconds: _Optional[float] = ..., engine: _Optional[str] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_noise_multiplier: _Optional[float] = ..., precision: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("device", "torch_version", "threads", "worker_id", "engine", "started_at", "precision")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    device: str
    torch_version: str
    threads: int
    worker_id: str
    engine: str
    started_at: _timestamp_pb2.Timestamp
    precision: str
    def __init__(self, device: _Optional[str] = ..., torch_version: _Optional[str] = ..., threads: _Optional[int] = ..., worker_id: _Optional[str] = ..., engine: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., precision: _Optional[str] = ...) -> None: ...
