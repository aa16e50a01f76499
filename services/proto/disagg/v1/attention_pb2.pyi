from disagg.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenRequest(_message.Message):
    __slots__ = ("seq_id", "kv_head_start", "kv_head_count", "policy", "owner", "budget", "scoring")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    kv_head_start: int
    kv_head_count: int
    policy: str
    owner: str
    budget: float
    scoring: str
    def __init__(self, seq_id: _Optional[int] = ..., kv_head_start: _Optional[int] = ..., kv_head_count: _Optional[int] = ..., policy: _Optional[str] = ..., owner: _Optional[str] = ..., budget: _Optional[float] = ..., scoring: _Optional[str] = ...) -> None: ...

class OpenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("seq_id", "num_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    num_tokens: int
    def __init__(self, seq_id: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reserved", "out_of_blocks")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    reserved: Reserved
    out_of_blocks: OutOfBlocks
    def __init__(self, reserved: _Optional[_Union[Reserved, _Mapping]] = ..., out_of_blocks: _Optional[_Union[OutOfBlocks, _Mapping]] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("capacity_tokens", "new_blocks")
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    capacity_tokens: int
    new_blocks: int
    def __init__(self, capacity_tokens: _Optional[int] = ..., new_blocks: _Optional[int] = ...) -> None: ...

class OutOfBlocks(_message.Message):
    __slots__ = ("needed_blocks", "free_blocks")
    NEEDED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    needed_blocks: int
    free_blocks: int
    def __init__(self, needed_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ...) -> None: ...

class ImportKVChunk(_message.Message):
    __slots__ = ("seq_id", "layer", "start", "k", "v")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    layer: int
    start: int
    k: _tensor_pb2.Tensor
    v: _tensor_pb2.Tensor
    def __init__(self, seq_id: _Optional[int] = ..., layer: _Optional[int] = ..., start: _Optional[int] = ..., k: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., v: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ImportKVResponse(_message.Message):
    __slots__ = ("chunks", "bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    def __init__(self, seq_id: _Optional[int] = ...) -> None: ...

class FreeResponse(_message.Message):
    __slots__ = ("released_blocks", "cost_usd")
    RELEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    released_blocks: int
    cost_usd: float
    def __init__(self, released_blocks: _Optional[int] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("pod_id", "blocks_total", "blocks_free", "blocks_used", "block_size", "sequences", "bytes_total", "bytes_used", "num_layers", "num_kv_heads", "group_size", "head_dim", "dtype", "max_message_bytes", "step_port")
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_PORT_FIELD_NUMBER: _ClassVar[int]
    pod_id: str
    blocks_total: int
    blocks_free: int
    blocks_used: int
    block_size: int
    sequences: int
    bytes_total: int
    bytes_used: int
    num_layers: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    dtype: _tensor_pb2.DType
    max_message_bytes: int
    step_port: int
    def __init__(self, pod_id: _Optional[str] = ..., blocks_total: _Optional[int] = ..., blocks_free: _Optional[int] = ..., blocks_used: _Optional[int] = ..., block_size: _Optional[int] = ..., sequences: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_used: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., group_size: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., max_message_bytes: _Optional[int] = ..., step_port: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("begin", "layer")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    begin: StepBegin
    layer: StepLayer
    def __init__(self, begin: _Optional[_Union[StepBegin, _Mapping]] = ..., layer: _Optional[_Union[StepLayer, _Mapping]] = ...) -> None: ...

class StepChunk(_message.Message):
    __slots__ = ("seq_id", "start", "length", "kv_only")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    KV_ONLY_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    length: int
    kv_only: bool
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., kv_only: _Optional[bool] = ...) -> None: ...

class StepBegin(_message.Message):
    __slots__ = ("step_id", "chunks")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[StepChunk]
    def __init__(self, step_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[StepChunk, _Mapping]]] = ...) -> None: ...

class StepLayer(_message.Message):
    __slots__ = ("step_id", "layer", "q", "k_new", "v_new")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_NEW_FIELD_NUMBER: _ClassVar[int]
    V_NEW_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    layer: int
    q: _tensor_pb2.Tensor
    k_new: _tensor_pb2.Tensor
    v_new: _tensor_pb2.Tensor
    def __init__(self, step_id: _Optional[int] = ..., layer: _Optional[int] = ..., q: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., k_new: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., v_new: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "layer", "o")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    O_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    layer: int
    o: _tensor_pb2.Tensor
    def __init__(self, step_id: _Optional[int] = ..., layer: _Optional[int] = ..., o: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PlanImportRequest(_message.Message):
    __slots__ = ("seq_id", "start", "length")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    length: int
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PlanImportResponse(_message.Message):
    __slots__ = ("agent_name", "pod_id", "transfer_id", "block_size", "row_bytes", "block_bytes", "dtype", "head_dim", "k_bases", "v_bases", "first_block", "lanes", "lease_ms")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    K_BASES_FIELD_NUMBER: _ClassVar[int]
    V_BASES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    pod_id: str
    transfer_id: int
    block_size: int
    row_bytes: int
    block_bytes: int
    dtype: _tensor_pb2.DType
    head_dim: int
    k_bases: _containers.RepeatedScalarFieldContainer[int]
    v_bases: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    lanes: _containers.RepeatedCompositeFieldContainer[LaneBlocks]
    lease_ms: int
    def __init__(self, agent_name: _Optional[str] = ..., pod_id: _Optional[str] = ..., transfer_id: _Optional[int] = ..., block_size: _Optional[int] = ..., row_bytes: _Optional[int] = ..., block_bytes: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., head_dim: _Optional[int] = ..., k_bases: _Optional[_Iterable[int]] = ..., v_bases: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ..., lanes: _Optional[_Iterable[_Union[LaneBlocks, _Mapping]]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class LaneBlocks(_message.Message):
    __slots__ = ("block_ids",)
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CompleteImportRequest(_message.Message):
    __slots__ = ("transfer_id", "abandon")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: int
    abandon: bool
    def __init__(self, transfer_id: _Optional[int] = ..., abandon: _Optional[bool] = ...) -> None: ...

class CompleteImportResponse(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...
