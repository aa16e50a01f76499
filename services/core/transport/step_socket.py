"""The per-layer Step exchange over a plain TCP connection (`--step-transport tcp`).

Same messages as the gRPC Step stream (`disagg.v1.StepRequest` / `StepResponse`, protobuf), carried
in length-prefixed frames instead of HTTP/2. Why: on the decode pod's hot path a frame goes out and
its answer comes back 30 × micro-batches times per decode step, and grpcio's Python stream spends
its CPU in thread handoffs: `python bench/layer_rtt.py` measures both carriers against one real
attention pod (p50 and CPU per round trip on each side).
The gRPC stream stays as the fallback and the reference.

Frame, both directions (network byte order):

    ┌──────────┬────────────────┬──────────────────────────────┐
    │ kind: u8 │ length: u32    │ payload: `length` bytes       │
    └──────────┴────────────────┴──────────────────────────────┘
    kind MESSAGE  payload = a serialized StepRequest (client → pod) or StepResponse (pod → client)
    kind ERROR    payload = UTF-8 "STATUS_NAME\\nmessage" (a gRPC status name); the pod then closes

`length` is checked against the receiver's limit before any allocation; a bad kind, an oversized
frame or a truncated stream raises `FrameError`. Nothing is pickled. One connection carries one
client's steps in order, exactly like one gRPC Step stream; its server side owns one StepSession.
"""

from __future__ import annotations

import socket
import struct
from enum import IntEnum

from services.core.errors import DisaggError

HEADER = struct.Struct("!BI")  # kind, payload length


class FrameKind(IntEnum):
    MESSAGE = 0
    ERROR = 1


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
    """The next frame; ConnectionClosed at a clean end, FrameError for anything malformed."""
    header = _recv_exactly(sock, HEADER.size, at_boundary=True)
    kind, length = HEADER.unpack(header)
    if kind not in FrameKind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}; is the peer a disagg Step socket?")
    if length > max_bytes:
        raise FrameError(
            f"a frame of {length} bytes is over the limit of {max_bytes} (max_message_bytes on both sides)"
        )
    return FrameKind(kind), _recv_exactly(sock, length, at_boundary=False)


def _recv_exactly(sock: socket.socket, size: int, *, at_boundary: bool) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if at_boundary and got == 0:
                raise ConnectionClosed("the peer closed the connection")
            raise FrameError(f"the connection ended {size - got} bytes short of a frame")
        got += n
    return bytes(buffer)
