"""Shipping a prompt's K/V to the attention pods of its placement, layer by layer.

    export = exporter.start(seq_id, placement, n)  # per pod: an ImportKV call, or a NIXL PlanImport
    export.send_layer(layer, k, v)                 # k, v [T, Hkv, D]: each pod gets its head slice
    ...                                            # (the forward goes on with the next layer)
    kv_bytes = export.finish(deadline)             # wait for every pod's acknowledgement

Two transports behind the one `KVExport` interface: gRPC (default) and NIXL (`--transport nixl`,
see "NIXL" below).

gRPC: each pod's `ImportKV` is one client-streaming call. `send_layer` only puts views of the layer's
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

NIXL: K/V go by one-sided WRITE straight into the pods' registered KV pools:

    start        staging rows [lo, lo + T) taken; PlanImport(seq, 0, T) sent to every pod (futures)
    send_layer   k/v copied into the registered staging buffer (head-major, see `StagingBuffer`);
                 layer 0 resolves the plans (and loads a pod's agent metadata from Redis the first
                 time its agent name is seen); then one WRITE per pod, notification kv:<id>:<layer>,
                 queued on the layer's write lane (`WriteLane`: its thread posts and polls it)
    finish       every WRITE DONE, then CompleteImport per pod (the pod has every notification)

The source of one (layer, K|V, head, block) is contiguous in the staging buffer, the destination is
the block the pod named; adjacent pairs are merged (`coalesce`) before posting. NIXL failures and
timeouts map to AttentionPodUnreachableError, refused plans to ImportRefusedError, as above.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from services.attention.nixl_import import notification
from services.core.errors import DisaggError
from services.core.placement import Placement, PlacementEntry
from services.core.pod import redis_url_or_env
from services.core.registry import RedisSettings, connect
from services.core.transport.nixl_agent import (
    NixlAgent,
    NixlError,
    PeerDirectory,
    Regions,
    Registration,
    Transfer,
    TransferState,
    coalesce,
    regions,
)
from services.core.wire import DTYPE_TO_WIRE, dtype_name, encode_into, grpc_message_options
from services.proto import attention_pb2 as pb
from services.proto import attention_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

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


def export_error(address: str, exc: grpc.RpcError, call: str = "ImportKV") -> KVExportError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    message = f"{call} failed: {code.name if code else 'error'}: {details}"
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


class KVExport(ABC):
    """One sequence's K/V on its way to the pods of its placement (any transport)."""

    @abstractmethod
    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, Hkv, D], positions 0..T-1 of the sequence; called for layers 0..L-1 in order."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up (the forward failed); the pods drop or ignore what arrived."""

    @abstractmethod
    def finish(self, deadline: float) -> int:
        """Wait (until `deadline`, monotonic) for every pod's acknowledgement; returns the K/V bytes
        written, or raises the first failure (KVExportError) after cancelling the rest."""


