"""One attention pod as the decode side sees it: channel, stub, the Step stream and its deadline.

    link = PodLink(address, options, watchdog)   # connects: Stats, waiting for the pod to come up
    link.check_geometry(model_config, dtype)     # same model and dtype, else AttentionPodError
    stream = link.stream()                       # the live Step stream (a fresh one after a failure)
    stream.send(frame); response = stream.receive(timeout_s)

Two carriers of the same Step frames (`RemoteAttentionOptions.step_transport`): `SocketStepStream`
over the pod's Step socket (tcp, the default: no thread handoffs, see
services/core/transport/step_socket.py) and `StepStream`, the gRPC bidirectional stream (grpc, also
used when a pod offers no socket).

`RemoteAttention` (remote_attention.py) builds steps on top of these.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import grpc
import torch

from services.core.errors import DisaggError
from services.core.model.config import ModelConfig
from services.core.transport.step_socket import (
    LAYER_HEADER,
    ConnectionClosed,
    FrameError,
    FrameKind,
    configure,
    parse_error,
    recv_bytes,
    recv_header,
    recv_layer_header,
    recv_tensor,
    send_frame,
    send_tensors,
)
from services.core.wire import WIRE_TO_DTYPE, grpc_message_options
from services.proto import attention_pb2 as pb
from services.proto import attention_pb2_grpc as pb_grpc


class AttentionPodError(DisaggError):
    """An attention pod failed a call, went away or did not answer in time."""

    def __init__(self, address: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"attention pod {address}: {message}")
        self.address = address
        self.code = code

    @classmethod
    def from_rpc(cls, address: str, what: str, exc: grpc.RpcError) -> AttentionPodError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        return cls(address, f"{what} failed: {code.name if code else 'error'}: {details}", code)


class StepTransport(StrEnum):
    TCP = "tcp"  # the pod's Step socket: length-prefixed frames on a plain TCP connection
    GRPC = "grpc"  # the Step bidirectional gRPC stream


@dataclass(slots=True, frozen=True)
class RemoteAttentionOptions:
    rpc_timeout_s: float = 10.0  # deadline of every unary call
    connect_timeout_s: float = 30.0  # how long the first call waits for a pod to come up
    layer_timeout_s: float = 30.0  # how long `attend` waits for one layer's output
    max_message_bytes: int = 64 << 20  # per message, both directions
    owner: str = ""  # this decode pod's id: attention pods free its sequences if it leaves the registry
    step_transport: StepTransport = StepTransport.TCP  # what carries the per-layer Step frames
    # A prompt's first chunk (it attends only to itself) is attended in this process and the pods
    # get only its K/V (StepChunk.kv_only); False: the pods attend it (q and o cross the network).
    local_prompt_attention: bool = True


class StepStream:
    """One bidirectional Step call. Frames leave through a queue that gRPC's sender thread drains;
    answers are read on the caller's thread (no extra hop), under a deadline the watchdog enforces."""

    def __init__(self, stub: pb_grpc.AttentionStub, address: str) -> None:
        self.address = address
        self.failure: AttentionPodError | None = None
        self.deadline: float | None = None  # monotonic time, set only while waiting for an answer
        self._overdue = False  # set by the watchdog when it cancelled the call
        self._outbox: queue.SimpleQueue[pb.StepRequest | None] = queue.SimpleQueue()
        self._call = stub.Step(self._frames())

    def _frames(self) -> Iterator[pb.StepRequest]:
        while (frame := self._outbox.get()) is not None:
            yield frame

    def send(self, frame: pb.StepRequest) -> None:
        if self.failure is not None:
            raise self.failure
        self._outbox.put(frame)

    def receive(self, timeout_s: float) -> pb.StepResponse:
        if self.failure is not None:
            raise self.failure
        self.deadline = time.monotonic() + timeout_s
        try:
            return next(self._call)
        except StopIteration:
            raise self._fail(AttentionPodError(self.address, "the pod closed the Step stream")) from None
        except grpc.RpcError as exc:
            if self._overdue:
                error = AttentionPodError(self.address, f"no answer within {timeout_s:g} s")
            else:
                error = AttentionPodError.from_rpc(self.address, "Step stream", exc)
            raise self._fail(error) from None
        finally:
            self.deadline = None

    def expire(self) -> None:
        """Called by the watchdog: the answer is overdue; `receive` then raises."""
        self._overdue = True
        self._call.cancel()

    def _fail(self, error: AttentionPodError) -> AttentionPodError:
        self.close(error)
        return error

    def close(self, error: AttentionPodError | None = None) -> None:
        if self.failure is None:
            self.failure = error or AttentionPodError(self.address, "Step stream closed by the client")
        self._outbox.put(None)
        self._call.cancel()


