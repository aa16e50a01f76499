"""The dense-decode pod's gRPC edge: `disagg.v1.Decode` over an `EngineLoop`, plus health.

    python -m services.decode.server [--port 0 --model smollm2-135m ...]    # or DISAGG_DECODE_*
    prints: decode pod <pod_id> listening on <host>:<port>

The pod holds every weight and no KV: its engine's attention part is `RemoteAttention`, and each
request brings its own placement (which attention pods hold which of its KV heads). One request:

    Generate ─▶ validated (INVALID_ARGUMENT) ─▶ its attention pods probed, once per pod (UNAVAILABLE)
      ─▶ loop.submit: KV opened on its pods ─▶ prompt prefilled by the prefill pod (prefill_address,
         prompts of >= 2 tokens) or by this engine (chunked) ─▶ running batch ─▶ one GenerateResponse
         per token ─▶ KV freed when it finishes, is cancelled (Cancel, or the client goes away) or fails

The last message of a finished request carries its cost (docs/cost.md): this pod's share of the
steps it ran in, the attention pods' Free answers, and the prefill pod's answer.

Lifecycle: settings validated ─▶ model loaded ─▶ engine loop started ─▶ serving (health SERVING,
registered in Redis with running + waiting as load) ─▶ SIGTERM/SIGINT ─▶ health NOT_SERVING,
deregistered, new Generate calls get UNAVAILABLE, requests in flight get `shutdown_grace_s` to
finish, the rest end with UNAVAILABLE and their KV is freed ─▶ exit 0.

The sync `grpc.server`, as on the other pods: a Generate call holds one RPC thread that only waits
for its events; the engine loop's single thread does every forward. `threads` bounds the calls open
at once (calls past it get RESOURCE_EXHAUSTED). Errors map to status codes here and only here.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Literal

import grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.core.attention import PolicySpec
from services.core.cost import CostMeter
from services.core.errors import BackendUnavailableError, DisaggError, InvalidRequestError
from services.core.metrics import DECODE, RUNNING, WAITING, MetricsServer, PodMetrics, export_cost
from services.core.model.config import ModelConfig
from services.core.model.load import load_model, parse_dtype
from services.core.model.sources import DEFAULT_MODEL
from services.core.placement import Placement, PlacementError, is_host_port, placement_from_proto
from services.core.pod import (
    GrpcPodServer,
    PodRegistration,
    PodSettings,
    StatusTable,
    abort_with,
    advertised_address,
    grpc_errors,
    pod_main,
    serve_pod_metrics,
    start_grpc_server,
    wait_for_signal,
)
from services.core.registry import ID_PATTERN, DecodeCapacity, Role
from services.decode.attention_link import AttentionPodError, StepTransport, probe_pod
from services.decode.engine import Engine, TokenEvent
from services.decode.loop import EngineLoop, EngineStoppedError, RequestStream
from services.decode.metering import LinkMetrics, StepMeter
from services.decode.remote_attention import RemoteAttention, RemoteAttentionOptions
from services.decode.remote_prefill import PrefillClient, PrefillPodError, RemotePrefill
from services.decode.sampling import MAX_STOP_STRINGS, SamplingParams
from services.decode.scheduler import FinishReason, SchedulerConfig
from services.proto import decode_pb2 as pb
from services.proto import decode_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "disagg.v1.Decode"
MAX_STOP_TOKEN_IDS = 1024  # bounds what one request can make us allocate


class DecodeSettings(PodSettings):
    """Everything a decode pod is configured with; env DISAGG_DECODE_<FIELD> or flags."""

    model_config = SettingsConfigDict(env_prefix="DISAGG_DECODE_")

    port: int = Field(50081, ge=0, le=65535, description="gRPC port; 0 picks a free one (printed)")
    model: str = Field(DEFAULT_MODEL, description="model name or folder (all weights are loaded)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and q/k/v dtype; attention pods must use the same"
    )
    device: str = Field("cpu", description="torch device of the model")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="sequences in the running batch")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="new tokens in one forward (bounds a local prefill chunk); >= max_num_seqs"
    )
    micro_batches: int = Field(
        2,
        ge=1,
        le=8,
        description="ping-pong micro-batches per forward: the dense part of one runs while the attention "
        "pods work on another (1 = no overlap)",
    )
    micro_batch_min_context: int = Field(
        512,
        ge=0,
        description="split a forward into micro-batches only when its rows attend over at least this "
        "many positions on average: shorter contexts leave too little attention to hide (0 = always)",
    )
    prompt_attention: Literal["decode", "pods"] = Field(
        "decode",
        description="who attends a prompt's first chunk, which attends only to itself: decode (this pod, "
        "while the attention pods work on the other rows; they get only its K/V) or pods (q, K/V and the "
        "output all cross the network)",
    )
    step_transport: StepTransport = Field(
        StepTransport.TCP,
        description="what carries the per-layer Step frames to attention pods: tcp (their Step socket, "
        "no gRPC thread handoffs; bench/layer_rtt.py) or grpc (the Step stream)",
    )
    rpc_timeout_s: float = Field(10.0, gt=0, le=600, description="deadline of unary attention pod calls")
    connect_timeout_s: float = Field(
        5.0, gt=0, le=600, description="how long a new attention pod gets to answer its first call"
    )
    layer_timeout_s: float = Field(
        30.0, gt=0, le=600, description="how long one layer's attention output may take (else the pod failed)"
    )
    prefill_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="deadline of a Prefill call, queueing on the prefill pod included"
    )
    threads: int = Field(256, ge=4, le=4096, description="RPC threads; each open Generate call holds one")
    shutdown_grace_s: float = Field(5.0, ge=0, le=600, description="time requests in flight get on SIGTERM")

    @model_validator(mode="after")
    def _check(self) -> DecodeSettings:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every decode row fits a step"
            )
        return self


# ---- requests -----------------------------------------------------------------------------------
class RequestExistsError(DisaggError):
    """A Generate whose request_id is already running here."""


class PodClosingError(BackendUnavailableError):
    """The pod is shutting down and takes no new requests."""


@dataclass(slots=True, frozen=True)
class GenerateCall:
    """A validated GenerateRequest."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    placement: Placement
    prefill_address: str  # "" = prefill here


