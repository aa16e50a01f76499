"""A prompt's KV computed by a prefill pod: the `PrefillJob` the decode pod gives its engine loop.

    client = PrefillClient(timeout_s=60, max_message_bytes=64 << 20)    # one per decode pod
    job = RemotePrefill(client, "prefill-0:50071", prompt_ids, placement, request_id, attention.wire_id)
    stream = loop.submit(prompt_ids, params, prefill=job)

Lifecycle of one request (proto/disagg/v1/prefill.proto):

    engine thread: Open + Reserve(len(prompt)) on its attention pods       (EngineLoop, Engine)
    job.start:     Prefill{seq_id: wire id, token_ids: prompt[:-1], placement} as a gRPC future
    gRPC thread:   the answer ─▶ done(None), or done(PrefillPodError naming the pod and the status)
    engine thread: add_request(prefilled=len(prompt) - 1): the last prompt token runs in the batch
                   and the first token is sampled here, with the request's own generator

The call is a gRPC future, so no thread waits for it and the running batch keeps decoding. A pod
that is unreachable, overloaded or too slow (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is
not the request's fault: the loop then prefills the prompt itself (`PrefillUnavailableError`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from services.core.errors import DisaggError
from services.core.placement import Placement, placement_to_proto
from services.core.wire import grpc_message_options
from services.decode.loop import PrefillJob, PrefillUnavailableError
from services.proto import prefill_pb2, prefill_pb2_grpc


class PrefillPodError(DisaggError):
    """The prefill pod failed the prompt (for a reason that would fail a local prefill too)."""

    def __init__(self, address: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"prefill pod {address}: {message}")
        self.address = address
        self.code = code


class PrefillPodUnavailableError(PrefillUnavailableError):
    """The prefill pod is unreachable, overloaded or too slow: the decode pod prefills instead."""

    def __init__(self, address: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"prefill pod {address}: {message}")
        self.address = address
        self.code = code


# Statuses that say "this prefill pod cannot do it now", not "this prompt cannot be prefilled".
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class PrefillClient:
    """One channel per prefill pod address, shared by every request; thread-safe."""

    def __init__(self, timeout_s: float, max_message_bytes: int) -> None:
        self.timeout_s = timeout_s  # deadline of one Prefill call, queueing on the pod included
        self.max_message_bytes = max_message_bytes
        self._stubs: dict[str, prefill_pb2_grpc.PrefillStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=grpc_message_options(self.max_message_bytes))
                self._channels.append(channel)
                stub = self._stubs[address] = prefill_pb2_grpc.PrefillStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels.clear()
            self._stubs.clear()


class RemotePrefill(PrefillJob):
    """Prefill of one prompt on one prefill pod; positions [0, len(prompt) - 1) are written."""

    def __init__(
        self,
        client: PrefillClient,
        address: str,
        prompt_ids: list[int],
        placement: Placement,
        request_id: str,
        wire_id: Callable[[int], int],
    ) -> None:
        if len(prompt_ids) < 2:
            raise ValueError("a remote prefill needs a prompt of at least 2 tokens (the last runs here)")
        self.client = client
        self.address = address
        self.prompt_ids = prompt_ids
        self.placement = placement
        self.request_id = request_id
        self.wire_id = wire_id  # engine sequence id -> the attention pods' id (RemoteAttention.wire_id)
        self.num_tokens = len(prompt_ids) - 1
        self.finished_at: float | None = None  # time.monotonic() when the pod answered
        self.response: prefill_pb2.PrefillResponse | None = None

    def start(self, seq_id: int, done: Callable[[Exception | None], None]) -> None:
        request = prefill_pb2.PrefillRequest(
            seq_id=self.wire_id(seq_id),
            token_ids=self.prompt_ids[: self.num_tokens],
            request_id=self.request_id,
        )
        placement_to_proto(self.placement, request.placement)
        future = self.client.stub(self.address).Prefill.future(request, timeout=self.client.timeout_s)
        future.add_done_callback(lambda f: done(self._outcome(f)))

    def _outcome(self, future: grpc.Future) -> DisaggError | None:
        self.finished_at = time.monotonic()
        try:
            response = future.result()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            status = code.name if code else "error"
            kind = PrefillPodUnavailableError if code in _UNAVAILABLE else PrefillPodError
            return kind(self.address, f"Prefill failed: {status}: {details}", code)
        except grpc.FutureCancelledError:
            return PrefillPodError(self.address, "Prefill was cancelled")
        if response.tokens != self.num_tokens:
            return PrefillPodError(
                self.address, f"wrote {response.tokens} positions, expected {self.num_tokens}"
            )
        self.response = response
        return None