GONE = grpc.StatusCode.UNAVAILABLE  # socket failures read like the gRPC stream's transport failures
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


class SocketStepStream:
    """The Step exchange over the pod's Step socket. Frames are written and answers read on the
    caller's thread; the socket's timeout is the answer's deadline (no watchdog needed)."""

    def __init__(self, address: str, port: int, options: RemoteAttentionOptions) -> None:
        self.address = address
        self.failure: AttentionPodError | None = None
        self.deadline: float | None = None  # never set: the Watchdog leaves this stream alone
        self._max_bytes = options.max_message_bytes
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            sock = socket.create_connection((host, port), timeout=options.connect_timeout_s)
        except OSError as exc:
            raise AttentionPodError(
                address, f"cannot connect to its Step socket {host}:{port}: {exc}"
            ) from None
        self._sock = configure(sock)

    def send(self, frame: pb.StepRequest) -> None:
        """A protobuf frame (`begin`; layers go raw through `send_layer`)."""
        with self._sending():
            send_frame(self._sock, FrameKind.MESSAGE, frame.SerializeToString())

    def send_layer(self, step_id: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
        """One raw LAYER frame from the tensors' memory: q [Mq, G, D], k and v [M, D] (the header
        carries M); returns the tensor bytes sent."""
        with self._sending():
            return send_tensors(self._sock, FrameKind.LAYER, step_id, layer, k.shape[0], [q, k, v])

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        if self.failure is not None:
            raise self.failure
        try:
            yield
        except OSError as exc:
            error = AttentionPodError(self.address, f"Step socket send failed: {exc}", GONE)
            raise self._fail(error) from None

    def receive(self, timeout_s: float) -> pb.StepResponse:
        """The answer to a protobuf layer frame."""
        with self._reading(timeout_s):
            kind, length = recv_header(self._sock, self._max_bytes)
            payload = recv_bytes(self._sock, length)
            if kind is FrameKind.ERROR:
                raise self._error_frame(payload)
            if kind is not FrameKind.MESSAGE:
                raise FrameError(f"the pod answered a protobuf frame with a {kind.name} frame")
        return pb.StepResponse.FromString(payload)

    def receive_output(
        self, step_id: int, layer: int, shape: tuple[int, int, int], dtype: torch.dtype, timeout_s: float
    ) -> torch.Tensor:
        """The raw OUTPUT frame answering LAYER (step_id, layer): o of `shape` [Mq, G, D], read
        straight into a fresh tensor once its header says it is the expected answer."""
        with self._reading(timeout_s):
            kind, length = recv_header(self._sock, self._max_bytes)
            if kind is FrameKind.ERROR:
                raise self._error_frame(recv_bytes(self._sock, length))
            if kind is not FrameKind.OUTPUT:
                raise FrameError(f"the pod answered a LAYER frame with a {kind.name} frame")
            got = recv_layer_header(self._sock, length)
            if got[:2] != (step_id, layer):
                error = AttentionPodError(
                    self.address,
                    f"answered step {got[0]} layer {got[1]}, expected step {step_id} layer {layer}",
                )
                raise self._fail(error)
            numel = shape[0] * shape[1] * shape[2]
            if got[2] != shape[0] or length - LAYER_HEADER.size != numel * dtype.itemsize:
                raise FrameError(
                    f"step {step_id} layer {layer}: o of {got[2]} lanes in "
                    f"{length - LAYER_HEADER.size} bytes, expected {list(shape)} {dtype}"
                )
            return recv_tensor(self._sock, numel, dtype).view(shape)

    @contextlib.contextmanager
    def _reading(self, timeout_s: float) -> Iterator[None]:
        """Failures while reading an answer, as AttentionPodError (the stream is then closed)."""
        if self.failure is not None:
            raise self.failure
        try:
            self._sock.settimeout(timeout_s)
            yield
        except TimeoutError:
            error = AttentionPodError(self.address, f"no answer within {timeout_s:g} s", DEADLINE)
            raise self._fail(error) from None
        except ConnectionClosed:
            raise self._fail(
                AttentionPodError(self.address, "the pod closed the Step socket", GONE)
            ) from None
        except (FrameError, OSError) as exc:  # reset (the pod died), or a malformed frame
            raise self._fail(AttentionPodError(self.address, f"Step socket: {exc}", GONE)) from None

    def _error_frame(self, payload: bytes) -> AttentionPodError:
        status, message = parse_error(payload)
        code = grpc.StatusCode.__members__.get(status)
        return self._fail(AttentionPodError(self.address, f"Step failed: {status}: {message}", code))

    def expire(self) -> None:
        self.close(AttentionPodError(self.address, "Step socket closed: answer overdue"))

    def _fail(self, error: AttentionPodError) -> AttentionPodError:
        self.close(error)
        return error

    def close(self, error: AttentionPodError | None = None) -> None:
        if self.failure is None:
            self.failure = error or AttentionPodError(self.address, "Step socket closed by the client")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # not connected any more
        self._sock.close()


class Watchdog:
    """Cancels Step calls whose answer is overdue. It polls, so arming a deadline costs `attend`
    one attribute write instead of a thread handoff; the price is `period_s` of lateness."""

    def __init__(self, period_s: float = 0.05) -> None:
        self._period_s = period_s
        self._streams: list[StepStream | SocketStepStream] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attention-watchdog", daemon=True)
        self._thread.start()

    def watch(self, stream: StepStream | SocketStepStream) -> None:
        with self._lock:
            self._streams = [s for s in self._streams if s.failure is None] + [stream]

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams)
            for stream in streams:
                deadline = stream.deadline
                if deadline is not None and now > deadline:
                    stream.expire()

    def stop(self) -> None:
        self._stopped.set()