def parse_generate(request: pb.GenerateRequest, config: ModelConfig, max_len: int) -> GenerateCall:
    """Check a request against the model and build it; InvalidRequestError names the bad field."""
    if not ID_PATTERN.fullmatch(request.request_id):
        raise InvalidRequestError(
            f"request_id {request.request_id[:140]!r} must match {ID_PATTERN.pattern}", "request_id"
        )
    n = len(request.prompt_ids)  # sizes first: nothing is built from the wire before this
    if n == 0:
        raise InvalidRequestError("prompt_ids is empty; send at least 1 token", "prompt_ids")
    if n >= max_len:
        raise InvalidRequestError(
            f"prompt_ids holds {n} tokens but at most {max_len - 1} fit the context window "
            f"of {max_len} with one generated token",
            "prompt_ids",
        )
    prompt = list(request.prompt_ids)
    if max(prompt) >= config.vocab_size:
        raise InvalidRequestError(
            f"prompt_ids holds token id {max(prompt)}, outside the vocabulary of {config.vocab_size}",
            "prompt_ids",
        )
    try:
        placement = placement_from_proto(request.placement, config.num_kv_heads)
    except PlacementError as exc:
        raise InvalidRequestError(f"placement: {exc}", "placement") from None
    address = request.prefill_address
    if address and not is_host_port(address):
        raise InvalidRequestError(f"prefill_address {address[:300]!r} is not host:port", "prefill_address")
    params = replace(_sampling(request.sampling), attention_policy=_attention_policy(request))
    return GenerateCall(request.request_id, prompt, params, placement, address)


