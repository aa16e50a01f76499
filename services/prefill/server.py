"""The prefill pod's gRPC edge: `disagg.v1.Prefill` over a `PrefillEngine`, plus health.

    python -m services.prefill.server [--port 0 --model smollm2-135m ...]   # or DISAGG_PREFILL_*
    prints: prefill pod <pod_id> listening on <host>:<port>

Lifecycle: settings validated ─▶ model loaded (all weights) ─▶ worker thread started ─▶ serving
(health SERVING, registered in Redis with its queued tokens as load) ─▶ SIGTERM/SIGINT ─▶ health
NOT_SERVING, deregistered, new Prefill calls get UNAVAILABLE, queued and running prompts get
`shutdown_grace_s` to finish, whatever is left gets UNAVAILABLE ─▶ exit.

Each Prefill call holds one RPC thread while its prompt waits and runs (the sync `grpc.server`, as
on attention pods): the thread only validates, queues and waits; the engine's single worker thread
does every forward. Calls past `threads` get RESOURCE_EXHAUSTED from gRPC.

Errors map to status codes here and only here (see `_STATUS`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.cost import CostMeter
from services.core.errors import DisaggError
from services.core.metrics import PREFILL, MetricsServer, PodMetrics
from services.core.model.load import load_model, parse_dtype
from services.core.model.sources import DEFAULT_MODEL
from services.core.placement import placement_from_proto
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
from services.core.registry import PrefillCapacity, Role
from services.prefill.engine import (
    CallerGoneError,
    PodClosingError,
    PrefillEngine,
    PrefillFailedError,
    PrefillOptions,
    PrefillRequest,
    QueueFullError,
)
from services.prefill.kv_export import (
    AttentionChannels,
    AttentionPodUnreachableError,
    ImportRefusedError,
    KVExporter,
    KVGeometry,
    NixlSender,
)
from services.proto import prefill_pb2 as pb
from services.proto import prefill_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "disagg.v1.Prefill"


class PrefillSettings(PodSettings):
    """Everything a prefill pod is configured with; env DISAGG_PREFILL_<FIELD> or flags."""

    model_config = SettingsConfigDict(env_prefix="DISAGG_PREFILL_")

    port: int = Field(50071, ge=0, le=65535, description="gRPC port; 0 picks a free one (printed)")
    model: str = Field(DEFAULT_MODEL, description="model name or folder (all weights are loaded)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and K/V dtype; attention pods must use the same"
    )
    device: str = Field("cpu", description="torch device of the model")
    max_num_tokens: int = Field(
        2048, ge=1, description="prompt tokens batched into one forward (a longer prompt runs alone)"
    )
    max_queued_tokens: int = Field(
        65536, ge=1, description="waiting + running prompt tokens past which new prompts are refused"
    )
    import_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="after a forward, how long attention pods get to acknowledge K/V"
    )
    threads: int = Field(32, ge=4, le=1024, description="RPC threads; each Prefill call holds one")
    shutdown_grace_s: float = Field(5.0, ge=0, le=300, description="time queued prompts get on SIGTERM")
    transport: Literal["grpc", "nixl"] = Field(
        "grpc", description="how K/V reach attention pods: grpc (ImportKV) or nixl (WRITE; needs Redis)"
    )
    nixl_lanes: int = Field(
        2,
        ge=1,
        le=16,
        description="transport nixl: agents writing K/V side by side, layers alternating between them "
        "(over shared memory each lane is one copying thread)",
    )


# Most specific first: the first matching class gives the status.
def _gone(context: grpc.ServicerContext) -> grpc.StatusCode:
    """A caller skipped while queued: nobody reads the answer, but say what happened anyway."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


_STATUS: StatusTable = (
    (CallerGoneError, _gone),
    (AttentionPodUnreachableError, grpc.StatusCode.UNAVAILABLE),
    (ImportRefusedError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PodClosingError, grpc.StatusCode.UNAVAILABLE),
    (PrefillFailedError, grpc.StatusCode.INTERNAL),
    (DisaggError, grpc.StatusCode.INVALID_ARGUMENT),  # prompt, placement
)


