import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_OFFLINE_GLOBAL: _ClassVar[Method]
    METHOD_OFFLINE_PER_RECORD: _ClassVar[Method]
    METHOD_ONLINE_PER_RECORD: _ClassVar[Method]
    METHOD_RMIA: _ClassVar[Method]

class BlobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOB_KIND_UNSPECIFIED: _ClassVar[BlobKind]
    BLOB_KIND_BASE_MODEL: _ClassVar[BlobKind]
    BLOB_KIND_STRATEGY: _ClassVar[BlobKind]
    BLOB_KIND_BUILDER_DATA: _ClassVar[BlobKind]

class MaskUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_UNIT_UNSPECIFIED: _ClassVar[MaskUnit]
    MASK_UNIT_RECORD: _ClassVar[MaskUnit]
    MASK_UNIT_CONTRIBUTOR: _ClassVar[MaskUnit]

class FeatureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_KIND_UNSPECIFIED: _ClassVar[FeatureKind]
    FEATURE_KIND_NUMERIC: _ClassVar[FeatureKind]
    FEATURE_KIND_CATEGORICAL: _ClassVar[FeatureKind]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_PENDING: _ClassVar[RoundState]
    ROUND_STATE_PREPARING: _ClassVar[RoundState]
    ROUND_STATE_FINETUNING: _ClassVar[RoundState]
    ROUND_STATE_SCORING: _ClassVar[RoundState]
    ROUND_STATE_DONE: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_UINT8: Dtype
