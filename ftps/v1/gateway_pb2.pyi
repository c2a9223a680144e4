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

class SubmissionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMISSION_STATE_UNSPECIFIED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_PENDING: _ClassVar[SubmissionState]
    SUBMISSION_STATE_IN_ROUND: _ClassVar[SubmissionState]
    SUBMISSION_STATE_SCORED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_FAILED: _ClassVar[SubmissionState]
SUBMISSION_STATE_UNSPECIFIED: SubmissionState
SUBMISSION_STATE_PENDING: SubmissionState
SUBMISSION_STATE_IN_ROUND: SubmissionState
SUBMISSION_STATE_SCORED: SubmissionState
SUBMISSION_STATE_FAILED: SubmissionState

class CompareRecipesRequest(_message.Message):
    __slots__ = ("round_id", "alternatives")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    alternatives: _containers.RepeatedCompositeFieldContainer[_common_pb2.RecipeAlternative]
    def __init__(self, round_id: _Optional[str] = ..., alternatives: _Optional[_Iterable[_Union[_common_pb2.RecipeAlternative, _Mapping]]] = ...) -> None: ...

class GetComparisonRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class GrowRoundRequest(_message.Message):
    __slots__ = ("round_id", "add_models")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_MODELS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    add_models: int
    def __init__(self, round_id: _Optional[str] = ..., add_models: _Optional[int] = ...) -> None: ...

class SubmitRecordsRequest(_message.Message):
    __slots__ = ("task_id", "contributor", "records", "idempotency_key")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    contributor: str
    records: _common_pb2.Records
    idempotency_key: str
    def __init__(self, task_id: _Optional[str] = ..., contributor: _Optional[str] = ..., records: _Optional[_Union[_common_pb2.Records, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("submission_id", "task_id", "contributor", "record_ids", "state", "round_id", "pending_in_task", "created_at", "failure_reason", "failed_rounds")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    RECORD_IDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_IN_TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    FAILED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    task_id: str
    contributor: str
    record_ids: _containers.RepeatedScalarFieldContainer[str]
    state: SubmissionState
    round_id: str
    pending_in_task: int
    created_at: _timestamp_pb2.Timestamp
    failure_reason: str
    failed_rounds: int
    def __init__(self, submission_id: _Optional[str] = ..., task_id: _Optional[str] = ..., contributor: _Optional[str] = ..., record_ids: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[SubmissionState, str]] = ..., round_id: _Optional[str] = ..., pending_in_task: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failure_reason: _Optional[str] = ..., failed_rounds: _Optional[int] = ...) -> None: ...

class GetSubmissionRequest(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    def __init__(self, submission_id: _Optional[str] = ...) -> None: ...

class GetScoresRequest(_message.Message):
    __slots__ = ("task_id", "contributor", "round_id", "page_size", "page_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    contributor: str
    round_id: str
    page_size: int
    page_token: str
    def __init__(self, task_id: _Optional[str] = ..., contributor: _Optional[str] = ..., round_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetScoresResponse(_message.Message):
    __slots__ = ("scores", "batches", "next_page_token", "contributor_scores")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[_common_pb2.RecordScore]
    batches: _containers.RepeatedCompositeFieldContainer[_common_pb2.BatchMetrics]
    next_page_token: str
    contributor_scores: _containers.RepeatedCompositeFieldContainer[_common_pb2.ContributorScore]
    def __init__(self, scores: _Optional[_Iterable[_Union[_common_pb2.RecordScore, _Mapping]]] = ..., batches: _Optional[_Iterable[_Union[_common_pb2.BatchMetrics, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., contributor_scores: _Optional[_Iterable[_Union[_common_pb2.ContributorScore, _Mapping]]] = ...) -> None: ...

class ListSubmissionsRequest(_message.Message):
    __slots__ = ("task_id", "page_size", "page_token", "contributor")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    page_size: int
    page_token: str
    contributor: str
    def __init__(self, task_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., contributor: _Optional[str] = ...) -> None: ...

class ListSubmissionsResponse(_message.Message):
    __slots__ = ("submissions", "next_page_token")
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    submissions: _containers.RepeatedCompositeFieldContainer[Submission]
    next_page_token: str
    def __init__(self, submissions: _Optional[_Iterable[_Union[Submission, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchScoresRequest(_message.Message):
    __slots__ = ("task_id", "contributor", "round_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    contributor: str
    round_id: str
    def __init__(self, task_id: _Optional[str] = ..., contributor: _Optional[str] = ..., round_id: _Optional[str] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("task_id", "force")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    force: bool
    def __init__(self, task_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class WatchRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...