class PodLink:
    """Channel, stub and the current Step stream of one attention pod; checks its geometry once."""

    def __init__(self, address: str, options: RemoteAttentionOptions, watchdog: Watchdog) -> None:
        self.address = address
        self.options = options
        self.watchdog = watchdog
        self.channel = grpc.insecure_channel(address, options=grpc_message_options(options.max_message_bytes))
        self.stub = pb_grpc.AttentionStub(self.channel)
        self._stream: StepStream | SocketStepStream | None = None
        try:
            self.stats = self.stub.Stats(
                pb.StatsRequest(), timeout=options.connect_timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            self.channel.close()
            raise AttentionPodError.from_rpc(address, "Stats", exc) from None

    def check_geometry(self, config: ModelConfig, dtype: torch.dtype) -> None:
        check_geometry(self.address, self.stats, config, dtype)

    def stream(self) -> StepStream | SocketStepStream:
        """The live Step stream, opening a fresh one if the last one failed."""
        if self._stream is None or self._stream.failure is not None:
            self._stream = self._open_stream()
            self.watchdog.watch(self._stream)
        return self._stream

    def _open_stream(self) -> StepStream | SocketStepStream:
        if self.options.step_transport is StepTransport.TCP and self.stats.step_port:
            return SocketStepStream(self.address, self.stats.step_port, self.options)
        return StepStream(self.stub, self.address)

    def close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def close(self) -> None:
        self.close_stream()
        self.channel.close()


def check_geometry(address: str, stats: pb.StatsResponse, config: ModelConfig, dtype: torch.dtype) -> None:
    """Raise AttentionPodError unless the pod serves this model's geometry and dtype."""
    s = stats
    theirs = (s.num_layers, s.num_kv_heads, s.group_size, s.head_dim, WIRE_TO_DTYPE.get(s.dtype))
    ours = (config.num_layers, config.num_kv_heads, config.group_size, config.head_dim, dtype)
    if theirs != ours:
        raise AttentionPodError(
            address,
            f"serves (layers, KV heads, group, head dim, dtype) = {theirs} but this model has {ours}; "
            "start every pod with the same --model and --dtype",
        )


def probe_pod(address: str, config: ModelConfig, dtype: torch.dtype, timeout_s: float) -> None:
    """One Stats call, not waiting for a pod that is down: raise AttentionPodError unless the pod
    answers within `timeout_s` with this model's geometry. For servers, to check a placement off
    the engine thread before a request reaches it (a `PodLink` waits for a pod to come up)."""
    with grpc.insecure_channel(address) as channel:
        try:
            stats = pb_grpc.AttentionStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise AttentionPodError.from_rpc(address, "Stats", exc) from None
    check_geometry(address, stats, config, dtype)
