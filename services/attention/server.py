"""The attention pod's gRPC edge: `disagg.v1.Attention` over an `AttentionEngine`, plus health.

    python -m services.attention.server [--port 0 --model smollm2-135m ...]   # or DISAGG_ATTENTION_*
    prints: attention pod <pod_id> listening on <host>:<port>

Lifecycle: settings validated ─▶ model config read (no weights) ─▶ KV pool allocated from the
budget ─▶ serving (health SERVING) ─▶ SIGTERM/SIGINT ─▶ health NOT_SERVING, new steps refused with
UNAVAILABLE, open streams get `shutdown_grace_s` to finish, then every call still open ends with
UNAVAILABLE ─▶ exit.

Why the sync `grpc.server` with a thread pool rather than grpc.aio: the work per frame is blocking
torch arithmetic (which releases the GIL), a Step stream is a plain loop "read frame, compute,
answer" on its own thread, and unary control calls never wait behind a stream's compute. With aio
every layer would hop from the event loop to an executor and back. Each open stream holds one
thread, so `threads` bounds clients; calls past it get RESOURCE_EXHAUSTED instead of queueing.

Errors map to status codes here and only here (see `_STATUS`).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import grpc
import redis
import torch
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.attention.blocks import UnknownSequenceError
from services.attention.costs import AttentionCosts
from services.attention.engine import (
    AttentionEngine,
    InvalidFrameError,
    NotReservedError,
    PodClosingError,
    PodGeometry,
    Released,
    SequenceExistsError,
    StepSession,
    TooManyStepsError,
)
from services.attention.kernels import paged_cpu
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import EvictedPrefillError
from services.attention.metering import AttentionMetrics
from services.attention.nixl_import import (
    ImportIncompleteError,
    NixlDisabledError,
    NixlImporter,
    TransferNotPlannedError,
)
from services.attention.step_server import StepSocketServer
from services.core.attention import DEFAULT_BUDGET, OutOfBlocks, PolicyName, PolicySpec, SeqChunk
from services.core.errors import DisaggError
from services.core.metrics import ATTENTION, MetricsServer, PodMetrics
from services.core.model.config import ModelConfig
from services.core.model.load import parse_dtype
from services.core.model.sources import DEFAULT_MODEL, resolve_model
from services.core.pod import (
    GrpcPodServer,
    PodRegistration,
    PodSettings,
    StatusTable,
    advertised_address,
    grpc_errors,
    pod_main,
    serve_pod_metrics,
    start_grpc_server,
    wait_for_signal,
)
from services.core.registry import ID_PATTERN, AttentionCapacity, PodRegistry, Role
from services.core.wire import (
    DTYPE_TO_WIRE,
    TensorLimits,
    WireError,
    decode,
    encode_into,
)
from services.proto import attention_pb2 as pb
from services.proto import attention_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "disagg.v1.Attention"


class AttentionSettings(PodSettings):
    """Everything an attention pod is configured with; env DISAGG_ATTENTION_<FIELD> or flags."""

    model_config = SettingsConfigDict(env_prefix="DISAGG_ATTENTION_")

    port: int = Field(50061, ge=0, le=65535, description="gRPC port; 0 picks a free one (printed)")
    model: str = Field(DEFAULT_MODEL, description="model name or folder; only its config.json is read")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="KV dtype")
    device: str = Field("cpu", description="torch device of the KV pool")
    kv_budget_bytes: int = Field(2 << 30, gt=0, description="memory for K and V, all layers")
    block_size: int = Field(16, ge=1, le=1024, description="positions per KV block")
    threads: int = Field(32, ge=4, le=1024, description="RPC threads; each open Step stream holds one")
    shutdown_grace_s: float = Field(2.0, ge=0, le=60, description="time open streams get on SIGTERM")
    transport: Literal["grpc", "nixl"] = Field(
        "grpc", description="bulk K/V import: grpc (ImportKV) or nixl (also PlanImport; needs Redis)"
    )
    kv_memory_cost_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of cost_usd_per_hour that pays for KV memory (blocks held x time); the rest "
        "pays for compute (docs/cost.md)",
    )
    default_policy: PolicyName = Field(
        PolicyName.DENSE, description="decode attention policy of sequences opened without one"
    )
    default_budget: float = Field(
        DEFAULT_BUDGET,
        gt=0,
        description="fraction of dense K/V bytes a decode step reads, for a policy opened without a budget",
    )
    step_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="TCP port of the Step socket (decode pods' --step-transport tcp); 0 picks a free one, "
        "which Stats tells clients (set a fixed one where a NetworkPolicy lists ports)",
    )


# Most specific first: the first matching class gives the status.
_STATUS: StatusTable = (
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidFrameError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownSequenceError, grpc.StatusCode.NOT_FOUND),
    (SequenceExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (NotReservedError, grpc.StatusCode.FAILED_PRECONDITION),
    (EvictedPrefillError, grpc.StatusCode.FAILED_PRECONDITION),
    (TooManyStepsError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NixlDisabledError, grpc.StatusCode.FAILED_PRECONDITION),
    (TransferNotPlannedError, grpc.StatusCode.NOT_FOUND),
    (ImportIncompleteError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PodClosingError, grpc.StatusCode.UNAVAILABLE),
    (DisaggError, grpc.StatusCode.INVALID_ARGUMENT),
)


def _status(context: grpc.ServicerContext) -> AbstractContextManager[None]:
    return grpc_errors(context, _STATUS, "attention")


def _status_name(exc: BaseException) -> str:
    """The status the gRPC edge would give `exc`, by name (for the Step socket's ERROR frames)."""
    codes = (code for kind, code in _STATUS if isinstance(exc, kind) and isinstance(code, grpc.StatusCode))
    return next(codes, grpc.StatusCode.INTERNAL).name


class AttentionServicer(pb_grpc.AttentionServicer):
    def __init__(
        self, engine: AttentionEngine, settings: AttentionSettings, metrics: AttentionMetrics | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.limits = TensorLimits(max_bytes=settings.max_message_bytes)
        self.nixl: NixlImporter | None = None  # set at start with transport nixl
        self.metrics = metrics or AttentionMetrics(PodMetrics(ATTENTION, settings.pod_id), engine)
        self.step_port = 0  # the Step socket's bound port, set at start (Stats tells clients)

    def Open(self, request: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenResponse:
        with _status(context):
            budget = request.budget if request.HasField("budget") else None
            policy = PolicySpec.from_wire(request.policy, budget, request.scoring)
            if request.owner and not ID_PATTERN.fullmatch(request.owner):
                raise InvalidFrameError(
                    f"owner {request.owner[:140]!r} is not a pod id ({ID_PATTERN.pattern})"
                )
            self.engine.open(
                request.seq_id, request.kv_head_start, request.kv_head_count, policy, request.owner
            )
        return pb.OpenResponse()

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> pb.ReserveResponse:
        with _status(context):
            result = self.engine.reserve(request.seq_id, request.num_tokens)
        if isinstance(result, OutOfBlocks):
            return pb.ReserveResponse(
                out_of_blocks=pb.OutOfBlocks(needed_blocks=result.needed, free_blocks=result.free)
            )
        return pb.ReserveResponse(
            reserved=pb.Reserved(capacity_tokens=result.capacity_tokens, new_blocks=result.new_blocks)
        )

    def ImportKV(
        self, request_iterator: Iterable[pb.ImportKVChunk], context: grpc.ServicerContext
    ) -> pb.ImportKVResponse:
        chunks = written = 0
        dtype = self.engine.geometry.dtype
        with _status(context):
            for chunk in request_iterator:
                k = decode(chunk.k, self.limits, name="k", dtype=dtype)
                v = decode(chunk.v, self.limits, name="v", dtype=dtype)
                self.engine.import_kv(chunk.seq_id, chunk.layer, chunk.start, k, v)
                chunks += 1
                written += 2 * k.numel() * k.element_size()
        self.metrics.imported("grpc", written)
        return pb.ImportKVResponse(chunks=chunks, bytes=written)

    def Free(self, request: pb.FreeRequest, context: grpc.ServicerContext) -> pb.FreeResponse:
        with _status(context):
            released = self.free_sequence(request.seq_id)
        return pb.FreeResponse(released_blocks=released.blocks, cost_usd=released.cost_usd)

    def free_sequence(self, seq_id: int) -> Released:
        """Free a sequence's blocks (and say what it cost here); with NIXL, first wait while a WRITE
        into them may be in flight (else a late WRITE could land in blocks given to another sequence)."""
        if self.nixl is not None:
            return self.nixl.free(seq_id, self.engine.release)
        return self.engine.release(seq_id)

    def PlanImport(
        self, request: pb.PlanImportRequest, context: grpc.ServicerContext
    ) -> pb.PlanImportResponse:
        with _status(context):
            plan = self._nixl().plan(request.seq_id, request.start, request.length)
        return plan

    def CompleteImport(
        self, request: pb.CompleteImportRequest, context: grpc.ServicerContext
    ) -> pb.CompleteImportResponse:
        with _status(context):
            remaining = context.time_remaining()
            timeout = 10.0 if remaining is None else min(remaining, 60.0)
            written = self._nixl().complete(request.transfer_id, timeout, abandon=request.abandon)
        self.metrics.imported("nixl", written)
        return pb.CompleteImportResponse(bytes=written)

    def _nixl(self) -> NixlImporter:
        if self.nixl is None:
            raise NixlDisabledError(
                f"attention pod {self.settings.pod_id} imports K/V over gRPC only; start it with "
                "--transport nixl (DISAGG_ATTENTION_TRANSPORT=nixl) or send ImportKV"
            )
        return self.nixl

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats, geometry = self.engine.stats(), self.engine.geometry
        return pb.StatsResponse(
            pod_id=self.settings.pod_id,
            blocks_total=stats.blocks_total,
            blocks_free=stats.blocks_free,
            blocks_used=stats.blocks_used,
            block_size=stats.block_size,
            sequences=stats.sequences,
            bytes_total=stats.blocks_total * stats.bytes_per_block,
            bytes_used=stats.blocks_used * stats.bytes_per_block,
            num_layers=geometry.num_layers,
            num_kv_heads=geometry.num_kv_heads,
            group_size=geometry.group_size,
            head_dim=geometry.head_dim,
            dtype=DTYPE_TO_WIRE[geometry.dtype],
            max_message_bytes=self.settings.max_message_bytes,
            step_port=self.step_port,
        )

    def Step(
        self, request_iterator: Iterable[pb.StepRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StepResponse]:
        session = self.engine.session()
        try:
            for frame in request_iterator:
                with _status(context):
                    response = self.step_frame(session, frame)
                if response is not None:
                    yield response
        finally:
            session.close()

    def step_frame(
        self, session: StepSession, frame: pb.StepRequest, transport: str = "grpc"
    ) -> pb.StepResponse | None:
        """One frame of a Step exchange, whichever carries it (`transport`: grpc, the gRPC stream;
        tcp, the Step socket)."""
        kind = frame.WhichOneof("frame")
        if kind == "begin":
            chunks = [SeqChunk(c.seq_id, c.start, c.length, c.kv_only) for c in frame.begin.chunks]
            session.begin(frame.begin.step_id, chunks)
            return None
        if kind != "layer":
            raise InvalidFrameError("a Step frame must carry `begin` or `layer`")
        f, g = frame.layer, self.engine.geometry
        q_lanes, lanes = session.expect_layer(f.step_id, f.layer)
        q = decode(f.q, self.limits, name="q", dtype=g.dtype, shape=(q_lanes, g.group_size, g.head_dim))
        k = decode(f.k_new, self.limits, name="k_new", dtype=g.dtype, shape=(lanes, g.head_dim))
        v = decode(f.v_new, self.limits, name="v_new", dtype=g.dtype, shape=(lanes, g.head_dim))
        o = self.step_layer(session, f.step_id, f.layer, q, k, v, transport)
        response = pb.StepResponse(step_id=f.step_id, layer=f.layer)
        encode_into(response.o, o)
        return response

    def step_layer(
        self,
        session: StepSession,
        step_id: int,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        transport: str = "tcp",
    ) -> torch.Tensor:
        """One layer of an open step, from whichever frame carried it: o [Mq, G, D]."""
        started = time.perf_counter()
        o = session.layer(step_id, layer, q, k, v)
        self.metrics.frame(transport, time.perf_counter() - started, q, k, v, o)
        return o


def build_engine(settings: AttentionSettings) -> AttentionEngine:
    """Read the model's geometry (config.json only) and allocate the KV pool from the budget."""
    config = ModelConfig.from_folder(resolve_model(settings.model, show_progress=False))
    geometry = PodGeometry.from_model(config, parse_dtype(settings.dtype))
    pool_config = KVPoolConfig(
        num_layers=geometry.num_layers,
        head_dim=geometry.head_dim,
        block_size=settings.block_size,
        dtype=geometry.dtype,
        device=settings.device,
    )
    pool = KVPool.from_budget(pool_config, settings.kv_budget_bytes)
    paged_cpu.warm_up(pool.k[0])
    price, share = settings.cost_usd_per_hour, settings.kv_memory_cost_share
    costs = AttentionCosts(price, share, pool.allocator.num_blocks)
    default = PolicySpec(settings.default_policy, settings.default_budget)
    return AttentionEngine(geometry, pool, costs=costs, default_policy=default)


@dataclass(slots=True)
class RunningPod:
    """A started pod; `stop` is the graceful shutdown."""

    grpc: GrpcPodServer
    engine: AttentionEngine
    settings: AttentionSettings
    registration: PodRegistration
    reaper: OrphanReaper | None
    metrics: MetricsServer
    step_socket: StepSocketServer
    nixl: NixlImporter | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    def stop(self) -> None:
        self.grpc.health.enter_graceful_shutdown()  # NOT_SERVING: routers stop sending new work
        if self.reaper is not None:
            self.reaper.stop()
        self.registration.stop()  # out of routing now, not after the TTL
        self.engine.close()  # new steps fail with UNAVAILABLE at once
        self.grpc.stop(self.settings.shutdown_grace_s)  # then open calls end with UNAVAILABLE
        self.metrics.stop()
        self.step_socket.stop()  # its steps already fail with UNAVAILABLE (engine closed)
        if self.nixl is not None:
            self.nixl.close()


def start(settings: AttentionSettings) -> RunningPod:
    engine = build_engine(settings)
    metrics = PodMetrics(ATTENTION, settings.pod_id, settings.model)
    servicer = AttentionServicer(engine, settings, AttentionMetrics(metrics, engine))
    metrics_server, metrics_address = serve_pod_metrics(metrics, settings)
    if settings.transport == "nixl":
        servicer.nixl = NixlImporter.create(engine, settings.pod_id, settings.redis_url)
    server = start_grpc_server(
        settings.host,
        settings.port,
        threads=settings.threads,
        max_message_bytes=settings.max_message_bytes,
        servicers=[(pb_grpc.add_AttentionServicer_to_server, servicer)],
        service_names=[SERVICE_NAME],
    )
    step_socket = StepSocketServer(
        engine,
        functools.partial(servicer.step_frame, transport="tcp"),
        servicer.step_layer,
        _status_name,
        settings.host,
        settings.step_port,
        max_message_bytes=settings.max_message_bytes,
        max_connections=settings.threads,
    ).start()
    servicer.step_port = step_socket.port
    stats = engine.stats()
    registration = PodRegistration.start(
        settings.redis_url,
        pod_id=settings.pod_id,
        role=Role.ATTENTION,
        address=advertised_address(settings.host, server.port),
        model=settings.model,
        capacity=AttentionCapacity(stats.blocks_total, stats.block_size, stats.bytes_per_block),
        load=lambda: engine.stats().sequences,
        metrics_address=metrics_address,
    )
    registry = registration.registry
    free = lambda seq_id: servicer.free_sequence(seq_id).blocks  # noqa: E731
    reaper = OrphanReaper(engine, registry, free).start() if registry is not None else None
    if servicer.nixl is not None:
        servicer.nixl.publish(registry)
    return RunningPod(
        server, engine, settings, registration, reaper, metrics_server, step_socket, servicer.nixl
    )


class OrphanReaper:
    """Frees the sequences of decode pods that left the registry (SIGKILL, crash, partition).

    A decode pod that dies cannot free what it opened here, and the gateway gives the blocks back to
    the Redis ledger when the request fails, so without this the pod would hold blocks the router
    thinks are free. Every pod TTL it lists live decode pods; an owner missing from two lists in a
    row (one TTL of slack for a late heartbeat) loses its sequences. Redis errors skip a round.
    """

    def __init__(
        self, engine: AttentionEngine, registry: PodRegistry, free: Callable[[int], int] | None = None
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.free = free or engine.free  # the pod's safe free (AttentionServicer.free_sequence)
        self.interval_s = registry.settings.pod_ttl_s
        self._missing: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orphan-reaper", daemon=True)

    def start(self) -> OrphanReaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reap_once()
            except redis.RedisError as exc:
                log.warning(
                    "orphan reaper: Redis unreachable (%s); next round in %.0f s", exc, self.interval_s
                )

    def reap_once(self) -> None:
        owners = self.engine.owners() - {""}
        if not owners:
            self._missing.clear()
            return
        live = {pod.pod_id for pod in self.registry.live_pods(Role.DECODE)}
        missing = owners - live
        for owner in missing & self._missing:
            sequences, blocks = self.engine.free_owned_by(owner, self.free)
            log.warning(
                "decode pod %s left the registry: freed its %d sequences (%d blocks)",
                owner,
                sequences,
                blocks,
            )
        self._missing = missing - self._missing


def serve(settings: AttentionSettings) -> None:
    """Run a pod until SIGTERM or SIGINT, then shut down gracefully (call from the main thread)."""
    log.info("attention pod settings: %s", settings.model_dump())
    pod = start(settings)
    stats = pod.engine.stats()
    log.info(
        "KV pool: %d blocks of %d positions, %.1f MiB",
        stats.blocks_total,
        stats.block_size,
        stats.blocks_total * stats.bytes_per_block / 2**20,
    )
    print(f"attention pod {settings.pod_id} listening on {settings.host}:{pod.port}", flush=True)
    wait_for_signal()
    log.info("attention pod %s shutting down", settings.pod_id)
    pod.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.attention.server [flags]`, the same as `disagg serve attention [flags]`."""
    return pod_main("attention", AttentionSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
