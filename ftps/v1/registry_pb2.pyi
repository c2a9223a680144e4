import datetime

from ftps.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(_message.Message):
    __slots__ = ("task_id", "name", "owner", "settings", "base_model", "strategy", "builder_data", "created_at", "ready", "model_check")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BUILDER_DATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    name: str
    owner: str
    settings: _common_pb2.TaskSettings
    base_model: _common_pb2.BlobRef
    strategy: _common_pb2.BlobRef
    builder_data: _common_pb2.BlobRef
    created_at: _timestamp_pb2.Timestamp
    ready: bool
    model_check: _common_pb2.ModelCheck
    def __init__(self, task_id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., settings: _Optional[_Union[_common_pb2.TaskSettings, _Mapping]] = ..., base_model: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., strategy: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., builder_data: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready: _Optional[bool] = ..., model_check: _Optional[_Union[_common_pb2.ModelCheck, _Mapping]] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("name", "settings", "owner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    settings: _common_pb2.TaskSettings
    owner: str
    def __init__(self, name: _Optional[str] = ..., settings: _Optional[_Union[_common_pb2.TaskSettings, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("task_id", "kind", "size", "sha256", "defer_check")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DEFER_CHECK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: _common_pb2.BlobKind
    size: int
    sha256: str
    defer_check: bool
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.BlobKind, str]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., defer_check: _Optional[bool] = ...) -> None: ...

class UploadBlobRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadBuilderDataHeader(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class UploadBuilderDataRequest(_message.Message):
    __slots__ = ("header", "records")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    header: UploadBuilderDataHeader
    records: _common_pb2.Records
    def __init__(self, header: _Optional[_Union[UploadBuilderDataHeader, _Mapping]] = ..., records: _Optional[_Union[_common_pb2.Records, _Mapping]] = ...) -> None: ...
