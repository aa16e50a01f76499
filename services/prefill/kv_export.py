"""Shipping a prompt's K/V to the attention pods of its placement, layer by layer.

    export = exporter.start(seq_id, placement)     # one ImportKV call per pod, fed from a queue
    export.send_layer(layer, k, v)                 # k, v [T, Hkv, D]: each pod gets its head slice
    ...                                            # (the forward goes on with the next layer)
    kv_bytes = export.finish(deadline)             # end the streams, wait for every pod's answer

Each pod's `ImportKV` is one client-streaming call. `send_layer` only puts views of the layer's
tensors in the call's queue; gRPC's sender thread takes them out, encodes them (the one copy into
message bytes) and sends them, so the network and encoding overlap the next layer's compute. A layer
whose slice would exceed `max_message_bytes` goes out as several chunks split along T.

Failures stay with their export: once a pod's call has failed, nothing more is queued for it,
`finish` cancels the sequence's other calls and raises the failure, and other exports (other
prompts of the same forward) are untouched. How a pod's status maps onto the two errors:

    UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL, ...   ─▶ AttentionPodUnreachableError
    NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, ...       ─▶ ImportRefusedError
      (the pod is up and refused: sequence not open, not reserved, head count or dtype mismatch)

Channels are cached per address; a pod that went away fails new calls fast (UNAVAILABLE) while
gRPC reconnects in the background, so a pod restarted on the same address is used again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from services.core.errors import DisaggError
from services.core.placement import Placement, PlacementEntry
from services.core.wire import encode_into, grpc_message_options
from services.proto import attention_pb2 as pb
from services.proto import attention_pb2_grpc as pb_grpc

# Room for a chunk's fields besides the K/V payload (ids, dtype, shapes, protobuf framing).
_MESSAGE_OVERHEAD_BYTES = 4096

# The pod answered and said no: retrying elsewhere will not help, the caller's setup is wrong.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


class KVExportError(DisaggError):
    """Writing K/V into an attention pod failed; the message names the pod."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"attention pod {address}: {message}")
        self.address = address


class AttentionPodUnreachableError(KVExportError):
    """The pod could not be reached, went away, or did not acknowledge in time; retry or re-place."""


class ImportRefusedError(KVExportError):
    """The pod refused the K/V (sequence not open or not reserved, wrong head count or dtype)."""


def export_error(address: str, exc: grpc.RpcError) -> KVExportError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    message = f"ImportKV failed: {code.name if code else 'error'}: {details}"
    if code in _REFUSALS:
        return ImportRefusedError(address, message)
    return AttentionPodUnreachableError(address, message)


class AttentionChannels:
    """One gRPC channel per attention pod address, created on first use, shared by every export."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.AttentionStub]] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> pb_grpc.AttentionStub:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                channel = grpc.insecure_channel(address, options=grpc_message_options(self.max_message_bytes))
                entry = self._stubs[address] = (channel, pb_grpc.AttentionStub(channel))
            return entry[1]

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()


# What the sender thread takes from a call's queue: (layer, k, v), k and v [T, h, D]; None ends it.
_Layer = tuple[int, torch.Tensor, torch.Tensor] | None


class ImportStream:
    """One ImportKV call: one sequence's K/V for one pod's heads, all layers."""

    def __init__(
        self, stub: pb_grpc.AttentionStub, seq_id: int, entry: PlacementEntry, rows_per_chunk: int
    ) -> None:
        self.entry = entry
        self.seq_id = seq_id
        self.rows_per_chunk = rows_per_chunk
        self._outbox: queue.SimpleQueue[_Layer] = queue.SimpleQueue()
        self._closed = False
        # No gRPC deadline: the forward's length is not known here; `KVExport.finish` bounds the wait
        # for the answer and cancels the call past it.
        self.call = stub.ImportKV.future(self._chunks())

    @property
    def address(self) -> str:
        return self.entry.address

    def _chunks(self) -> Iterator[pb.ImportKVChunk]:
        """Runs on gRPC's sender thread: slicing and encoding stay off the compute thread."""
        while (item := self._outbox.get()) is not None:
            layer, k, v = item
            with torch.inference_mode():  # the tensors come from an inference-mode forward
                for start in range(0, k.shape[0], self.rows_per_chunk):
                    end = start + self.rows_per_chunk
                    chunk = pb.ImportKVChunk(seq_id=self.seq_id, layer=layer, start=start)
                    encode_into(chunk.k, k[start:end])
                    encode_into(chunk.v, v[start:end])
                    yield chunk

    def send(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] of the whole model; this pod's heads are sliced out (a view)."""
        if self._closed or self.call.done():  # failed already: its answer says why
            return
        heads = slice(self.entry.kv_head_start, self.entry.kv_head_end)
        self._outbox.put((layer, k[:, heads], v[:, heads]))

    def close(self) -> None:
        """No more layers; the pod answers once it has written everything."""
        if not self._closed:
            self._closed = True
            self._outbox.put(None)

    def cancel(self) -> None:
        self.close()
        self.call.cancel()


@dataclass(slots=True)
class KVExport:
    """The ImportKV calls of one sequence, one per pod of its placement."""

    streams: list[ImportStream]

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, Hkv, D], positions 0..T-1 of the sequence."""
        for stream in self.streams:
            stream.send(layer, k, v)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()

    def finish(self, deadline: float) -> int:
        """End the streams and wait (until `deadline`, monotonic) for every pod's acknowledgement.

        Returns the K/V bytes the pods wrote; raises the first failure, cancelling the other calls.
        """
        done: queue.SimpleQueue[ImportStream] = queue.SimpleQueue()
        for stream in self.streams:
            stream.close()
            stream.call.add_done_callback(lambda _call, s=stream: done.put(s))
        written = 0
        for _ in self.streams:
            try:
                stream = done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                waiting = [s.address for s in self.streams if not s.call.done()]
                self.cancel()
                raise AttentionPodUnreachableError(
                    ", ".join(waiting), "no ImportKV acknowledgement before the import timeout"
                ) from None
            try:
                written += stream.call.result().bytes
            except grpc.RpcError as exc:
                self.cancel()
                raise export_error(stream.address, exc) from None
        return written


class KVExporter:
    """Starts exports over cached channels; chunks are sized to fit `max_message_bytes`."""

    def __init__(self, channels: AttentionChannels, head_dim: int, dtype: torch.dtype) -> None:
        self.channels = channels
        self.row_bytes = head_dim * torch.empty((), dtype=dtype).element_size()  # one head, one token

    def start(self, seq_id: int, placement: Placement) -> KVExport:
        streams = []
        for entry in placement.entries:
            rows = self.rows_per_chunk(entry.kv_head_count)
            streams.append(ImportStream(self.channels.stub(entry.address), seq_id, entry, rows))
        return KVExport(streams)

    def rows_per_chunk(self, kv_heads: int) -> int:
        """Tokens per ImportKVChunk so that its K and V fit one message."""
        payload = self.channels.max_message_bytes - _MESSAGE_OVERHEAD_BYTES
        return max(1, payload // (2 * kv_heads * self.row_bytes))

    def close(self) -> None:
        self.channels.close()
