"""The per-layer Step exchange over a plain TCP connection (`--step-transport tcp`).

Control frames are the gRPC Step stream's messages (`disagg.v1.StepRequest` / `StepResponse`,
protobuf); the per-layer tensors travel raw. Why: on the decode pod's hot path a frame goes out and
its answer comes back 30 × micro-batches times per decode step. grpcio's Python stream spends its
CPU in thread handoffs, and protobuf copies every tensor three or four times on each side (into the
message, serialized, parsed); a raw tensor frame leaves from the tensors' own memory in one
`sendmsg` and lands in the receiver's tensor with `recv_into`. `python bench/layer_rtt.py`
measures the carriers against one real attention pod (p50 and CPU per round trip on each side).
The gRPC stream stays as the fallback and the reference.

Frame, both directions (network byte order):

    ┌──────────┬────────────────┬──────────────────────────────┐
    │ kind: u8 │ length: u32    │ payload: `length` bytes       │
    └──────────┴────────────────┴──────────────────────────────┘
    kind MESSAGE  payload = a serialized StepRequest (client → pod: `begin`, or a protobuf `layer`)
                  or StepResponse (pod → client, answering a protobuf `layer`)
    kind ERROR    payload = UTF-8 "STATUS_NAME\\nmessage" (a gRPC status name); the pod then closes
    kind LAYER    client → pod, payload = step_id u64 | layer u32 | lanes u32 | q | k_new | v_new
    kind OUTPUT   pod → client, payload = step_id u64 | layer u32 | lanes u32 | o

LAYER and OUTPUT carry raw tensor bytes, little-endian, in the pod's dtype: q [Mq, G, D], k_new and
v_new [M, D], o [Mq, G, D] with M = lanes in a LAYER header, Mq = lanes in an OUTPUT header (the
step's lanes that are not kv_only: both sides know Mq from the step's `begin`; the geometry both
sides checked through `Stats`). The
receiver reads the 16-byte layer header first and checks step, layer, lanes and the exact payload
length against what it expects before allocating the tensor bytes. `length` is checked against the
receiver's limit before any allocation; a bad kind, an oversized frame or a truncated stream raises
`FrameError`. Nothing is pickled. One connection carries one client's steps in order, exactly like
one gRPC Step stream; its server side owns one StepSession.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from enum import IntEnum

import torch

from services.core.errors import DisaggError
from services.core.wire import require_little_endian

HEADER = struct.Struct("!BI")  # kind, payload length
LAYER_HEADER = struct.Struct("!QII")  # step_id, layer, lanes: the start of LAYER and OUTPUT payloads


class FrameKind(IntEnum):
    MESSAGE = 0
    ERROR = 1
    LAYER = 2  # raw q, k_new, v_new of one layer (client → pod)
    OUTPUT = 3  # raw o of one layer (pod → client)


class FrameError(DisaggError):
    """A frame that cannot be accepted, or a connection that ended mid-frame."""


class ConnectionClosed(FrameError):
    """The peer closed the connection between frames (a clean end of the stream)."""


def configure(sock: socket.socket) -> socket.socket:
    """Small frames must leave at once (no Nagle delay) and a dead peer must be noticed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def send_frame(sock: socket.socket, kind: FrameKind, payload: bytes) -> None:
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)


def send_error(sock: socket.socket, status: str, message: str) -> None:
    send_frame(sock, FrameKind.ERROR, f"{status}\n{message}".encode())


def parse_error(payload: bytes) -> tuple[str, str]:
    """(status name, message) of an ERROR frame."""
    status, _, message = payload.decode("utf-8", errors="replace").partition("\n")
    return status, message


def recv_frame(sock: socket.socket, max_bytes: int) -> tuple[FrameKind, bytes]:
    """The next frame, whole; ConnectionClosed at a clean end, FrameError for anything malformed."""
    kind, length = recv_header(sock, max_bytes)
    return kind, recv_bytes(sock, length)


def recv_header(sock: socket.socket, max_bytes: int) -> tuple[FrameKind, int]:
    """The next frame's kind and payload length (checked against `max_bytes`); the payload is next."""
    header = bytearray(HEADER.size)
    _recv_into(sock, memoryview(header), at_boundary=True)
    kind, length = HEADER.unpack(header)
    if kind not in FrameKind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}; is the peer a disagg Step socket?")
    if length > max_bytes:
        raise FrameError(
            f"a frame of {length} bytes is over the limit of {max_bytes} (max_message_bytes on both sides)"
        )
    return FrameKind(kind), length


def recv_bytes(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes of the current frame's payload."""
    buffer = bytearray(size)
    _recv_into(sock, memoryview(buffer), at_boundary=False)
    return bytes(buffer)


def recv_layer_header(sock: socket.socket, length: int) -> tuple[int, int, int]:
    """(step_id, layer, lanes) that start a LAYER or OUTPUT payload of `length` bytes."""
    if length < LAYER_HEADER.size:
        raise FrameError(
            f"a tensor frame of {length} bytes is shorter than its {LAYER_HEADER.size}-byte header"
        )
    step_id, layer, lanes = LAYER_HEADER.unpack(recv_bytes(sock, LAYER_HEADER.size))
    return step_id, layer, lanes


def recv_tensor(sock: socket.socket, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The rest of the frame, read straight into a fresh 1-D tensor of `numel` elements (the caller
    checked the frame's length against this size, so nothing here allocates what the peer chose)."""
    require_little_endian()
    out = torch.empty(numel, dtype=dtype)
    _recv_into(sock, _byte_view(out), at_boundary=False)
    return out


def send_tensors(
    sock: socket.socket,
    kind: FrameKind,
    step_id: int,
    layer: int,
    lanes: int,
    tensors: Sequence[torch.Tensor],
) -> int:
    """One LAYER or OUTPUT frame from the tensors' own memory (CPU, any dtype; made contiguous if
    they are not); returns the tensor bytes sent."""
    require_little_endian()
    views = [_byte_view(t.contiguous()) for t in tensors]
    size = sum(v.nbytes for v in views)
    header = HEADER.pack(kind, LAYER_HEADER.size + size) + LAYER_HEADER.pack(step_id, layer, lanes)
    _send_all(sock, [memoryview(header), *views])
    return size


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared (through a uint8 view: bf16 has no numpy type)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """`sendmsg` until every buffer has left (a large frame may leave in several calls)."""
    while buffers:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= buffers[0].nbytes:
            sent -= buffers[0].nbytes
            buffers.pop(0)
        if buffers and sent:
            buffers[0] = buffers[0][sent:]


def _recv_into(sock: socket.socket, view: memoryview, *, at_boundary: bool) -> None:
    size, got = view.nbytes, 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if at_boundary and got == 0:
                raise ConnectionClosed("the peer closed the connection")
            raise FrameError(f"the connection ended {size - got} bytes short of a frame")
        got += n