def _status(context: grpc.ServicerContext) -> AbstractContextManager[None]:
    return grpc_errors(context, _STATUS, "prefill")


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, settings: PrefillSettings) -> None:
        self.engine = engine
        self.settings = settings

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillResponse:
        with _status(context):
            self.engine.check_prompt(request.token_ids)  # bounded before anything is built from it
            placement = placement_from_proto(request.placement, self.engine.model.config.num_kv_heads)
            prompt = PrefillRequest(request.seq_id, list(request.token_ids), placement, request.request_id)
            result = self.engine.submit(prompt, is_active=context.is_active).wait()
        return pb.PrefillResponse(
            tokens=result.tokens,
            kv_bytes=result.kv_bytes,
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
            cost_usd=result.cost_usd,
        )

    def Stats(
        self, request: pb.PrefillStatsRequest, context: grpc.ServicerContext
    ) -> pb.PrefillStatsResponse:
        stats = self.engine.stats()
        return pb.PrefillStatsResponse(
            pod_id=self.settings.pod_id,
            queued_requests=stats.queued_requests,
            queued_tokens=stats.queued_tokens,
            max_num_tokens=stats.max_num_tokens,
            max_model_len=stats.max_model_len,
            completed=stats.completed,
        )


def build_engine(settings: PrefillSettings, metrics: PodMetrics | None = None) -> PrefillEngine:
    """Load the model and start the worker thread."""
    dtype = parse_dtype(settings.dtype)
    model = load_model(settings.model, dtype=dtype, device=settings.device, show_progress=False)
    log.info("model %s loaded in %.1f s from %s", settings.model, model.load_seconds, model.folder)
    cfg = model.config
    nixl = None
    if settings.transport == "nixl":
        geometry = KVGeometry(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        nixl = NixlSender.create(
            settings.pod_id, settings.redis_url, geometry, settings.max_num_tokens, settings.nixl_lanes
        )
    exporter = KVExporter(AttentionChannels(settings.max_message_bytes), cfg.head_dim, dtype, nixl)
    options = PrefillOptions(
        max_num_tokens=settings.max_num_tokens,
        max_queued_tokens=settings.max_queued_tokens,
        import_timeout_s=settings.import_timeout_s,
    )
    meter = CostMeter(settings.cost_usd_per_hour)
    return PrefillEngine(model.dense, exporter, options, meter, metrics).start()


@dataclass(slots=True)
class RunningPod:
    """A started pod; `stop` is the graceful shutdown."""

    grpc: GrpcPodServer
    engine: PrefillEngine
    settings: PrefillSettings
    registration: PodRegistration
    metrics: MetricsServer

    @property
    def port(self) -> int:
        return self.grpc.port

    def stop(self) -> None:
        self.grpc.health.enter_graceful_shutdown()  # NOT_SERVING: routers stop sending new work
        self.registration.stop()  # out of routing now, not after the TTL
        self.engine.close()  # new Prefill calls fail with UNAVAILABLE at once
        if not self.engine.drain(self.settings.shutdown_grace_s):
            log.warning("prompts still queued after %g s; failing them", self.settings.shutdown_grace_s)
        self.engine.stop()  # what is left answers UNAVAILABLE
        self.grpc.stop(1.0)  # the RPC threads have their answers; let them send them
        self.metrics.stop()


def start(settings: PrefillSettings) -> RunningPod:
    metrics = PodMetrics(PREFILL, settings.pod_id, settings.model)
    engine = build_engine(settings, metrics)
    metrics_server, metrics_address = serve_pod_metrics(metrics, settings)
    server = start_grpc_server(
        settings.host,
        settings.port,
        threads=settings.threads,
        max_message_bytes=settings.max_message_bytes,
        servicers=[(pb_grpc.add_PrefillServicer_to_server, PrefillServicer(engine, settings))],
        service_names=[SERVICE_NAME],
    )
    registration = PodRegistration.start(
        settings.redis_url,
        pod_id=settings.pod_id,
        role=Role.PREFILL,
        address=advertised_address(settings.host, server.port),
        model=settings.model,
        capacity=PrefillCapacity(settings.max_num_tokens),
        load=lambda: engine.stats().queued_tokens,
        metrics_address=metrics_address,
    )
    return RunningPod(server, engine, settings, registration, metrics_server)


def serve(settings: PrefillSettings) -> None:
    """Run a pod until SIGTERM or SIGINT, then shut down gracefully (call from the main thread)."""
    log.info("prefill pod settings: %s", settings.model_dump())
    pod = start(settings)
    print(f"prefill pod {settings.pod_id} listening on {settings.host}:{pod.port}", flush=True)
    wait_for_signal()
    log.info("prefill pod %s shutting down", settings.pod_id)
    pod.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.prefill.server [flags]`, the same as `disagg serve prefill [flags]`."""
    return pod_main("prefill", PrefillSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