def _attention_policy(request: pb.GenerateRequest) -> PolicySpec | None:
    """The request's policy (None: the attention pods' default); InvalidRequestError names it."""
    if not request.HasField("attention_policy"):
        return None
    p = request.attention_policy
    return PolicySpec.from_wire(p.name, p.budget if p.HasField("budget") else None, p.scoring)


def _sampling(s: pb.SamplingParams) -> SamplingParams:
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"sampling.stop holds {len(s.stop)} strings; at most {MAX_STOP_STRINGS}", "stop"
        )
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        count = len(s.stop_token_ids)
        raise InvalidRequestError(
            f"sampling.stop_token_ids holds {count} ids; at most {MAX_STOP_TOKEN_IDS}", "stop_token_ids"
        )
    return SamplingParams(  # validates ranges, naming the field
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )


# ---- the servicer -------------------------------------------------------------------------------
# Most specific first: the first matching class gives the status.
_STATUS: StatusTable = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (AttentionPodError, grpc.StatusCode.UNAVAILABLE),
    (PrefillPodError, grpc.StatusCode.UNAVAILABLE),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (DisaggError, grpc.StatusCode.INVALID_ARGUMENT),
)


def _status(context: grpc.ServicerContext) -> AbstractContextManager[None]:
    return grpc_errors(context, _STATUS, "decode")


@dataclass(slots=True)
class _Active:
    """A request between Generate and its last event."""

    seq_id: int
    stream: RequestStream
    prefill: RemotePrefill | None