@dataclass(slots=True)
class GrpcKVExport(KVExport):
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
    """Starts exports over cached channels: ImportKV chunks sized to fit `max_message_bytes`, or
    NIXL WRITEs when built with a `NixlSender`."""

    def __init__(
        self,
        channels: AttentionChannels,
        head_dim: int,
        dtype: torch.dtype,
        nixl: NixlSender | None = None,
    ) -> None:
        self.channels = channels
        self.row_bytes = head_dim * torch.empty((), dtype=dtype).element_size()  # one head, one token
        self.nixl = nixl

    def start(self, seq_id: int, placement: Placement, num_tokens: int) -> KVExport:
        """An export of positions [0, num_tokens) of the sequence."""
        if self.nixl is not None:
            return NixlKVExport(self.nixl, self.channels, seq_id, placement, num_tokens)
        streams = []
        for entry in placement.entries:
            rows = self.rows_per_chunk(entry.kv_head_count)
            streams.append(ImportStream(self.channels.stub(entry.address), seq_id, entry, rows))
        return GrpcKVExport(streams)

    def rows_per_chunk(self, kv_heads: int) -> int:
        """Tokens per ImportKVChunk so that its K and V fit one message."""
        payload = self.channels.max_message_bytes - _MESSAGE_OVERHEAD_BYTES
        return max(1, payload // (2 * kv_heads * self.row_bytes))

    def close(self) -> None:
        self.channels.close()
        if self.nixl is not None:
            self.nixl.close()


# ---- NIXL ---------------------------------------------------------------------------------------
_PLAN_TIMEOUT_S = 10.0  # PlanImport is bookkeeping on the pod: a slow answer means a sick pod
_LEASE_MARGIN_S = 1.0  # stop posting WRITEs this long before the pod's plan lease ends
_SETTLE_S = 2.0  # on cancel, how long posted WRITEs get to end before the plans are left to expire


@dataclass(slots=True, frozen=True)
class KVGeometry:
    num_layers: int  # L
    num_kv_heads: int  # Hkv of the model
    head_dim: int  # D
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        """One position of one head."""
        return self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class StagingBuffer:
    """The registered source of every NIXL WRITE: allocated and registered once, reused by every forward.

        buffer: [L, 2, Hkv, C, D]     (layer, K|V, KV head, token row, dim); C = capacity in tokens

    A prompt of T tokens owns rows [lo, lo + T) of every (layer, kind, head), so the positions of one
    destination block are one contiguous source range. Rows are handed out in order and the cursor
    returns to 0 once every export holding rows has ended (forwards run one at a time). A prompt
    longer than C (the engine runs it alone) grows the buffer first: re-registration, once.
    """

    def __init__(self, agents: Sequence[NixlAgent], geometry: KVGeometry, capacity_tokens: int) -> None:
        self.agents = list(agents)  # the buffer is registered with each (one per sender lane)
        self.geometry = geometry
        self._registrations: list[Registration] = []
        self._cursor = 0
        self._live = 0  # exports holding rows
        self._allocate(capacity_tokens)

    def _allocate(self, capacity: int) -> None:
        g = self.geometry
        for agent, registration in zip(self.agents, self._registrations, strict=False):  # none at first
            agent.deregister(registration)
        # Every page touched now (zero_), not by the first forward: fresh pages cost ~4x a warm copy.
        self.buffer = torch.empty((g.num_layers, 2, g.num_kv_heads, capacity, g.head_dim), dtype=g.dtype)
        self.buffer.zero_()
        self.capacity = capacity
        self._registrations = [agent.register([self.buffer]) for agent in self.agents]
        log.info("NIXL staging buffer: %d tokens, %.1f MiB", capacity, self.buffer.nbytes / 2**20)

    def take(self, num_tokens: int) -> int:
        """Rows for one prompt; returns lo, its first row."""
        if self._live == 0:
            self._cursor = 0
        if self._cursor + num_tokens > self.capacity:
            if self._live:
                raise DisaggError(
                    f"the NIXL staging buffer holds {self.capacity} tokens and this forward needs more; "
                    "raise max_num_tokens or send fewer tokens per forward"
                )
            self._allocate(num_tokens)
        lo, self._cursor, self._live = self._cursor, self._cursor + num_tokens, self._live + 1
        return lo

    def give_back(self) -> None:
        self._live -= 1

    def store(self, layer: int, lo: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, Hkv, D] -> rows [lo, lo + T) of the layer, head-major."""
        t = k.shape[0]
        with torch.inference_mode():
            self.buffer[layer, 0, :, lo : lo + t].copy_(k.transpose(0, 1))
            self.buffer[layer, 1, :, lo : lo + t].copy_(v.transpose(0, 1))

    def address(self, layer: int, kind: int, head: int, row: int) -> int:
        """Byte address of buffer[layer, kind, head, row, 0]."""
        g = self.geometry
        index = ((layer * 2 + kind) * g.num_kv_heads + head) * self.capacity + row
        return self.buffer.data_ptr() + index * g.row_bytes


@dataclass(slots=True, frozen=True)
class PodLayout:
    """One pod's share of one prompt as descriptor rows, the same for every layer and for K and V.

    Row r is one (lane, block), adjacent rows already merged (`coalesce`): `src` is its byte offset
    in a K (or V) plane of the staging buffer, `dst` its byte offset in the pod's K (or V) region.
    Layer l's K rows add the staging plane (l, K) and k_bases[l]; its V rows (l, V) and v_bases[l]:

        staging[l, K, h, lo : lo + T]   |  block 0 rows  |  block 1 rows  | b2 (partial) |
                                                │                │                │
        pod k[l]: [num_blocks, bs, D]   ...  [table[h][0]] ... [table[h][1]] ... [table[h][2]]
    """

    src: np.ndarray  # [R] uint64
    dst: np.ndarray  # [R] uint64
    lengths: np.ndarray  # [R] uint64 bytes
    planes: np.ndarray  # [L, 2] uint64: address of staging[l, K|V, 0, 0]
    k_bases: np.ndarray  # [L] uint64
    v_bases: np.ndarray  # [L] uint64

    @classmethod
    def build(
        cls, plan: pb.PlanImportResponse, entry: PlacementEntry, staging: StagingBuffer, lo: int, length: int
    ) -> PodLayout:
        """Positions [0, length) of the lanes of `entry`'s heads, sourced from staging rows lo.."""
        bs, row = plan.block_size, np.uint64(plan.row_bytes)
        blocks = np.array([list(lane.block_ids) for lane in plan.lanes], dtype=np.uint64)  # [h, nb]
        begin = np.arange(blocks.shape[1], dtype=np.uint64) * np.uint64(bs)  # first position of block i
        end = np.minimum(begin + np.uint64(bs), np.uint64(length))  # [nb]
        plane = staging.address(0, 0, 0, 0)
        lanes = np.array(
            [staging.address(0, 0, h, lo) - plane for h in range(entry.kv_head_start, entry.kv_head_end)]
        )
        src = lanes.astype(np.uint64)[:, None] + begin * row  # [h, nb]
        dst = blocks * np.uint64(plan.block_bytes)  # [h, nb]: start 0, so every block from its offset 0
        lengths = np.broadcast_to((end - begin) * row, src.shape).reshape(-1)
        local, remote = coalesce(regions(src.reshape(-1), lengths), regions(dst.reshape(-1), lengths))
        layers = len(plan.k_bases)
        planes = [[staging.address(layer, kind, 0, 0) for kind in (0, 1)] for layer in range(layers)]
        return cls(
            src=local[:, 0],
            dst=remote[:, 0],
            lengths=local[:, 1],
            planes=np.array(planes, dtype=np.uint64),
            k_bases=np.array(plan.k_bases, dtype=np.uint64),
            v_bases=np.array(plan.v_bases, dtype=np.uint64),
        )

    def layer_regions(self, layer: int) -> tuple[Regions, Regions]:
        """(local, remote) descriptor lists of one layer: its K rows, then its V rows."""
        k_plane, v_plane = self.planes[layer]
        local = np.concatenate([self.src + k_plane, self.src + v_plane])
        remote = np.concatenate([self.dst + self.k_bases[layer], self.dst + self.v_bases[layer]])
        lengths = np.concatenate([self.lengths, self.lengths])
        return regions(local, lengths), regions(remote, lengths)


def check_plan(plan: pb.PlanImportResponse, entry: PlacementEntry, length: int, geometry: KVGeometry) -> None:
    """The pod's answer must describe the pool this pod writes into (same model and dtype)."""
    problems = []
    if plan.dtype != DTYPE_TO_WIRE[geometry.dtype] or plan.head_dim != geometry.head_dim:
        problems.append(f"pool dtype {dtype_name(plan.dtype)}, head_dim {plan.head_dim}")
    if plan.row_bytes != geometry.row_bytes or plan.block_size < 1:
        problems.append(f"row_bytes {plan.row_bytes}, block_size {plan.block_size}")
    elif plan.block_bytes != plan.block_size * plan.row_bytes or plan.first_block != 0:
        problems.append(f"block_bytes {plan.block_bytes}, first_block {plan.first_block}")
    if len(plan.k_bases) != geometry.num_layers or len(plan.v_bases) != geometry.num_layers:
        problems.append(f"{len(plan.k_bases)} layers")
    blocks = -(-length // max(1, plan.block_size))
    if len(plan.lanes) != entry.kv_head_count or any(len(lane.block_ids) != blocks for lane in plan.lanes):
        problems.append(f"{len(plan.lanes)} lanes, expected {entry.kv_head_count} of {blocks} blocks")
    if problems:
        raise ImportRefusedError(
            entry.address,
            f"its PlanImport answer does not fit this prefill pod ({'; '.join(problems)}); run prefill and "
            "attention pods with the same model and dtype",
        )


class WriteLane:
    """One NIXL agent of the prefill pod and the thread that posts its WRITEs and progresses them.

    Over shared memory (UCX CMA, as on a single host without RDMA) posting a WRITE is itself the copy
    (one `process_vm_writev` on the posting thread), so a lane is one copying thread, off the
    forward's thread; with RDMA posting only queues work and the lane polls it to completion.
    `write` returns a future that ends when the WRITE is DONE (or fails: NixlError). A WRITE not
    done by its deadline is released (cancelled where the backend can) and fails.
    """

    def __init__(self, agent: NixlAgent, peers: PeerDirectory) -> None:
        self.agent = agent
        self.peers = peers
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"nixl-{agent.name}", daemon=True)
        self._thread.start()

    def write(
        self, peer: str, local: Regions, remote: Regions, message: bytes, deadline: float
    ) -> Future[None]:
        job = _Job(peer, local, remote, message, deadline, Future())
        self._jobs.put(job)
        return job.done

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(_SETTLE_S)
        self.agent.close()

    def _run(self) -> None:
        active: list[tuple[_Job, Transfer]] = []
        while True:
            try:  # block only when nothing is in flight
                job = self._jobs.get_nowait() if active else self._jobs.get()
            except queue.Empty:
                job = _IDLE
            if job is None:
                for _, transfer in active:
                    transfer.release()
                return
            if job is not _IDLE:
                try:
                    active.append((job, self.agent.write(job.peer, job.local, job.remote, job.message)))
                except NixlError as exc:
                    job.done.set_exception(exc)
            active = [(j, t) for j, t in active if not _settled(j, t)]
            if active and self._jobs.empty():
                time.sleep(_POLL_S)


@dataclass(slots=True, frozen=True)
class _Job:
    peer: str
    local: Regions
    remote: Regions
    message: bytes
    deadline: float  # time.monotonic()
    done: Future[None]


_IDLE = _Job("", regions([], []), regions([], []), b"", 0.0, Future())  # "no new job": poll only
_POLL_S = 50e-6


def _settled(job: _Job, transfer: Transfer) -> bool:
    """Poll once; True (and the job's future resolved) once the WRITE is over."""
    try:
        state = transfer.state()
        if state is TransferState.IN_PROGRESS and time.monotonic() <= job.deadline:
            return False
        transfer.wait(job.deadline)  # DONE: releases; FAILED or overdue: releases and raises
    except NixlError as exc:
        job.done.set_exception(exc)
        return True
    job.done.set_result(None)
    return True


class NixlSender:
    """The prefill pod's NIXL side: its lanes, the staging buffer, the attention pods' agents.

    A lane (`WriteLane`) is one agent with the staging buffer registered and a thread that posts
    and progresses its WRITEs. Layer l's WRITEs go out on lane l % lanes, so the forward's thread
    only copies K/V into the staging buffer and queues the WRITEs. Over shared memory (UCX CMA) each
    lane is one kernel copy at a time, so two lanes copy on two cores: bench/kv_transfer.py measures
    1 lane against 2. With RDMA each lane is its own UCX worker (its own queue pairs).
    """

    def __init__(self, lanes: Sequence[WriteLane], staging: StagingBuffer) -> None:
        if not lanes:
            raise DisaggError("a NIXL sender needs at least one lane")
        self.lanes = list(lanes)
        self.staging = staging
        self.geometry = staging.geometry

    def lane(self, layer: int) -> WriteLane:
        return self.lanes[layer % len(self.lanes)]

    def peer(self, pod_id: str, agent_name: str) -> str:
        """The pod's agent, loaded into every lane (the same name in each)."""
        for lane in self.lanes:
            lane.peers.peer(pod_id, agent_name)
        return agent_name

    @classmethod
    def create(
        cls, pod_id: str, redis_url: str | None, geometry: KVGeometry, capacity_tokens: int, lanes: int = 2
    ) -> NixlSender:
        url = redis_url_or_env(redis_url)
        if url is None:
            raise DisaggError(
                "transport nixl finds attention pods' NIXL metadata in Redis, but no Redis is set; pass "
                "--redis-url (or DISAGG_REDIS_URL), or use --transport grpc"
            )
        if lanes < 1:
            raise DisaggError(f"NIXL lanes must be >= 1, got {lanes}")
        settings = RedisSettings(url=url)
        client = connect(settings)
        suffix = secrets.token_hex(4)
        agents = [NixlAgent(f"{pod_id}-{suffix}-{i}") for i in range(lanes)]
        staging = StagingBuffer(agents, geometry, capacity_tokens)
        return cls([WriteLane(a, PeerDirectory(a, client, settings.key_prefix)) for a in agents], staging)

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


@dataclass(slots=True)
class _PodWrite:
    """One pod's share of a NIXL export."""

    entry: PlacementEntry
    stub: pb_grpc.AttentionStub
    plan_call: grpc.Future
    plan: pb.PlanImportResponse | None = None
    layout: PodLayout | None = None
    peer: str = ""  # the pod's agent name, loaded
    post_until: float = 0.0  # monotonic; the plan's lease minus a margin
    writes: list[Future[None]] = field(default_factory=list)  # one per layer posted, on its lane
    failure: KVExportError | None = None


class NixlKVExport(KVExport):
    """One sequence's K/V by NIXL WRITE into the pods of its placement (see the module docstring)."""

    def __init__(
        self,
        sender: NixlSender,
        channels: AttentionChannels,
        seq_id: int,
        placement: Placement,
        num_tokens: int,
    ) -> None:
        self.sender = sender
        self.num_tokens = num_tokens
        self.lo = sender.staging.take(num_tokens)
        self._holding_rows = True
        request = pb.PlanImportRequest(seq_id=seq_id, start=0, length=num_tokens)
        self.pods = []
        for entry in placement.entries:
            stub = channels.stub(entry.address)
            self.pods.append(_PodWrite(entry, stub, stub.PlanImport.future(request, timeout=_PLAN_TIMEOUT_S)))

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[0] != self.num_tokens:
            raise DisaggError(f"send_layer got {k.shape[0]} positions for an export of {self.num_tokens}")
        self.sender.staging.store(layer, self.lo, k, v)
        for pod in self.pods:
            if pod.failure is None:
                try:
                    self._write(pod, layer)
                except KVExportError as exc:
                    pod.failure = exc  # the other pods go on; finish raises it

    def _write(self, pod: _PodWrite, layer: int) -> None:
        if pod.plan is None or pod.layout is None:
            pod.plan = self._resolve(pod)
            pod.layout = PodLayout.build(pod.plan, pod.entry, self.sender.staging, self.lo, self.num_tokens)
        if time.monotonic() > pod.post_until:
            raise AttentionPodUnreachableError(
                pod.entry.address, "the forward outlasted the pod's import lease; retry (or prefill shorter)"
            )
        local, remote = pod.layout.layer_regions(layer)
        message = notification(pod.plan.transfer_id, layer)
        lane = self.sender.lane(layer)  # its thread posts and progresses the WRITE
        pod.writes.append(lane.write(pod.peer, local, remote, message, pod.post_until + _LEASE_MARGIN_S))

    def _resolve(self, pod: _PodWrite) -> pb.PlanImportResponse:
        """The pod's plan (waits for the PlanImport answer) and its agent loaded."""
        try:
            plan: pb.PlanImportResponse = pod.plan_call.result()
        except grpc.RpcError as exc:
            raise export_error(pod.entry.address, exc, "PlanImport") from None
        pod.post_until = time.monotonic() + plan.lease_ms / 1000 - _LEASE_MARGIN_S
        check_plan(plan, pod.entry, self.num_tokens, self.sender.geometry)
        try:
            pod.peer = self.sender.peer(plan.pod_id, plan.agent_name)
        except NixlError as exc:
            raise AttentionPodUnreachableError(pod.entry.address, str(exc)) from None
        return plan

    def finish(self, deadline: float) -> int:
        try:
            for pod in self.pods:
                if pod.failure is not None:
                    raise pod.failure
            for pod in self.pods:
                for write in pod.writes:
                    try:
                        write.result(timeout=max(0.0, deadline - time.monotonic()))
                    except NixlError as exc:
                        raise AttentionPodUnreachableError(pod.entry.address, str(exc)) from None
                    except TimeoutError:
                        raise AttentionPodUnreachableError(
                            pod.entry.address, "its NIXL WRITEs were not done by the export's deadline"
                        ) from None
            calls = [(pod, self._complete(pod, pod.plan, deadline)) for pod in self.pods if pod.plan]
            written = 0
            for pod, call in calls:
                try:
                    written += call.result().bytes
                except grpc.RpcError as exc:
                    raise export_error(pod.entry.address, exc, "CompleteImport") from None
            return written
        except KVExportError:
            self.cancel()
            raise
        finally:
            self._give_back_rows()

    def cancel(self) -> None:
        """Stop posting; once a pod's WRITEs are over, tell it to drop the plan (else its lease ends it)."""
        settle_by = time.monotonic() + _SETTLE_S
        for pod in self.pods:
            pod.failure = pod.failure or AttentionPodUnreachableError(pod.entry.address, "export cancelled")
            plan = pod.plan or self._late_plan(pod, settle_by)
            settled = _settle(pod.writes, settle_by)
            if plan is not None and settled:  # fire and forget: the plan's lease is the fallback
                self._complete(pod, plan, settle_by, abandon=True)
        self._give_back_rows()

    @staticmethod
    def _late_plan(pod: _PodWrite, deadline: float) -> pb.PlanImportResponse | None:
        """A plan the pod granted but no layer used yet (the forward failed early): it must be dropped too."""
        try:
            plan: pb.PlanImportResponse = pod.plan_call.result(timeout=max(0.0, deadline - time.monotonic()))
        except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
            pod.plan_call.cancel()
            return None
        return plan

    @staticmethod
    def _complete(
        pod: _PodWrite, plan: pb.PlanImportResponse, deadline: float, abandon: bool = False
    ) -> grpc.Future:
        request = pb.CompleteImportRequest(transfer_id=plan.transfer_id, abandon=abandon)
        return pod.stub.CompleteImport.future(request, timeout=max(0.001, deadline - time.monotonic()))

    def _give_back_rows(self) -> None:
        if self._holding_rows:
            self._holding_rows = False
            self.sender.staging.give_back()


def _settle(writes: list[Future[None]], deadline: float) -> bool:
    """True once every WRITE is over, either way (their lanes release overdue ones); False if some
    may still be moving bytes at `deadline`."""
    _, pending = wait(writes, timeout=max(0.0, deadline - time.monotonic()))
    return not pending
