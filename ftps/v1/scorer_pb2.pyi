from ftps.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrepareOfflineRequest(_message.Message):
    __slots__ = ("task_id", "refit")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REFIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    refit: bool
    def __init__(self, task_id: _Optional[str] = ..., refit: _Optional[bool] = ...) -> None: ...

class GetOfflineRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ScorerStartRoundRequest(_message.Message):
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

class ScorerRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...
