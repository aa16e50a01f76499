"""The attention part on attention pods: `RemoteAttention(AttentionPart)` over gRPC.

    attention = RemoteAttention(model.config, torch.float32, placement)   # or placement_for(seq_id)
    engine = Engine(model.dense, attention, tokenizer)                    # nothing else changes

A sequence's placement says which pods hold which of its KV heads; Open, Reserve (all-or-nothing)
and Free go to each of them. Per forward:

    begin(chunks)   StepBegin{rows of its sequences} on the Step stream of every pod involved
    attend(l, q, k_new, v_new):
        q [N,Hq,D] ─view─▶ lanes [N·Hkv, G, D] ─gather the pod's lanes─▶ StepLayer ─▶ each pod
        o [N,Hq,D] ◀─view─ [N·Hkv, G, D] ◀─scatter─ StepResponse{o [M, G, D]} ◀─ each pod

A lane is one KV head of one new token (see proto/disagg/v1/attention.proto). A request-partitioned
step on one pod sends and receives the tensors as they are, with no gather or scatter.

A prompt's first chunk (start 0, several tokens) attends only to its own K/V, so by default
(`options.local_prompt_attention`, the decode pod's `--prompt-attention decode`) it is attended here,
right after the layer's frames leave and while the pods attend the other rows; the pods get it as
`kv_only` (its K/V, no q lanes, no output lanes), so its q and o never cross the network and the
pods spend no CPU on it.

One long-lived bidirectional stream per pod, reused by every step. `attend` reads answers on its
own thread under a deadline that a watchdog thread enforces, so a dead pod (connection reset) or a
hung one (deadline) raises `AttentionPodError` promptly instead of hanging. A failed stream is
replaced by a fresh one at the next `begin`.

Accounting: every Free answer carries what the sequence cost that pod; `costs` sums them per
sequence until the decode pod takes them for the request's usage. `wait_seconds` is the time the
dense part spent waiting for answers (the engine's attention_wait phase); `link` counts frame bytes
and each layer's round trip.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import torch

from services.attention.reference import causal_prefill_attention
from services.core.attention import (
    AttentionPart,
    AttentionStep,
    OutOfBlocks,
    PolicySpec,
    Reserved,
    ReserveResult,
    SeqChunk,
)
from services.core.cost import CostBook
from services.core.errors import DisaggError
from services.core.model.config import ModelConfig
from services.core.placement import Placement, PlacementEntry
from services.core.wire import TensorLimits, WireError, decode, encode_into
from services.decode.attention_link import (
    AttentionPodError,
    PodLink,
    RemoteAttentionOptions,
    SocketStepStream,
    StepStream,
    Watchdog,
)
from services.decode.metering import LinkMetrics
from services.proto import attention_pb2 as pb

log = logging.getLogger(__name__)
__all__ = ["AttentionPodError", "RemoteAttention", "RemoteAttentionOptions"]


@dataclass(slots=True)
class _Seq:
    placement: Placement
    capacity: int  # positions every pod of the placement has reserved
    policy: PolicySpec | None  # the sequence's attention policy (None: the pods' default)


class RemoteAttention(AttentionPart):
    """Sequences live on attention pods; `placement` is fixed or a function of the sequence id.

    Connects to the fixed placement's pods at construction (others on first use); `close()` ends
    the streams, channels and the watchdog thread. Not thread-safe: one engine thread drives it.
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        placement: Placement | Callable[[int], Placement],
        options: RemoteAttentionOptions | None = None,
        id_namespace: int | None = None,
        link: LinkMetrics | None = None,
    ) -> None:
        self.config = config
        self.link = link or LinkMetrics()
        self.costs = CostBook()  # engine sequence id -> USD its Free answers reported
        self.wait_seconds = 0.0  # waiting for attention outputs, since start (engine thread only)
        self.dtype = dtype
        self.options = options or RemoteAttentionOptions()
        self.limits = TensorLimits(max_bytes=self.options.max_message_bytes)
        self._fixed: Placement | None = None
        self._placement_for: Callable[[int], Placement]
        if isinstance(placement, Placement):
            fixed = self._fixed = placement
            self._placement_for = lambda _seq_id: fixed
        else:
            self._placement_for = placement
        # Engines number sequences from 0; pods are shared by many decode pods, so ids get a prefix.
        self._namespace = secrets.randbits(31) if id_namespace is None else id_namespace
        self._watchdog = Watchdog()
        self._pods: dict[str, PodLink] = {}
        self._seqs: dict[int, _Seq] = {}
        self._step_ids = itertools.count()
        if self._fixed is not None:
            self._check_placement(self._fixed)

    # ---- sequences -----------------------------------------------------------------------------
    def open(self, seq_id: int, policy: PolicySpec | None = None) -> None:
        if seq_id in self._seqs:
            raise DisaggError(f"sequence {seq_id} is already open")
        placement = self._placement_for(seq_id)
        self._check_placement(placement)
        results = self._call_all(placement.entries, "Open", lambda e: self._open_request(seq_id, e, policy))
        failures = [r for r in results if isinstance(r, AttentionPodError)]
        if failures:
            opened = [
                e
                for e, r in zip(placement.entries, results, strict=True)
                if not isinstance(r, AttentionPodError)
            ]
            self._free_on(seq_id, opened)
            raise failures[0]
        self._seqs[seq_id] = _Seq(placement, capacity=0, policy=policy)

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        seq = self._seq(seq_id)
        if num_tokens <= seq.capacity:  # most decode steps: no call at all
            return Reserved(capacity_tokens=seq.capacity, new_blocks=0)
        request = pb.ReserveRequest(seq_id=self.wire_id(seq_id), num_tokens=num_tokens)
        results = self._call_all(seq.placement.entries, "Reserve", lambda _: request)
        for result in results:
            if isinstance(result, AttentionPodError):
                raise result
        short = [r.out_of_blocks for r in results if r.WhichOneof("result") == "out_of_blocks"]
        if not short:
            seq.capacity = min(r.reserved.capacity_tokens for r in results)
            return Reserved(seq.capacity, new_blocks=sum(r.reserved.new_blocks for r in results))
        self._release_partial(seq_id, seq, results)
        return OutOfBlocks(needed=sum(s.needed_blocks for s in short), free=min(s.free_blocks for s in short))

    def _release_partial(self, seq_id: int, seq: _Seq, results: list[Any]) -> None:
        """All-or-nothing across pods: pods that did reserve give the blocks back.

        A pod cannot shrink a sequence, so an empty sequence is freed and opened again (the usual
        case: admission). A sequence that already holds KV keeps its new blocks on those pods: they
        are its next positions anyway, and the scheduler's answer (preempting it or a newer one)
        frees or uses them.
        """
        if seq.capacity > 0:
            return
        took = [
            e
            for e, r in zip(seq.placement.entries, results, strict=True)
            if r.WhichOneof("result") == "reserved" and r.reserved.new_blocks > 0
        ]
        self._free_on(seq_id, took)
        for result in self._call_all(took, "Open", lambda e: self._open_request(seq_id, e, seq.policy)):
            if isinstance(result, AttentionPodError):
                raise result

    def free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for result in self._free_on(seq_id, seq.placement.entries):
            if isinstance(result, AttentionPodError):  # its KV is unreachable anyway; keep serving
                log.warning("could not free sequence %d: %s", seq_id, result)

    def take_cost(self, seq_id: int) -> float:
        """USD the attention pods reported for the sequence's Frees so far; forgotten here."""
        return self.costs.take(seq_id)

    def _free_on(self, seq_id: int, entries: Sequence[PlacementEntry]) -> list[Any]:
        """Free the sequence on `entries`' pods; their answers' costs are booked to it."""
        request = pb.FreeRequest(seq_id=self.wire_id(seq_id))
        results = self._call_all(entries, "Free", lambda _: request)
        self.costs.add(seq_id, sum(r.cost_usd for r in results if not isinstance(r, AttentionPodError)))
        return results

    def placed_on(self, seq_id: int, address: str) -> bool:
        """True when pod `address` holds KV heads of `seq_id`: open sequences by their placement,
        others by what `placement` says (the engine asks this to end only a failed pod's requests)."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            return address in seq.placement.addresses
        try:
            return address in self._placement_for(seq_id).addresses
        except KeyError:  # a placement table that no longer knows the sequence: not on any pod
            return False

    def pods_of(self, seq_id: int) -> tuple[str, ...]:
        """The pods holding KV heads of open sequence `seq_id`, sorted."""
        return tuple(sorted(self._seq(seq_id).placement.addresses))

    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the fixed placement's pods could hold (router placements: the
        router checks capacity when it places, so the bound is the model's context window)."""
        if self._fixed is None:
            return self.config.max_position_embeddings
        return min(
            self._pod(e.address).stats.blocks_total // e.kv_head_count * self._pod(e.address).stats.block_size
            for e in self._fixed.entries
        )

    def begin(self, chunks: Sequence[SeqChunk]) -> AttentionStep:
        return _RemoteStep(self, next(self._step_ids), chunks)

    def close_streams(self) -> None:
        """End every pod's Step stream (steps in flight are abandoned); `begin` opens new ones."""
        for pod in self._pods.values():
            pod.close_stream()

    def close(self) -> None:
        for pod in self._pods.values():
            pod.close()
        self._pods.clear()
        self._watchdog.stop()

    # ---- helpers -------------------------------------------------------------------------------
    def wire_id(self, seq_id: int) -> int:
        """The id of engine sequence `seq_id` on the attention pods (what a prefill pod imports into)."""
        if not 0 <= seq_id < 1 << 32:
            raise DisaggError(f"sequence id {seq_id} does not fit in 32 bits")
        return self._namespace << 32 | seq_id

    def _seq(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise DisaggError(f"sequence {seq_id} is not open on the attention pods") from None

    def _open_request(self, seq_id: int, entry: PlacementEntry, policy: PolicySpec | None) -> pb.OpenRequest:
        request = pb.OpenRequest(
            seq_id=self.wire_id(seq_id),
            kv_head_start=entry.kv_head_start,
            kv_head_count=entry.kv_head_count,
            owner=self.options.owner,
        )
        if policy is not None:  # else empty: the pod's default policy and budget
            request.policy, request.scoring = policy.name.value, policy.scoring.value
            if policy.budget is not None:
                request.budget = policy.budget
        return request

    def _check_placement(self, placement: Placement) -> None:
        if placement.num_kv_heads != self.config.num_kv_heads:
            raise DisaggError(
                f"the placement covers {placement.num_kv_heads} KV heads but the model has "
                f"{self.config.num_kv_heads}"
            )
        for entry in placement.entries:
            self._pod(entry.address)

    def _pod(self, address: str) -> PodLink:
        pod = self._pods.get(address)
        if pod is None:
            pod = PodLink(address, self.options, self._watchdog)
            try:
                pod.check_geometry(self.config, self.dtype)
            except AttentionPodError:
                pod.close()
                raise
            self._pods[address] = pod
        return pod

    def _call_all(
        self, entries: Sequence[PlacementEntry], method: str, request: Callable[[PlacementEntry], Any]
    ) -> list[Any]:
        """One unary call per entry's pod, in parallel; failures come back as AttentionPodError."""
        timeout = self.options.rpc_timeout_s
        pending = [
            (e.address, getattr(self._pod(e.address).stub, method).future(request(e), timeout=timeout))
            for e in entries
        ]
        results: list[Any] = []
        for address, future in pending:
            try:
                results.append(future.result())
            except grpc.RpcError as exc:
                results.append(AttentionPodError.from_rpc(address, method, exc))
        return results


@dataclass(slots=True, frozen=True)
class _Target:
    """One pod's share of a step."""

    stream: StepStream | SocketStepStream
    lanes: torch.Tensor | None  # [M] indices into the step's N·Hkv lanes; None: all of them, in order
    num_lanes: int  # M
    q_lanes: torch.Tensor | None  # [Mq] the lanes that attend on the pod (not kv_only); None: `lanes`
    num_q_lanes: int  # Mq

    @property
    def transport(self) -> str:
        """The carrier's name in metrics: tcp (the Step socket) or grpc (the gRPC stream)."""
        return "tcp" if isinstance(self.stream, SocketStepStream) else "grpc"


class _RemoteStep(AttentionStep):
    """One forward on the pods. A prompt's first chunk (start 0, more than one token) attends only
    to itself, so with `options.local_prompt_attention` it is attended here, while the pods work on
    the other rows, and the pods get only its K/V (`kv_only`): its q and o never cross the network."""

    def __init__(self, part: RemoteAttention, step_id: int, chunks: Sequence[SeqChunk]) -> None:
        self.part = part
        self.step_id = step_id
        heads = part.config.num_kv_heads
        shares: dict[str, list[tuple[SeqChunk, int, PlacementEntry]]] = {}  # pod -> (chunk, row, entry)
        self.here: list[tuple[int, int]] = []  # (first row, length) of the chunks attended here
        row = 0
        for chunk in chunks:
            if part.options.local_prompt_attention and chunk.start == 0 and chunk.length > 1:
                chunk = replace(chunk, kv_only=True)
                self.here.append((row, chunk.length))
            for entry in part._seq(chunk.seq_id).placement.entries:
                shares.setdefault(entry.address, []).append((chunk, row, entry))
            row += chunk.length
        self.targets: list[_Target] = []
        for address, share in shares.items():
            stream = part._pod(address).stream()
            begin = pb.StepBegin(step_id=step_id)
            for chunk, _, _ in share:
                begin.chunks.add(
                    seq_id=part.wire_id(chunk.seq_id),
                    start=chunk.start,
                    length=chunk.length,
                    kv_only=chunk.kv_only,
                )
            stream.send(pb.StepRequest(begin=begin))
            everything = len(share) == len(chunks) and all(e.kv_head_count == heads for _, _, e in share)
            lanes = None if everything else _lane_ids(share, heads)
            num_lanes = row * heads if lanes is None else lanes.numel()
            if any(chunk.kv_only for chunk, _, _ in share):
                q_lanes = _lane_ids([s for s in share if not s[0].kv_only], heads)
                self.targets.append(_Target(stream, lanes, num_lanes, q_lanes, q_lanes.numel()))
            else:
                self.targets.append(_Target(stream, lanes, num_lanes, lanes, num_lanes))

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, q, k_new, v_new)()

    def submit(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """Send the layer's frames now; the returned function reads the answers: o [N,Hq,D]. With
        one pod holding every lane, o is the received tensor itself (no copy)."""
        with self._failing():
            self._send(layer, q, k_new, v_new)
        sent_at = time.perf_counter()
        here = self._attend_here(q, k_new, v_new)  # while the pods attend the other rows

        def result() -> torch.Tensor:
            waiting = time.perf_counter()
            with self._failing():
                o = self._collect(layer, q, here)
            answered = time.perf_counter()
            self.part.wait_seconds += answered - waiting
            self.part.link.round_trip(self.targets[0].transport, answered - sent_at)
            return o

        return result

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """On a pod failure, end every Step stream of the part: the other steps of this forward
        (other pods, other micro-batches) are abandoned with it, and the next `begin` opens fresh
        streams, so no pod keeps half-done steps."""
        try:
            yield
        except AttentionPodError:
            self.part.close_streams()
            raise

    def _send(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        d = q.shape[-1]
        q_lanes = q.reshape(-1, self.part.config.group_size, d)  # [N·Hkv, G, D]
        k_lanes, v_lanes = k_new.reshape(-1, d), v_new.reshape(-1, d)  # [N·Hkv, D]
        for target in self.targets:
            tensors = [
                t if idx is None else t.index_select(0, idx.to(q.device))  # .to: no-op on CPU
                for t, idx in ((q_lanes, target.q_lanes), (k_lanes, target.lanes), (v_lanes, target.lanes))
            ]
            stream = target.stream
            if isinstance(stream, SocketStepStream):  # raw, from the tensors' memory
                sent = stream.send_layer(self.step_id, layer, *(t.cpu() for t in tensors))
            else:
                frame = pb.StepRequest()
                f = frame.layer
                f.step_id, f.layer = self.step_id, layer
                for message, tensor in zip((f.q, f.k_new, f.v_new), tensors, strict=True):
                    encode_into(message, tensor)
                stream.send(frame)
                sent = len(f.q.data) + len(f.k_new.data) + len(f.v_new.data)
            self.part.link.sent(target.transport, sent)

    def _attend_here(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> list[torch.Tensor]:
        """o [L, Hq, D] of each chunk attended here: causal attention over its own K/V."""
        scale = self.part.config.head_dim**-0.5
        return [
            causal_prefill_attention(
                q[r : r + n], k_new[r : r + n].transpose(0, 1), v_new[r : r + n].transpose(0, 1), 0, scale
            )
            for r, n in self.here
        ]

    def _collect(self, layer: int, q: torch.Tensor, here: list[torch.Tensor]) -> torch.Tensor:
        n, hq, d = q.shape
        if len(self.targets) == 1 and self.targets[0].q_lanes is None:  # request-partitioned: no scatter
            return self._receive(self.targets[0], layer, q).view(n, hq, d)
        lanes = (n * self.part.config.num_kv_heads, self.part.config.group_size, d)
        out = torch.empty(lanes, dtype=q.dtype, device=q.device)
        for target in self.targets:
            o = self._receive(target, layer, q)  # read even when empty: answers keep the stream's order
            if target.q_lanes is not None:
                out.index_copy_(0, target.q_lanes.to(q.device), o)
        rows = out.view(n, hq, d)
        for (r, length), o_here in zip(self.here, here, strict=True):
            rows[r : r + length] = o_here
        return rows

    def _receive(self, target: _Target, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The pod's o: [Mq, G, D], on q's device."""
        shape = (target.num_q_lanes, self.part.config.group_size, self.part.config.head_dim)
        timeout = self.part.options.layer_timeout_s
        if isinstance(target.stream, SocketStepStream):  # raw, into a fresh tensor
            o = target.stream.receive_output(self.step_id, layer, shape, q.dtype, timeout)
            self.part.link.received(target.transport, o.numel() * o.element_size())
            return o.to(q.device)  # no-op on CPU
        response = target.stream.receive(timeout)
        self.part.link.received(target.transport, len(response.o.data))
        address = target.stream.address
        if response.step_id != self.step_id or response.layer != layer:
            error = AttentionPodError(
                address,
                f"answered step {response.step_id} layer {response.layer}, "
                f"expected step {self.step_id} layer {layer}",
            )
            target.stream.close(error)
            raise error
        try:
            o = decode(response.o, self.part.limits, name="o", dtype=q.dtype, shape=shape)
        except WireError as exc:
            error = AttentionPodError(address, f"sent a malformed output: {exc}")
            target.stream.close(error)
            raise error from exc
        return o.to(q.device)  # no-op on CPU


def _lane_ids(share: list[tuple[SeqChunk, int, PlacementEntry]], heads: int) -> torch.Tensor:
    """[M] lane ids (row · Hkv + head) of one pod's share, in the lane order the pod expects:
    chunk after chunk, token after token, then the pod's heads of that sequence."""
    if not share:
        return torch.empty(0, dtype=torch.long)
    rows = torch.tensor([row for _, row, _ in share])  # first row of each chunk
    lengths = torch.tensor([chunk.length for chunk, _, _ in share])
    starts = torch.tensor([e.kv_head_start for _, _, e in share])
    counts = torch.tensor([e.kv_head_count for _, _, e in share])
    per_chunk = lengths * counts  # lanes of each chunk
    which = torch.repeat_interleave(torch.arange(len(share)), per_chunk)  # [M] chunk of each lane
    local = torch.arange(which.numel()) - (torch.cumsum(per_chunk, 0) - per_chunk)[which]
    row = rows[which] + local // counts[which]
    head = starts[which] + local % counts[which]
    return row * heads + head
