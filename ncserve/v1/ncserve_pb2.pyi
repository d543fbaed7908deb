from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class Round(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_UNSPECIFIED: _ClassVar[Round]
    ROUND_1: _ClassVar[Round]
    ROUND_2: _ClassVar[Round]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_RUNNING: _ClassVar[RunState]
    RUN_FINISHED: _ClassVar[RunState]
    RUN_FAILED: _ClassVar[RunState]
    RUN_ABANDONED: _ClassVar[RunState]

class StepStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATUS_UNSPECIFIED: _ClassVar[StepStatus]
    STEP_COMPLETE: _ClassVar[StepStatus]
    STEP_INCOMPLETE: _ClassVar[StepStatus]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
ROUND_UNSPECIFIED: Round
ROUND_1: Round
ROUND_2: Round
RUN_STATE_UNSPECIFIED: RunState
RUN_RUNNING: RunState
RUN_FINISHED: RunState
RUN_FAILED: RunState
RUN_ABANDONED: RunState
STEP_STATUS_UNSPECIFIED: StepStatus
STEP_COMPLETE: StepStatus
STEP_INCOMPLETE: StepStatus

class TensorPiece(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamTrailer(_message.Message):
    __slots__ = ("num_pieces", "num_tensors", "total_bytes", "crc32", "sha256")
    NUM_PIECES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    num_pieces: int
    num_tensors: int
    total_bytes: int
    crc32: int
    sha256: bytes
    def __init__(self, num_pieces: _Optional[int] = ..., num_tensors: _Optional[int] = ..., total_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("seq", "piece", "trailer")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    piece: TensorPiece
    trailer: StreamTrailer
    def __init__(self, seq: _Optional[int] = ..., piece: _Optional[_Union[TensorPiece, _Mapping]] = ..., trailer: _Optional[_Union[StreamTrailer, _Mapping]] = ...) -> None: ...

class TrainTally(_message.Message):
    __slots__ = ("loss_sum", "num_correct", "num_samples")
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    NUM_CORRECT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    loss_sum: float
    num_correct: int
    num_samples: int
    def __init__(self, loss_sum: _Optional[float] = ..., num_correct: _Optional[int] = ..., num_samples: _Optional[int] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("run_id", "step", "rank", "round", "num_classes", "feature_dim", "epoch", "scalars", "train_tally", "payload_bytes")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TALLY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    rank: int
    round: Round
    num_classes: int
    feature_dim: int
    epoch: int
    scalars: _containers.ScalarMap[str, float]
    train_tally: TrainTally
    payload_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., round: _Optional[_Union[Round, str]] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., epoch: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ..., train_tally: _Optional[_Union[TrainTally, _Mapping]] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("run_id", "step", "rank", "round", "payload_bytes", "payload_sha256")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    rank: int
    round: Round
    payload_bytes: int
    payload_sha256: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., round: _Optional[_Union[Round, str]] = ..., payload_bytes: _Optional[int] = ..., payload_sha256: _Optional[str] = ...) -> None: ...

class ClassMeansRequest(_message.Message):
    __slots__ = ("run_id", "step", "rank")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    rank: int
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class RegisterRunRequest(_message.Message):
    __slots__ = ("run_id", "num_classes", "feature_dim", "world_size", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    num_classes: int
    feature_dim: int
    world_size: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., world_size: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterRunReply(_message.Message):
    __slots__ = ("created", "run")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    created: bool
    run: RunInfo
    def __init__(self, created: _Optional[bool] = ..., run: _Optional[_Union[RunInfo, _Mapping]] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "num_classes", "feature_dim", "world_size", "metadata", "created_unix", "num_measurements", "num_incomplete", "latest_step", "num_open_steps", "state", "state_reason", "ended_unix", "last_activity_unix", "first_step")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    NUM_MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    LATEST_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_OPEN_STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_UNIX_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    num_classes: int
    feature_dim: int
    world_size: int
    metadata: _containers.ScalarMap[str, str]
    created_unix: float
    num_measurements: int
    num_incomplete: int
    latest_step: int
    num_open_steps: int
    state: RunState
    state_reason: str
    ended_unix: float
    last_activity_unix: float
    first_step: int
    def __init__(self, run_id: _Optional[str] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., world_size: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_unix: _Optional[float] = ..., num_measurements: _Optional[int] = ..., num_incomplete: _Optional[int] = ..., latest_step: _Optional[int] = ..., num_open_steps: _Optional[int] = ..., state: _Optional[_Union[RunState, str]] = ..., state_reason: _Optional[str] = ..., ended_unix: _Optional[float] = ..., last_activity_unix: _Optional[float] = ..., first_step: _Optional[int] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[RunState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[RunState, str]]] = ...) -> None: ...

class ListRunsReply(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id", "state", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: RunState
    def __init__(self, state: _Optional[_Union[RunState, str]] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DeleteRunReply(_message.Message):
    __slots__ = ("num_measurements", "num_scalar_steps")
    NUM_MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCALAR_STEPS_FIELD_NUMBER: _ClassVar[int]
    num_measurements: int
    num_scalar_steps: int
    def __init__(self, num_measurements: _Optional[int] = ..., num_scalar_steps: _Optional[int] = ...) -> None: ...

class NCMetrics(_message.Message):
    __slots__ = ("nc0", "nc0_normalized", "nc1", "nc1_trace_ratio", "cdnv", "nc2_norm", "nc2_angle", "nc2", "nc2w_norm", "nc2w_angle", "nc2w", "nc2m", "nc3", "nc4", "accuracy", "num_samples", "num_classes", "feature_dim", "holdout_nc4", "holdout_accuracy", "holdout_num_samples")
    NC0_FIELD_NUMBER: _ClassVar[int]
    NC0_NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    NC1_FIELD_NUMBER: _ClassVar[int]
    NC1_TRACE_RATIO_FIELD_NUMBER: _ClassVar[int]
    CDNV_FIELD_NUMBER: _ClassVar[int]
    NC2_NORM_FIELD_NUMBER: _ClassVar[int]
    NC2_ANGLE_FIELD_NUMBER: _ClassVar[int]
    NC2_FIELD_NUMBER: _ClassVar[int]
    NC2W_NORM_FIELD_NUMBER: _ClassVar[int]
    NC2W_ANGLE_FIELD_NUMBER: _ClassVar[int]
    NC2W_FIELD_NUMBER: _ClassVar[int]
    NC2M_FIELD_NUMBER: _ClassVar[int]
    NC3_FIELD_NUMBER: _ClassVar[int]
    NC4_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_NC4_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    nc0: float
    nc0_normalized: float
    nc1: float
    nc1_trace_ratio: float
    cdnv: float
    nc2_norm: float
    nc2_angle: float
    nc2: float
    nc2w_norm: float
    nc2w_angle: float
    nc2w: float
    nc2m: float
    nc3: float
    nc4: float
    accuracy: float
    num_samples: int
    num_classes: int
    feature_dim: int
    holdout_nc4: float
    holdout_accuracy: float
    holdout_num_samples: int
    def __init__(self, nc0: _Optional[float] = ..., nc0_normalized: _Optional[float] = ..., nc1: _Optional[float] = ..., nc1_trace_ratio: _Optional[float] = ..., cdnv: _Optional[float] = ..., nc2_norm: _Optional[float] = ..., nc2_angle: _Optional[float] = ..., nc2: _Optional[float] = ..., nc2w_norm: _Optional[float] = ..., nc2w_angle: _Optional[float] = ..., nc2w: _Optional[float] = ..., nc2m: _Optional[float] = ..., nc3: _Optional[float] = ..., nc4: _Optional[float] = ..., accuracy: _Optional[float] = ..., num_samples: _Optional[int] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., holdout_nc4: _Optional[float] = ..., holdout_accuracy: _Optional[float] = ..., holdout_num_samples: _Optional[int] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("run_id", "step", "epoch", "status", "incomplete_reason", "finalized_unix", "metrics", "scalars")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    FINALIZED_UNIX_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    epoch: int
    status: StepStatus
    incomplete_reason: str
    finalized_unix: float
    metrics: NCMetrics
    scalars: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., status: _Optional[_Union[StepStatus, str]] = ..., incomplete_reason: _Optional[str] = ..., finalized_unix: _Optional[float] = ..., metrics: _Optional[_Union[NCMetrics, _Mapping]] = ..., scalars: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StepRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("run_id", "step", "range", "latest", "include_incomplete")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    range: StepRange
    latest: bool
    include_incomplete: bool
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., range: _Optional[_Union[StepRange, _Mapping]] = ..., latest: _Optional[bool] = ..., include_incomplete: _Optional[bool] = ...) -> None: ...

class GetMetricsReply(_message.Message):
    __slots__ = ("measurements",)
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    measurements: _containers.RepeatedCompositeFieldContainer[Measurement]
    def __init__(self, measurements: _Optional[_Iterable[_Union[Measurement, _Mapping]]] = ...) -> None: ...

class WatchMetricsRequest(_message.Message):
    __slots__ = ("run_id", "after_step", "include_incomplete")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_STEP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_step: int
    include_incomplete: bool
    def __init__(self, run_id: _Optional[str] = ..., after_step: _Optional[int] = ..., include_incomplete: _Optional[bool] = ...) -> None: ...

class RecordScalarsRequest(_message.Message):
    __slots__ = ("run_id", "step", "epoch", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    epoch: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RecordScalarsReply(_message.Message):
    __slots__ = ("num_values",)
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    num_values: int
    def __init__(self, num_values: _Optional[int] = ...) -> None: ...

class GetScalarsRequest(_message.Message):
    __slots__ = ("run_id", "range", "keys")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    range: StepRange
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., range: _Optional[_Union[StepRange, _Mapping]] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ScalarRecord(_message.Message):
    __slots__ = ("step", "epoch", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    epoch: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., epoch: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetScalarsReply(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ScalarRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[ScalarRecord, _Mapping]]] = ...) -> None: ...
