"""The attention pod's Step exchange over TCP (services/core/transport/step_socket.py).

    server = StepSocketServer(handle, host, port, max_message_bytes).start()   # accept thread
    ... each connection: its own thread and its own StepSession, frames answered in order ...
    server.stop()                                                              # closes them all

`handle(session, frame)` is the same function the gRPC Step stream calls
(AttentionServicer.step_frame), so both carriers share every check. An error the gRPC stream would
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

from google.protobuf.message import DecodeError

from services.attention.engine import AttentionEngine, StepSession
from services.core.errors import DisaggError
from services.core.transport.step_socket import (
    ConnectionClosed,
    FrameError,
    FrameKind,
    configure,
    recv_frame,
    send_error,
    send_frame,
)
from services.proto import attention_pb2 as pb

log = logging.getLogger(__name__)

FrameHandler = Callable[[StepSession, pb.StepRequest], "pb.StepResponse | None"]
StatusOf = Callable[[BaseException], str]  # a gRPC status name for an error the pod knows


class StepSocketServer:
    def __init__(
        self,
        engine: AttentionEngine,
        handle: FrameHandler,
        status_of: StatusOf,
        host: str,
        port: int,
        *,
        max_message_bytes: int,
        max_connections: int,
    ) -> None:
        self.engine = engine
        self.handle = handle
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
                kind, payload = recv_frame(conn, self.max_message_bytes)
                if kind is not FrameKind.MESSAGE:
                    raise FrameError("a client sends only MESSAGE frames")
                response = self.handle(session, pb.StepRequest.FromString(payload))
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


def _refuse(conn: socket.socket, message: str, status: str = "RESOURCE_EXHAUSTED") -> None:
    with contextlib.suppress(OSError):  # the peer may be gone already: nobody to tell
        send_error(conn, status, message)
    _close(conn)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected any more
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