DTYPE_INT64: Dtype
DTYPE_BOOL: Dtype
METHOD_UNSPECIFIED: Method
METHOD_OFFLINE_GLOBAL: Method
METHOD_OFFLINE_PER_RECORD: Method
METHOD_ONLINE_PER_RECORD: Method
METHOD_RMIA: Method
BLOB_KIND_UNSPECIFIED: BlobKind
BLOB_KIND_BASE_MODEL: BlobKind
BLOB_KIND_STRATEGY: BlobKind
BLOB_KIND_BUILDER_DATA: BlobKind
MASK_UNIT_UNSPECIFIED: MaskUnit
MASK_UNIT_RECORD: MaskUnit
MASK_UNIT_CONTRIBUTOR: MaskUnit
FEATURE_KIND_UNSPECIFIED: FeatureKind
FEATURE_KIND_NUMERIC: FeatureKind
FEATURE_KIND_CATEGORICAL: FeatureKind
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_PENDING: RoundState
ROUND_STATE_PREPARING: RoundState
ROUND_STATE_FINETUNING: RoundState
ROUND_STATE_SCORING: RoundState
ROUND_STATE_DONE: RoundState
ROUND_STATE_FAILED: RoundState

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: Dtype
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Records(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    y: Tensor
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("bucket", "key", "sha256", "size", "version")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    bucket: str
    key: str
    sha256: str
    size: int
    version: int
    def __init__(self, bucket: _Optional[str] = ..., key: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class TaskSettings(_message.Message):
    __slots__ = ("n_models", "batch_threshold", "method", "alpha", "shadow_models", "fixed_variance", "record_shape", "num_classes", "builder_mix", "seed", "models_per_job", "value_range", "dp_delta", "schema", "mask_unit", "contributor_growth_limit")
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    BATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MODELS_FIELD_NUMBER: _ClassVar[int]
    FIXED_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    BUILDER_MIX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODELS_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    VALUE_RANGE_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    MASK_UNIT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_GROWTH_LIMIT_FIELD_NUMBER: _ClassVar[int]
    n_models: int
    batch_threshold: int
    method: Method
    alpha: float
    shadow_models: int
    fixed_variance: bool
    record_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    builder_mix: int
    seed: int
    models_per_job: int
    value_range: ValueRange
    dp_delta: float
    schema: TabularSchema
    mask_unit: MaskUnit
    contributor_growth_limit: int
    def __init__(self, n_models: _Optional[int] = ..., batch_threshold: _Optional[int] = ..., method: _Optional[_Union[Method, str]] = ..., alpha: _Optional[float] = ..., shadow_models: _Optional[int] = ..., fixed_variance: _Optional[bool] = ..., record_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., builder_mix: _Optional[int] = ..., seed: _Optional[int] = ..., models_per_job: _Optional[int] = ..., value_range: _Optional[_Union[ValueRange, _Mapping]] = ..., dp_delta: _Optional[float] = ..., schema: _Optional[_Union[TabularSchema, _Mapping]] = ..., mask_unit: _Optional[_Union[MaskUnit, str]] = ..., contributor_growth_limit: _Optional[int] = ...) -> None: ...

class ContributorScore(_message.Message):
    __slots__ = ("contributor", "round_id", "n_records", "score", "score_ci_low", "score_ci_high", "counted_p", "empirical_mu", "empirical_mu_ci_low", "empirical_mu_ci_high", "empirical_epsilon", "empirical_epsilon_ci_low", "empirical_epsilon_ci_high", "delta", "n_in", "n_out")
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    N_RECORDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORE_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    SCORE_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    COUNTED_P_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_MU_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_MU_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_MU_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_EPSILON_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_EPSILON_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_EPSILON_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    N_IN_FIELD_NUMBER: _ClassVar[int]
    N_OUT_FIELD_NUMBER: _ClassVar[int]
    contributor: str
    round_id: str
    n_records: int
    score: float
    score_ci_low: float
    score_ci_high: float
    counted_p: float
    empirical_mu: float
    empirical_mu_ci_low: float
    empirical_mu_ci_high: float
    empirical_epsilon: float
    empirical_epsilon_ci_low: float
    empirical_epsilon_ci_high: float
    delta: float
    n_in: int
    n_out: int
    def __init__(self, contributor: _Optional[str] = ..., round_id: _Optional[str] = ..., n_records: _Optional[int] = ..., score: _Optional[float] = ..., score_ci_low: _Optional[float] = ..., score_ci_high: _Optional[float] = ..., counted_p: _Optional[float] = ..., empirical_mu: _Optional[float] = ..., empirical_mu_ci_low: _Optional[float] = ..., empirical_mu_ci_high: _Optional[float] = ..., empirical_epsilon: _Optional[float] = ..., empirical_epsilon_ci_low: _Optional[float] = ..., empirical_epsilon_ci_high: _Optional[float] = ..., delta: _Optional[float] = ..., n_in: _Optional[int] = ..., n_out: _Optional[int] = ...) -> None: ...

class TabularSchema(_message.Message):
    __slots__ = ("features", "label_column", "class_names")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    label_column: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ..., label_column: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Feature(_message.Message):
    __slots__ = ("name", "kind", "mean", "std", "range", "levels", "level_frequencies")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FREQUENCIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: FeatureKind
    mean: float
    std: float
    range: ValueRange
    levels: _containers.RepeatedScalarFieldContainer[str]
    level_frequencies: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[FeatureKind, str]] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., range: _Optional[_Union[ValueRange, _Mapping]] = ..., levels: _Optional[_Iterable[str]] = ..., level_frequencies: _Optional[_Iterable[float]] = ...) -> None: ...

class ValueRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ExcludedRecord(_message.Message):
    __slots__ = ("record_id", "contributor", "reason")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    contributor: str
    reason: str
    def __init__(self, record_id: _Optional[str] = ..., contributor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("task_id", "round_id", "state", "models_done", "models_total", "message", "n_records")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODELS_DONE_FIELD_NUMBER: _ClassVar[int]
    MODELS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    N_RECORDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round_id: str
    state: RoundState
    models_done: int
    models_total: int
    message: str
    n_records: int
    def __init__(self, task_id: _Optional[str] = ..., round_id: _Optional[str] = ..., state: _Optional[_Union[RoundState, str]] = ..., models_done: _Optional[int] = ..., models_total: _Optional[int] = ..., message: _Optional[str] = ..., n_records: _Optional[int] = ...) -> None: ...

class RecordScore(_message.Message):
    __slots__ = ("record_id", "contributor", "round_id", "index", "score", "score_ci_low", "score_ci_high", "counted_p", "counted_p_ci_low", "counted_p_ci_high", "n_in", "n_out", "auc", "mu_in", "sigma_in", "mu_out", "sigma_out", "method", "empirical_mu", "empirical_mu_ci_low", "empirical_mu_ci_high", "empirical_epsilon", "empirical_epsilon_ci_low", "empirical_epsilon_ci_high", "delta")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORE_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    SCORE_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    COUNTED_P_FIELD_NUMBER: _ClassVar[int]
    COUNTED_P_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    COUNTED_P_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    N_IN_FIELD_NUMBER: _ClassVar[int]
    N_OUT_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    MU_IN_FIELD_NUMBER: _ClassVar[int]
    SIGMA_IN_FIELD_NUMBER: _ClassVar[int]
    MU_OUT_FIELD_NUMBER: _ClassVar[int]
    SIGMA_OUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_MU_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_MU_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_MU_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_EPSILON_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_EPSILON_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    EMPIRICAL_EPSILON_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    contributor: str
    round_id: str
    index: int
    score: float
    score_ci_low: float
    score_ci_high: float
    counted_p: float
    counted_p_ci_low: float
    counted_p_ci_high: float
    n_in: int
    n_out: int
    auc: float
    mu_in: float
    sigma_in: float
    mu_out: float
    sigma_out: float
    method: Method
    empirical_mu: float
    empirical_mu_ci_low: float
    empirical_mu_ci_high: float
    empirical_epsilon: float
    empirical_epsilon_ci_low: float
    empirical_epsilon_ci_high: float
    delta: float
    def __init__(self, record_id: _Optional[str] = ..., contributor: _Optional[str] = ..., round_id: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., score_ci_low: _Optional[float] = ..., score_ci_high: _Optional[float] = ..., counted_p: _Optional[float] = ..., counted_p_ci_low: _Optional[float] = ..., counted_p_ci_high: _Optional[float] = ..., n_in: _Optional[int] = ..., n_out: _Optional[int] = ..., auc: _Optional[float] = ..., mu_in: _Optional[float] = ..., sigma_in: _Optional[float] = ..., mu_out: _Optional[float] = ..., sigma_out: _Optional[float] = ..., method: _Optional[_Union[Method, str]] = ..., empirical_mu: _Optional[float] = ..., empirical_mu_ci_low: _Optional[float] = ..., empirical_mu_ci_high: _Optional[float] = ..., empirical_epsilon: _Optional[float] = ..., empirical_epsilon_ci_low: _Optional[float] = ..., empirical_epsilon_ci_high: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class BatchMetrics(_message.Message):
    __slots__ = ("method", "n_models", "n_records", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "mean_score", "roc_fpr", "roc_tpr", "mean_counted_p")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    N_RECORDS_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    TPR_AT_1PCT_FPR_FIELD_NUMBER: _ClassVar[int]
    TPR_AT_0_1PCT_FPR_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    ROC_FPR_FIELD_NUMBER: _ClassVar[int]
    ROC_TPR_FIELD_NUMBER: _ClassVar[int]
    MEAN_COUNTED_P_FIELD_NUMBER: _ClassVar[int]
    method: Method
    n_models: int
    n_records: int
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    mean_score: float
    roc_fpr: _containers.RepeatedScalarFieldContainer[float]
    roc_tpr: _containers.RepeatedScalarFieldContainer[float]
    mean_counted_p: float
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., n_models: _Optional[int] = ..., n_records: _Optional[int] = ..., auc: _Optional[float] = ..., tpr_at_1pct_fpr: _Optional[float] = ..., tpr_at_0_1pct_fpr: _Optional[float] = ..., mean_score: _Optional[float] = ..., roc_fpr: _Optional[_Iterable[float]] = ..., roc_tpr: _Optional[_Iterable[float]] = ..., mean_counted_p: _Optional[float] = ...) -> None: ...

class OfflineGaussian(_message.Message):
    __slots__ = ("task_id", "mu", "sigma", "k", "n_values", "fitted_at", "base_model_sha256", "timings")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    N_VALUES_FIELD_NUMBER: _ClassVar[int]
    FITTED_AT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    mu: float
    sigma: float
    k: int
    n_values: int
    fitted_at: _timestamp_pb2.Timestamp
    base_model_sha256: str
    timings: _containers.ScalarMap[str, float]
    def __init__(self, task_id: _Optional[str] = ..., mu: _Optional[float] = ..., sigma: _Optional[float] = ..., k: _Optional[int] = ..., n_values: _Optional[int] = ..., fitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., base_model_sha256: _Optional[str] = ..., timings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("status", "scores", "batch", "timings", "method_metrics", "offline", "excluded", "dp_epsilon", "dp_delta", "dp_noise_multiplier", "contributor_scores", "heldout_accuracy", "heldout_records")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    METHOD_METRICS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_SCORES_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_RECORDS_FIELD_NUMBER: _ClassVar[int]
    status: RoundStatus
    scores: _containers.RepeatedCompositeFieldContainer[RecordScore]
    batch: BatchMetrics
    timings: _containers.ScalarMap[str, float]
    method_metrics: _containers.RepeatedCompositeFieldContainer[BatchMetrics]
    offline: OfflineGaussian
    excluded: _containers.RepeatedCompositeFieldContainer[ExcludedRecord]
    dp_epsilon: float
    dp_delta: float
    dp_noise_multiplier: float
    contributor_scores: _containers.RepeatedCompositeFieldContainer[ContributorScore]
    heldout_accuracy: float
    heldout_records: int
    def __init__(self, status: _Optional[_Union[RoundStatus, _Mapping]] = ..., scores: _Optional[_Iterable[_Union[RecordScore, _Mapping]]] = ..., batch: _Optional[_Union[BatchMetrics, _Mapping]] = ..., timings: _Optional[_Mapping[str, float]] = ..., method_metrics: _Optional[_Iterable[_Union[BatchMetrics, _Mapping]]] = ..., offline: _Optional[_Union[OfflineGaussian, _Mapping]] = ..., excluded: _Optional[_Iterable[_Union[ExcludedRecord, _Mapping]]] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_noise_multiplier: _Optional[float] = ..., contributor_scores: _Optional[_Iterable[_Union[ContributorScore, _Mapping]]] = ..., heldout_accuracy: _Optional[float] = ..., heldout_records: _Optional[int] = ...) -> None: ...

class RecipeAlternative(_message.Message):
    __slots__ = ("name", "strategy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    name: str
    strategy: bytes
    def __init__(self, name: _Optional[str] = ..., strategy: _Optional[bytes] = ...) -> None: ...

class RecipeVariant(_message.Message):
    __slots__ = ("name", "status", "heldout_accuracy", "heldout_records", "batch", "scores", "dp_epsilon")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_RECORDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: RoundStatus
    heldout_accuracy: float
    heldout_records: int
    batch: BatchMetrics
    scores: _containers.RepeatedCompositeFieldContainer[RecordScore]
    dp_epsilon: float
    def __init__(self, name: _Optional[str] = ..., status: _Optional[_Union[RoundStatus, _Mapping]] = ..., heldout_accuracy: _Optional[float] = ..., heldout_records: _Optional[int] = ..., batch: _Optional[_Union[BatchMetrics, _Mapping]] = ..., scores: _Optional[_Iterable[_Union[RecordScore, _Mapping]]] = ..., dp_epsilon: _Optional[float] = ...) -> None: ...

class RecipeComparison(_message.Message):
    __slots__ = ("round_id", "variants", "exposed_everywhere")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_EVERYWHERE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    variants: _containers.RepeatedCompositeFieldContainer[RecipeVariant]
    exposed_everywhere: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round_id: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[RecipeVariant, _Mapping]]] = ..., exposed_everywhere: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelCheck(_message.Message):
    __slots__ = ("base_model_sha256", "strategy_sha256", "num_classes", "parameters", "device", "seconds", "checked_at")
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    base_model_sha256: str
    strategy_sha256: str
    num_classes: int
    parameters: int
    device: str
    seconds: float
    checked_at: _timestamp_pb2.Timestamp
    def __init__(self, base_model_sha256: _Optional[str] = ..., strategy_sha256: _Optional[str] = ..., num_classes: _Optional[int] = ..., parameters: _Optional[int] = ..., device: _Optional[str] = ..., seconds: _Optional[float] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