class DecodeServicer(pb_grpc.DecodeServicer):
    """Generate/Cancel/Stats over the engine loop. The loop's thread alone touches the engine and
    `attention`; RPC threads fill `placements` (which `attention` reads on the loop thread) before
    a request is submitted, and probe new attention pods on channels of their own."""

    def __init__(
        self,
        loop: EngineLoop,
        attention: RemoteAttention,
        placements: dict[int, Placement],
        prefill: PrefillClient,
        settings: DecodeSettings,
    ) -> None:
        self.loop = loop
        self.engine: Engine = loop.engine
        self.attention = attention
        self.placements = placements  # seq id -> placement, read by `attention` on the loop thread
        self.prefill = prefill
        self.settings = settings
        self.config = attention.config
        self._active: dict[str, _Active] = {}  # request id -> request
        self._known_pods: set[str] = set()  # attention pods that answered with the right geometry
        self._lock = threading.Lock()  # guards _active, _known_pods and _closing
        self._closing = False

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        with _status(context):
            call = parse_generate(request, self.config, self.engine.max_len)
            self._probe(call.placement)
            active = self._submit(call)
        if not context.add_callback(active.stream.cancel):  # the client went away: free the KV now
            active.stream.cancel()
        ended = False  # the stream delivered its last item
        try:
            first = True
            for event in active.stream:
                ended = event.finish_reason is not None
                response = self._response(event, self._prefill_seconds(active, arrival) if first else 0.0)
                if ended and event.finish_reason is not FinishReason.ABORT:
                    self._add_cost(response.cost, active)
                yield response
                first = False
        except (DisaggError, EngineStoppedError) as exc:  # the stream's last item: a pod failed, shutdown
            ended = True
            if isinstance(exc, AttentionPodError):  # probe it again before the next request uses it
                with self._lock:
                    self._known_pods.discard(exc.address)
            abort_with(context, _STATUS, exc)
        finally:
            self._forget(call.request_id, active, ended)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        with self._lock:
            active = self._active.get(request.request_id)
        if active is not None:
            active.stream.cancel()
        return pb.CancelResponse(cancelled=active is not None)

    def Stats(self, request: pb.DecodeStatsRequest, context: grpc.ServicerContext) -> pb.DecodeStatsResponse:
        return pb.DecodeStatsResponse(
            pod_id=self.settings.pod_id,
            running=self.loop.num_running,
            waiting=self.loop.num_waiting,
            steps=self.loop.steps,
            max_num_seqs=self.settings.max_num_seqs,
        )

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse new requests from now on (shutdown)."""
        with self._lock:
            self._closing = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, at most `timeout_s`; True if none is."""
        deadline = time.monotonic() + timeout_s
        while self.num_active and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.num_active

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    # ---- helpers -------------------------------------------------------------------------------
    def _probe(self, placement: Placement) -> None:
        """Check attention pods seen for the first time here, on this RPC thread: the engine thread
        would otherwise wait for an unreachable pod while the whole batch stands still."""
        with self._lock:
            unknown = [a for a in placement.addresses if a not in self._known_pods]
        for address in unknown:
            probe_pod(address, self.config, self.attention.dtype, self.settings.connect_timeout_s)
            with self._lock:
                self._known_pods.add(address)

    def _submit(self, call: GenerateCall) -> _Active:
        prefill = None
        if call.prefill_address and len(call.prompt_ids) >= 2:  # a 1-token prompt has nothing to prefill
            prefill = RemotePrefill(
                self.prefill,
                call.prefill_address,
                call.prompt_ids,
                call.placement,
                call.request_id,
                self.attention.wire_id,
            )
        with self._lock:
            if self._closing:
                raise PodClosingError(f"decode pod {self.settings.pod_id} is shutting down; use another pod")
            if not self.loop.is_running:
                raise PodClosingError(f"decode pod {self.settings.pod_id}: its engine stopped (see its log)")
            if call.request_id in self._active:
                raise RequestExistsError(f"request {call.request_id} is already running on this pod")
            seq_id = self.loop.new_seq_id()
            self.placements[seq_id] = call.placement  # before the loop thread opens its KV
            try:
                stream = self.loop.submit(call.prompt_ids, call.params, prefill, seq_id)
            except BaseException:
                del self.placements[seq_id]
                raise
            active = self._active[call.request_id] = _Active(seq_id, stream, prefill)
        return active

    def _forget(self, request_id: str, active: _Active, ended: bool) -> None:
        """Drop a request once the loop is done with it: a call that ends early (client gone)
        cancels it and waits for its last event, so its placement outlives every use."""
        if not ended:
            active.stream.cancel()
            try:
                for _ in active.stream:
                    pass
            except (DisaggError, EngineStoppedError):
                pass  # ended with an error: gone from the loop all the same
        with self._lock:
            self._active.pop(request_id, None)
            self.placements.pop(active.seq_id, None)
        self.engine.meter.take(active.seq_id)  # an aborted request's costs stay unattributed
        self.attention.take_cost(active.seq_id)

    def _add_cost(self, cost: pb.RequestCost, active: _Active) -> None:
        """The request's cost: its share of this pod's steps, what its attention pods reported at
        Free (before its last event) and what its prefill pod reported."""
        cost.SetInParent()  # present even when every share is 0 (unpriced pods)
        response = active.prefill.response if active.prefill is not None else None
        cost.prefill_usd = response.cost_usd if response is not None else 0.0
        cost.decode_usd = self.engine.meter.take(active.seq_id)
        cost.attention_usd = self.attention.take_cost(active.seq_id)

    @staticmethod
    def _prefill_seconds(active: _Active, arrival: float) -> float:
        finished = active.prefill.finished_at if active.prefill is not None else None
        return 0.0 if finished is None else max(0.0, finished - arrival)

    @staticmethod
    def _response(event: TokenEvent, prefill_seconds: float) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            token_ids=[] if event.token_id is None else [event.token_id],
            text=event.text,
            finish_reason=event.finish_reason.value if event.finish_reason is not None else "",
            prefill_seconds=prefill_seconds,
        )


