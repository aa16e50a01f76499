"""The attention pod's Step exchange over TCP (services/core/transport/step_socket.py).

    server = StepSocketServer(engine, handle, handle_layer, status_of, host, port, ...).start()
    ... each connection: its own thread and its own StepSession, frames answered in order ...
    server.stop()                                                              # closes them all

`handle(session, frame)` is the same function the gRPC Step stream calls
(AttentionServicer.step_frame) for protobuf frames; a raw LAYER frame is checked here (step,
layer, lanes and its exact length, before its tensor bytes are read) and then goes through
`handle_layer(session, step_id, layer, q, k, v)`, the function step_frame calls once it has
decoded a protobuf layer, so both carriers share every check. An error the gRPC stream would
end with a status ends the connection with an ERROR frame carrying that status and message; the
pod keeps serving other connections. Connections are bounded (`max_connections`, like the gRPC
server's thread limit): one more gets RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

import torch
from google.protobuf.message import DecodeError

from services.attention.engine import AttentionEngine, InvalidFrameError, StepSession
from services.core.errors import DisaggError
from services.core.transport.step_socket import (
    LAYER_HEADER,
    ConnectionClosed,
    FrameError,
    FrameKind,
    configure,
    recv_bytes,
    recv_header,
    recv_layer_header,
    recv_tensor,
    send_error,
    send_frame,
    send_tensors,
)
from services.proto import attention_pb2 as pb

log = logging.getLogger(__name__)

FrameHandler = Callable[[StepSession, pb.StepRequest], "pb.StepResponse | None"]
LayerHandler = Callable[[StepSession, int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StatusOf = Callable[[BaseException], str]  # a gRPC status name for an error the pod knows


class StepSocketServer:
    def __init__(
        self,
        engine: AttentionEngine,
        handle: FrameHandler,
        handle_layer: LayerHandler,
        status_of: StatusOf,
        host: str,
        port: int,
        *,
        max_message_bytes: int,
        max_connections: int,
    ) -> None:
        self.engine = engine
        self.handle = handle
        self.handle_layer = handle_layer
        self.status_of = status_of
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()  # one per connection, joined by stop()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="step-accept", daemon=True)

    def start(self) -> StepSocketServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        _close(self._listener)  # shutdown() wakes the accept() blocked in the accept thread
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for conn in connections:  # their threads see the reset and end
            _close(conn)
        self._thread.join(5)
        # Join them before the interpreter exits: a daemon thread still inside a torch op at exit
        # aborts the process ("terminate called without an active exception").
        for thread in threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:  # the listener was closed by stop()
                return
            configure(conn)
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                _refuse(conn, f"the pod serves at most {self.max_connections} Step connections")
                continue
            name = f"step-{peer[0]}:{peer[1]}"
            thread = threading.Thread(target=self._serve, args=(conn,), name=name, daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        session = self.engine.session()
        try:
            while True:
                kind, length = recv_header(conn, self.max_message_bytes)
                if kind is FrameKind.LAYER:
                    step_id, layer, o = self._layer(conn, session, length)
                    send_tensors(conn, FrameKind.OUTPUT, step_id, layer, o.shape[0], [o])
                    continue
                if kind is not FrameKind.MESSAGE:
                    raise FrameError(f"a client sends MESSAGE or LAYER frames, not {kind.name}")
                response = self.handle(session, pb.StepRequest.FromString(recv_bytes(conn, length)))
                if response is not None:
                    send_frame(conn, FrameKind.MESSAGE, response.SerializeToString())
        except ConnectionClosed:
            pass
        except (FrameError, DecodeError) as exc:
            _refuse(conn, f"malformed Step frame: {exc}", status="INVALID_ARGUMENT")
        except DisaggError as exc:
            _refuse(conn, str(exc), status=self.status_of(exc))
        except OSError:  # reset by the peer, or closed by stop()
            pass
        except Exception as exc:  # a bug: say so to the client, keep the traceback here
            log.exception("attention pod failed a Step connection")
            _refuse(conn, f"attention pod bug: {type(exc).__name__}: {exc}", status="INTERNAL")
        finally:
            session.close()  # steps left open are abandoned (their compute so far stays charged)
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            _close(conn)

    def _layer(self, conn: socket.socket, session: StepSession, length: int) -> tuple[int, int, torch.Tensor]:
        """Read one LAYER frame's payload of `length` bytes and attend it: (step_id, layer, o)."""
        step_id, layer, lanes = recv_layer_header(conn, length)
        q_lanes, expected = session.expect_layer(step_id, layer)  # the step is open, this its next layer
        if lanes != expected:
            raise InvalidFrameError(
                f"step {step_id} layer {layer} carries {lanes} lanes; the step has {expected}"
            )
        g = self.engine.geometry
        q_numel, kv_numel = q_lanes * g.group_size * g.head_dim, lanes * g.head_dim
        body = (q_numel + 2 * kv_numel) * g.dtype.itemsize
        if length - LAYER_HEADER.size != body:
            raise FrameError(
                f"step {step_id} layer {layer}: the frame holds {length - LAYER_HEADER.size} tensor bytes, "
                f"but q of {q_lanes} lanes and k_new, v_new of {lanes} take {body}"
            )
        data = recv_tensor(conn, q_numel + 2 * kv_numel, g.dtype)
        q = data[:q_numel].view(q_lanes, g.group_size, g.head_dim)
        k = data[q_numel : q_numel + kv_numel].view(lanes, g.head_dim)
        v = data[q_numel + kv_numel :].view(lanes, g.head_dim)
        return step_id, layer, self.handle_layer(session, step_id, layer, q, k, v)


def _refuse(conn: socket.socket, message: str, status: str = "RESOURCE_EXHAUSTED") -> None:
    with contextlib.suppress(OSError):  # the peer may be gone already: nobody to tell
        send_error(conn, status, message)
    _close(conn)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected any more
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
