"""The attention pod's side of bulk K/V over NIXL (`--transport nixl`): registered pool, plans, completion.

Lifecycle on one pod:

    start       NixlImporter.create: agent "<pod_id>-<random>" (a new name per process, so writers
                notice a restart), every layer's K and V pool tensor registered once
    registered  publish(registry): SET <prefix>nixl:<pod_id> = base64(agent metadata) with the pod
                TTL, refreshed every heartbeat interval (like the pod's hash: a crashed pod's entry
                expires with its registration; a restarted Redis has it again within a beat)
    per import  PlanImport  ─▶ plan(seq, start, length): the sequence must be open here and reserved
                               for the positions; answers block ids per lane, the layers' region
                               bases and a transfer id, and holds the plan for LEASE_S
                (the writer WRITEs each layer with notification "kv:<transfer_id>:<layer>"; a pump
                thread polls the agent's notifications while any plan is outstanding, which is also
                what progresses the agent: it has no progress thread, see nixl_agent.py)
                CompleteImport ─▶ complete(transfer_id): waits until every layer's notification is
                               in (NIXL delivers a WRITE's notification after its data); from then
                               on a Step reads the imported K/V
    Free        free(seq, engine.free): waits while a plan of the sequence is outstanding (at most
                its lease), so blocks cannot pass to another sequence while a WRITE may still land
    stop        close(): the metadata key is deleted, the memory deregistered

Why a CompleteImport call besides the pump: the writer has to learn that the pod holds the K/V before
it answers its own caller (the decode pod steps right after), so it needs a round trip anyway; the
pump only keeps the agent progressing and the notifications sorted by transfer. It sleeps (no CPU)
while no plan is outstanding and polls every `POLL_S` while one is.

Safety: the pod computes every address from its own block table; a writer that follows the plan
touches only the sequence's blocks. NIXL itself refuses remote rows outside registered memory, but
a one-sided WRITE is not checked by the target: writers are trusted pods of the same cluster.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import redis

from services.attention.engine import AttentionEngine
from services.core.errors import DisaggError
from services.core.pod import redis_url_or_env
from services.core.registry import PodRegistry
from services.core.transport.nixl_agent import NixlAgent, encode_metadata, metadata_key
from services.core.wire import DTYPE_TO_WIRE
from services.proto import attention_pb2 as pb

T = TypeVar("T")

log = logging.getLogger(__name__)

LEASE_S = 60.0  # how long a plan holds: WRITEs are posted within it, Free waits at most this long
POLL_S = 1e-3  # the pump's polls while a plan is outstanding (the agent's progress); ~2% of a core
_NOTIFICATION = re.compile(rb"kv:(\d+):(\d+)")


class NixlDisabledError(DisaggError):
    """A NIXL import call to a pod running with transport grpc."""


class TransferNotPlannedError(DisaggError):
    """CompleteImport of a transfer id this pod does not hold (lease over, or the pod restarted)."""


class ImportIncompleteError(DisaggError):
    """Not every layer's notification arrived within the call's deadline."""


def notification(transfer_id: int, layer: int) -> bytes:
    """The message a writer attaches to the WRITE of one layer of a planned transfer."""
    return b"kv:%d:%d" % (transfer_id, layer)


@dataclass(slots=True)
class _Pending:
    seq_id: int
    expires_at: float  # time.monotonic()
    nbytes: int  # K and V bytes of the plan, all layers
    layers: set[int] = field(default_factory=set)  # layers whose notification arrived


class NixlImporter:
    """One per pod. Thread-safe: RPC threads call plan/complete/free concurrently."""

    def __init__(self, engine: AttentionEngine, pod_id: str, agent: NixlAgent, lease_s: float = LEASE_S):
        self.engine = engine
        self.pod_id = pod_id
        self.agent = agent
        self.lease_s = lease_s
        self._pending: dict[int, _Pending] = {}  # transfer id -> plan not yet completed
        self._next_id = 1
        self._cond = threading.Condition()
        self._closed = False
        self._publisher: MetadataPublisher | None = None
        self._pump = threading.Thread(target=self._pump_notifications, name="nixl-notifications", daemon=True)
        self._pump.start()

    @classmethod
    def create(cls, engine: AttentionEngine, pod_id: str, redis_url: str | None) -> NixlImporter:
        """The agent with the whole pool registered (a few ms: the pool is allocated already)."""
        if redis_url_or_env(redis_url) is None:
            raise DisaggError(
                "transport nixl publishes the pod's NIXL metadata in Redis, but no Redis is set; "
                "pass --redis-url (or DISAGG_REDIS_URL), or use --transport grpc"
            )
        agent = NixlAgent(f"{pod_id}-{secrets.token_hex(4)}")
        pool = engine.pool
        agent.register([t for layer in range(len(pool.k)) for t in (pool.k[layer], pool.v[layer])])
        log.info("NIXL agent %s: registered %.1f MiB of KV pool", agent.name, pool.capacity_bytes / 2**20)
        return cls(engine, pod_id, agent)

    def publish(self, registry: PodRegistry | None) -> None:
        """Start keeping the metadata in Redis next to the pod's registration."""
        if registry is None:
            raise DisaggError("transport nixl needs the pod registered in Redis; pass --redis-url")
        self._publisher = MetadataPublisher(registry, self.pod_id, self.agent.metadata()).start()

    # ---- RPCs ----------------------------------------------------------------------------------
    def plan(self, seq_id: int, start: int, length: int) -> pb.PlanImportResponse:
        """Where positions [start, start + length) of the sequence's lanes live; holds the plan."""
        if length < 1:
            raise DisaggError(f"PlanImport for sequence {seq_id}: length {length}; send length >= 1")
        pool, geometry = self.engine.pool, self.engine.geometry
        bs = pool.block_size
        first, last = start // bs, (start + length - 1) // bs
        with self._cond:
            self._expire()
            lanes = _lane_blocks(self.engine, seq_id, start + length, first, last)
            transfer_id, self._next_id = self._next_id, self._next_id + 1
            row_bytes = geometry.head_dim * pool.k[0].element_size()
            nbytes = 2 * geometry.num_layers * len(lanes) * length * row_bytes
            self._pending[transfer_id] = _Pending(seq_id, time.monotonic() + self.lease_s, nbytes)
            self._cond.notify_all()  # wakes the pump: WRITEs are coming
        return pb.PlanImportResponse(
            agent_name=self.agent.name,
            pod_id=self.pod_id,
            transfer_id=transfer_id,
            block_size=bs,
            row_bytes=row_bytes,
            block_bytes=bs * row_bytes,
            dtype=DTYPE_TO_WIRE[geometry.dtype],
            head_dim=geometry.head_dim,
            k_bases=[t.data_ptr() for t in pool.k],
            v_bases=[t.data_ptr() for t in pool.v],
            first_block=first,
            lanes=[pb.LaneBlocks(block_ids=blocks) for blocks in lanes],
            lease_ms=int(self.lease_s * 1000),
        )

    def complete(self, transfer_id: int, timeout_s: float, abandon: bool = False) -> int:
        """Wait for every layer's notification of the transfer; returns the bytes it wrote. With
        `abandon` the plan is dropped at once (the writer has no WRITE in flight) and 0 returned."""
        deadline = time.monotonic() + timeout_s
        layers = self.engine.geometry.num_layers
        with self._cond:
            while True:
                self._drain()  # the writer's WRITEs are DONE when it calls: notifications are (nearly) in
                pending = self._pending.get(transfer_id)
                if pending is None:
                    raise TransferNotPlannedError(
                        f"transfer {transfer_id} is not planned on this pod (its lease of {self.lease_s:g} s "
                        "ended, it completed already, or the pod restarted); call PlanImport again"
                    )
                if abandon or len(pending.layers) == layers:
                    del self._pending[transfer_id]
                    self._cond.notify_all()  # a Free may be waiting for this sequence
                    return 0 if abandon else pending.nbytes
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(layers)) - pending.layers)
                    raise ImportIncompleteError(
                        f"transfer {transfer_id} (sequence {pending.seq_id}): no notification yet for "
                        f"layers {missing[:8]}{'...' if len(missing) > 8 else ''}; WRITE every layer with "
                        "notification kv:<transfer_id>:<layer>, then call CompleteImport again"
                    )
                self._cond.wait(min(remaining, POLL_S / 4))  # or the pump wakes us with news

    def free(self, seq_id: int, free: Callable[[int], T]) -> T:
        """Run `free(seq_id)` once no unexpired plan of the sequence is outstanding."""
        with self._cond:
            while True:
                self._expire()
                waits = [p.expires_at for p in self._pending.values() if p.seq_id == seq_id]
                if not waits:
                    return free(seq_id)
                log.info("Free of sequence %d waits for %d NIXL import(s) in flight", seq_id, len(waits))
                self._cond.wait(max(0.0, min(waits) - time.monotonic()) + 0.01)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.stop()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pump.join(5)
        self.agent.close()

    # ---- internals -----------------------------------------------------------------------------
    def _pump_notifications(self) -> None:
        """Poll notifications while a plan is outstanding; sleep otherwise."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                self._expire()
                if self._drain():
                    self._cond.notify_all()  # CompleteImport calls re-check their transfer
            time.sleep(POLL_S)

    def _drain(self) -> bool:
        """Sort new notifications into their plans (hold self._cond); True if any arrived."""
        arrived = self.agent.notifications()
        layers = self.engine.geometry.num_layers
        for peer, messages in arrived.items():
            for message in messages:
                match = _NOTIFICATION.fullmatch(message)
                pending = self._pending.get(int(match[1])) if match else None
                if match is None or pending is None or int(match[2]) >= layers:
                    log.warning("NIXL notification %r from %s matches no planned import", message[:64], peer)
                    continue
                pending.layers.add(int(match[2]))
        return bool(arrived)

    def _expire(self) -> None:
        now = time.monotonic()
        for transfer_id in [t for t, p in self._pending.items() if p.expires_at <= now]:
            log.warning("NIXL import %d expired before CompleteImport", transfer_id)
            del self._pending[transfer_id]


def _lane_blocks(engine: AttentionEngine, seq_id: int, end: int, first: int, last: int) -> list[list[int]]:
    """Block ids [first, last] of each lane, after checking the sequence is open and reserved to `end`.

    Uses the engine's lock and checks so that errors read exactly as ImportKV's (NOT_FOUND "is not
    open on this pod", FAILED_PRECONDITION "Reserve N tokens first").
    """
    with engine._lock:
        engine._sequence(seq_id)
        engine._check_reserved(seq_id, end)
        engine.check_importable(seq_id)
        return [list(lane[first : last + 1]) for lane in engine.pool.allocator.block_table(seq_id)]


class MetadataPublisher:
    """Keeps `<prefix>nixl:<pod_id>` in Redis: SET with the pod TTL every heartbeat interval."""

    def __init__(self, registry: PodRegistry, pod_id: str, metadata: bytes) -> None:
        self.client = registry.client
        self.key = metadata_key(registry.settings.key_prefix, pod_id)
        self.value = encode_metadata(metadata)
        self.interval_s = registry.settings.heartbeat_interval_s
        self.ttl_ms = int(registry.settings.pod_ttl_s * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nixl-metadata", daemon=True)

    def start(self) -> MetadataPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.client.delete(self.key)
        except redis.RedisError as exc:
            log.warning("could not delete %s (%s); it expires by itself", self.key, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.set(self.key, self.value, px=self.ttl_ms)
            except redis.RedisError as exc:
                log.warning("publishing NIXL metadata at %s failed (%s); retrying", self.key, exc)
            self._stop.wait(self.interval_s)
