import datetime

from ftps.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreparationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREPARATION_STATE_UNSPECIFIED: _ClassVar[PreparationState]
    PREPARATION_STATE_PREPARING: _ClassVar[PreparationState]
    PREPARATION_STATE_READY: _ClassVar[PreparationState]
    PREPARATION_STATE_FAILED: _ClassVar[PreparationState]
PREPARATION_STATE_UNSPECIFIED: PreparationState
PREPARATION_STATE_PREPARING: PreparationState
PREPARATION_STATE_READY: PreparationState
PREPARATION_STATE_FAILED: PreparationState

class CompareScoringRecipesRequest(_message.Message):
    __slots__ = ("round_id", "alternatives")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    alternatives: _containers.RepeatedCompositeFieldContainer[_common_pb2.RecipeAlternative]
    def __init__(self, round_id: _Optional[str] = ..., alternatives: _Optional[_Iterable[_Union[_common_pb2.RecipeAlternative, _Mapping]]] = ...) -> None: ...

class GetScoringComparisonRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class GrowScoringRequest(_message.Message):
    __slots__ = ("round_id", "add_models")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_MODELS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    add_models: int
    def __init__(self, round_id: _Optional[str] = ..., add_models: _Optional[int] = ...) -> None: ...

class Preparation(_message.Message):
    __slots__ = ("task_id", "preparation_id", "state", "models_done", "models_total", "elapsed_s", "remaining_s", "message", "gaussian", "started_at", "base_model_sha256")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PREPARATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODELS_DONE_FIELD_NUMBER: _ClassVar[int]
    MODELS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GAUSSIAN_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    preparation_id: str
    state: PreparationState
    models_done: int
    models_total: int
    elapsed_s: float
    remaining_s: float
    message: str
    gaussian: _common_pb2.OfflineGaussian
    started_at: _timestamp_pb2.Timestamp
    base_model_sha256: str
    def __init__(self, task_id: _Optional[str] = ..., preparation_id: _Optional[str] = ..., state: _Optional[_Union[PreparationState, str]] = ..., models_done: _Optional[int] = ..., models_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., remaining_s: _Optional[float] = ..., message: _Optional[str] = ..., gaussian: _Optional[_Union[_common_pb2.OfflineGaussian, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., base_model_sha256: _Optional[str] = ...) -> None: ...

class StartPreparationRequest(_message.Message):
    __slots__ = ("task_id", "refit")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REFIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    refit: bool
    def __init__(self, task_id: _Optional[str] = ..., refit: _Optional[bool] = ...) -> None: ...

class GetPreparationRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WatchPreparationRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StartScoringRequest(_message.Message):
    __slots__ = ("task_id", "round_id", "batch", "record_ids", "contributors")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RECORD_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round_id: str
    batch: _common_pb2.BlobRef
    record_ids: _containers.RepeatedScalarFieldContainer[str]
    contributors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., round_id: _Optional[str] = ..., batch: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., record_ids: _Optional[_Iterable[str]] = ..., contributors: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchScoringRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class GetScoringResultRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class EstimateRoundRequest(_message.Message):
    __slots__ = ("task_id", "n_models", "n_records")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    N_RECORDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    n_models: int
    n_records: int
    def __init__(self, task_id: _Optional[str] = ..., n_models: _Optional[int] = ..., n_records: _Optional[int] = ...) -> None: ...

class RoundEstimate(_message.Message):
    __slots__ = ("task_id", "n_models", "n_records", "jobs", "parallel_jobs", "seconds_per_model", "worker_s", "wall_s", "basis")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    N_RECORDS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_JOBS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_S_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    n_models: int
    n_records: int
    jobs: int
    parallel_jobs: int
    seconds_per_model: float
    worker_s: float
    wall_s: float
    basis: str
    def __init__(self, task_id: _Optional[str] = ..., n_models: _Optional[int] = ..., n_records: _Optional[int] = ..., jobs: _Optional[int] = ..., parallel_jobs: _Optional[int] = ..., seconds_per_model: _Optional[float] = ..., worker_s: _Optional[float] = ..., wall_s: _Optional[float] = ..., basis: _Optional[str] = ...) -> None: ...
