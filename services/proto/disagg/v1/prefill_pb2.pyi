from disagg.v1 import placement_pb2 as _placement_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("seq_id", "token_ids", "placement", "request_id")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    placement: _placement_pb2.Placement
    request_id: str
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., placement: _Optional[_Union[_placement_pb2.Placement, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("tokens", "kv_bytes", "queue_seconds", "compute_seconds", "cost_usd")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    kv_bytes: int
    queue_seconds: float
    compute_seconds: float
    cost_usd: float
    def __init__(self, tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class PrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStatsResponse(_message.Message):
    __slots__ = ("pod_id", "queued_requests", "queued_tokens", "max_num_tokens", "max_model_len", "completed")
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    pod_id: str
    queued_requests: int
    queued_tokens: int
    max_num_tokens: int
    max_model_len: int
    completed: int
    def __init__(self, pod_id: _Optional[str] = ..., queued_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., max_num_tokens: _Optional[int] = ..., max_model_len: _Optional[int] = ..., completed: _Optional[int] = ...) -> None: ...
