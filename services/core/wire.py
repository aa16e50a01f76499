"""Tensor codec for the wire: `torch.Tensor` ⇄ `disagg.v1.Tensor` (dtype, shape, raw bytes).

    encode_into(message.q, q)                  # sender: one copy, tensor -> bytes
    q = decode(message.q, limits, dtype=...)   # receiver: checked, then zero-copy

Never pickles. `decode` validates what the message *declares* — dtype, rank, non-negative dims,
byte size against `TensorLimits.max_bytes` — before touching the payload, then checks the payload
length and wraps the received bytes in place (`torch.frombuffer`, no copy). Elements are
little-endian row-major; every host we run on is little-endian, and the codec refuses to run on a
big-endian one rather than silently swapping bytes.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from dataclasses import dataclass
from enum import Enum

import torch

from services.core.errors import DisaggError
from services.proto import tensor_pb2

DTYPE_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
}
WIRE_TO_DTYPE: dict[int, torch.dtype] = {wire: dtype for dtype, wire in DTYPE_TO_WIRE.items()}
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_TO_WIRE}
_LITTLE_ENDIAN = sys.byteorder == "little"


class WireProblem(Enum):
    DTYPE = "dtype"  # unknown, unspecified or not the one expected
    SHAPE = "shape"  # rank too high, a negative dim, or not the shape expected
    TOO_LARGE = "too_large"  # declared size over the limit
    LENGTH = "length"  # payload length differs from what dtype and shape declare
    HOST = "host"  # this host cannot use the wire format (big-endian)


class WireError(DisaggError):
    """A tensor message that cannot be accepted; the message names the field and the problem."""

    def __init__(self, problem: WireProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(slots=True, frozen=True)
class TensorLimits:
    """What a receiver accepts; checked before any allocation."""

    max_bytes: int  # payload bytes of one tensor
    max_rank: int = 8


def grpc_message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC server/channel options with explicit message limits (the 4 MiB default is too small)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def dtype_name(wire_dtype: int) -> str:
    return tensor_pb2.DType.Name(wire_dtype) if wire_dtype in tensor_pb2.DType.values() else str(wire_dtype)


def encode_into(message: tensor_pb2.Tensor, tensor: torch.Tensor) -> None:
    """Fill `message` (e.g. a submessage of a frame, to avoid copying it again) from a tensor."""
    wire = DTYPE_TO_WIRE.get(tensor.dtype)
    if wire is None:
        raise WireError(WireProblem.DTYPE, f"cannot send {tensor.dtype}; the wire carries {_known()}")
    require_little_endian()
    message.dtype = wire
    message.shape[:] = tensor.shape
    # [numel * itemsize] uint8 view of the contiguous tensor; works for bf16, which numpy lacks.
    message.data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    message = tensor_pb2.Tensor()
    encode_into(message, tensor)
    return message


def decode(
    message: tensor_pb2.Tensor,
    limits: TensorLimits,
    *,
    name: str = "tensor",
    dtype: torch.dtype | None = None,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The tensor a message carries, sharing its bytes. Raises `WireError` naming `name`.

    `dtype` / `shape`, when given, are what the receiver expects. The result is read-only in
    practice: it aliases the message's immutable bytes, so receivers must not write into it.
    """
    got = _checked_dtype(message.dtype, name, dtype)
    dims = tuple(message.shape)
    if len(dims) > limits.max_rank:
        raise WireError(WireProblem.SHAPE, f"{name}: rank {len(dims)} is over the limit of {limits.max_rank}")
    if any(d < 0 for d in dims):
        raise WireError(WireProblem.SHAPE, f"{name}: shape {list(dims)} has a negative dimension")
    nbytes = math.prod(dims) * _ITEMSIZE[got]  # Python ints: no overflow whatever the dims
    # Zero dims count as 1 here, so an empty [0, 2**40, ...] cannot overflow torch's strides either.
    extent = math.prod(max(d, 1) for d in dims) * _ITEMSIZE[got]
    if extent > limits.max_bytes:
        raise WireError(
            WireProblem.TOO_LARGE,
            f"{name}: shape {list(dims)} of {got} spans {extent} bytes, over the limit of "
            f"{limits.max_bytes} bytes",
        )
    if shape is not None and dims != shape:
        raise WireError(
            WireProblem.SHAPE, f"{name}: shape {list(dims)} differs from the expected {list(shape)}"
        )
    data = message.data
    if len(data) != nbytes:
        raise WireError(
            WireProblem.LENGTH,
            f"{name}: data holds {len(data)} bytes but shape {list(dims)} of {got} needs {nbytes} bytes",
        )
    require_little_endian()
    if nbytes == 0:  # frombuffer rejects empty buffers
        return torch.empty(dims, dtype=got)
    return _frombuffer(data, got).view(dims)


def _checked_dtype(wire: int, name: str, expected: torch.dtype | None) -> torch.dtype:
    got = WIRE_TO_DTYPE.get(wire)
    if got is None:
        raise WireError(WireProblem.DTYPE, f"{name}: dtype {dtype_name(wire)} is not one of {_known()}")
    if expected is not None and got != expected:
        raise WireError(WireProblem.DTYPE, f"{name}: dtype {got} differs from the expected {expected}")
    return got


def _known() -> str:
    return ", ".join(str(dtype) for dtype in DTYPE_TO_WIRE)


def require_little_endian() -> None:
    if not _LITTLE_ENDIAN:
        raise WireError(WireProblem.HOST, "the wire format is little-endian; this host is big-endian")


_warned_lock = threading.Lock()
_warned = False


def _frombuffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """`torch.frombuffer` on immutable bytes, without the copy `bytearray(data)` would cost.

    torch warns (once per process) that the tensor could write into a non-writable buffer. It is
    safe here: decoded tensors are only read (attention inputs, K/V copied into the pool, outputs
    fed to the O projection). The first call swallows that one warning; later calls never warn.
    """
    global _warned
    if _warned:
        return torch.frombuffer(data, dtype=dtype)
    with _warned_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        tensor = torch.frombuffer(data, dtype=dtype)
        _warned = True
    return tensor