# ---- process ------------------------------------------------------------------------------------
@dataclass(slots=True)
class RunningPod:
    """A started pod; `stop` is the graceful shutdown."""

    grpc: GrpcPodServer
    servicer: DecodeServicer
    loop: EngineLoop
    attention: RemoteAttention
    prefill: PrefillClient
    settings: DecodeSettings
    registration: PodRegistration
    metrics: MetricsServer

    @property
    def port(self) -> int:
        return self.grpc.port

    def stop(self) -> None:
        self.grpc.health.enter_graceful_shutdown()  # NOT_SERVING: routers stop sending new work
        self.registration.stop()  # out of routing now, not after the TTL
        self.servicer.close()  # new Generate calls get UNAVAILABLE
        if not self.servicer.wait_idle(self.settings.shutdown_grace_s):
            log.info("ending %d requests still in flight", self.servicer.num_active)
        self.loop.stop()  # the rest end with UNAVAILABLE; their KV is freed
        self.grpc.stop(1.0)  # time for those calls to send their status
        self.attention.close()
        self.prefill.close()
        self.metrics.stop()


def start(settings: DecodeSettings) -> RunningPod:
    model = load_model(
        settings.model, dtype=parse_dtype(settings.dtype), device=settings.device, show_progress=False
    )
    options = RemoteAttentionOptions(
        rpc_timeout_s=settings.rpc_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        layer_timeout_s=settings.layer_timeout_s,
        max_message_bytes=settings.max_message_bytes,
        owner=settings.pod_id,
        step_transport=settings.step_transport,
        local_prompt_attention=settings.prompt_attention == "decode",
    )
    placements: dict[int, Placement] = {}
    metrics = PodMetrics(DECODE, settings.pod_id, settings.model)
    link = LinkMetrics(metrics)
    attention = RemoteAttention(model.config, model.dense.dtype, placements.__getitem__, options, link=link)
    scheduler = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=model.config.max_position_embeddings,
    )
    meter = StepMeter(CostMeter(settings.cost_usd_per_hour))
    engine = Engine(
        model.dense,
        attention,
        model.tokenizer,
        scheduler,
        settings.micro_batches,
        meter,
        micro_batch_min_context=settings.micro_batch_min_context,
    )
    meter.attach(metrics, engine.scheduler)
    loop = EngineLoop(engine, name="decode-engine")
    export_cost(metrics, meter.cost)
    metrics.computed(RUNNING, lambda: [({}, loop.num_running)])
    metrics.computed(WAITING, lambda: [({}, loop.num_waiting)])
    loop.start()
    prefill = PrefillClient(settings.prefill_timeout_s, settings.max_message_bytes)
    servicer = DecodeServicer(loop, attention, placements, prefill, settings)
    server = start_grpc_server(
        settings.host,
        settings.port,
        threads=settings.threads,
        max_message_bytes=settings.max_message_bytes,
        servicers=[(pb_grpc.add_DecodeServicer_to_server, servicer)],
        service_names=[SERVICE_NAME],
    )
    metrics_server, metrics_address = serve_pod_metrics(metrics, settings)
    registration = PodRegistration.start(
        settings.redis_url,
        pod_id=settings.pod_id,
        role=Role.DECODE,
        address=advertised_address(settings.host, server.port),
        model=settings.model,
        capacity=DecodeCapacity(settings.max_num_seqs),
        load=lambda: loop.num_running + loop.num_waiting,
        metrics_address=metrics_address,
    )
    return RunningPod(server, servicer, loop, attention, prefill, settings, registration, metrics_server)


def serve(settings: DecodeSettings) -> None:
    """Run a pod until SIGTERM or SIGINT, then shut down gracefully (call from the main thread)."""
    log.info("decode pod settings: %s", settings.model_dump())
    pod = start(settings)
    print(f"decode pod {settings.pod_id} listening on {settings.host}:{pod.port}", flush=True)
    wait_for_signal()
    log.info("decode pod %s shutting down", settings.pod_id)
    pod.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.decode.server [flags]`, the same as `disagg serve decode [flags]`."""
    return pod_main("decode", DecodeSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
