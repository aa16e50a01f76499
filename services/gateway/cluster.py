"""The disaggregated backend: requests placed through Redis and generated on decode pods over gRPC.

    backend = ClusterBackend(ClusterSettings(redis_url=..., placement="head"), tokenizer, config, name)
    backend.start()          # Redis client, the maintenance thread, gRPC channels on first use
    async for event in backend.generate(prompt_ids, params): ...

Per request:

    Router.place ──▶ KV blocks reserved in Redis (Lua, atomic) + a request record (QUEUED)
      ──▶ Decode.Generate(prompt, sampling, placement, prefill pod) on the chosen decode pod
      ◀── token messages ──▶ TokenEvents (record DECODING at the first token)
      ──▶ finish: record FINISHED (or FAILED), reservation released

The gateway owns the reservation for the request's lifetime: a maintenance thread refreshes the
lease of every request in flight (every third of `reservation_ttl_s`), so a gateway that dies
stops refreshing and its blocks come back by themselves. The same thread keeps a readiness
snapshot (Redis reachable, at least one live decode and attention pod), read by GET /health
without touching Redis on the event loop.

A consumer that stops iterating (client gone, deadline) cancels the gRPC call; the decode pod
aborts the request and frees its KV. Redis calls are short and blocking, so they run on the default
executor; gRPC uses grpc.aio on the gateway's event loop.

Conditional disaggregation: only prompts of at least `remote_prefill_min_tokens` go to a prefill
pod. A shorter prompt is prefilled by its decode pod, in chunks inside its running batch, which
spares it the hop to a prefill pod and the K/V shipping (NVIDIA Dynamo makes the same choice; why,
and the bench that measures both paths: docs/architecture.md "Remote prefill").

When every attention pod is full, a request waits in the gateway's FIFO admission queue
(admission.py) until KV comes back, up to `admission_timeout_s`; the queue is bounded by
`max_waiting_requests`, past which requests get 503 at once.

Errors: no pod / no KV room after the wait → NoCapacityError (503 no_capacity); Redis unreachable,
a decode pod unreachable or failing mid-stream → BackendUnavailableError (503) with the pod's own message,
which names the failed attention or prefill pod; INVALID_ARGUMENT from a pod → InvalidRequestError.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import redis
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.cost import RequestCost
from services.core.errors import BackendUnavailableError, DisaggError, InvalidRequestError, NoCapacityError
from services.core.model.config import ModelConfig
from services.core.model.tokenizer import Tokenizer
from services.core.placement import placement_to_proto
from services.core.registry import PodRegistry, RedisSettings, Role, connect
from services.core.request_records import RequestState, RequestStore, new_record
from services.core.reservations import KvReservations
from services.core.router import PlacementMode, Route, Router
from services.core.tenants import DEFAULT_TENANT
from services.core.wire import grpc_message_options
from services.decode.engine import TokenEvent
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason
from services.gateway.admission import AdmissionQueue
from services.gateway.backend import Backend, BackendLoad
from services.proto import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


class ClusterSettings(BaseSettings):
    """How the gateway reaches the cluster. Environment: DISAGG_CLUSTER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="DISAGG_CLUSTER_", extra="forbid")

    # DISAGG_REDIS_URL is what every pod and `disagg keys/tenants` read; the gateway takes it too, so one
    # variable points a whole deployment at its Redis (DISAGG_CLUSTER_REDIS_URL wins when both are set).
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("redis_url", "DISAGG_CLUSTER_REDIS_URL", "DISAGG_REDIS_URL"),
        description="the cluster's Redis",
    )
    placement: PlacementMode = Field(
        PlacementMode.REQUEST,
        description="request | head (Lamina) partitioning; request is the default because a decode "
        "micro-batch then exchanges frames with fewer pods (docs/architecture.md)",
    )
    max_attention_pods: int | None = Field(None, ge=1, description="pods one request's heads spread over")
    max_message_bytes: int = Field(64 << 20, ge=1 << 20, description="gRPC message limit to decode pods")
    connect_timeout_s: float = Field(10.0, gt=0, description="how long a Generate call waits to connect")
    admission_timeout_s: float = Field(
        120.0, gt=0, description="how long a request may wait for KV room before 503 no_capacity"
    )
    max_waiting_requests: int = Field(
        1024, ge=0, description="requests waiting for KV room at once; more get 503 at once (backpressure)"
    )
    remote_prefill_min_tokens: int = Field(
        512,
        ge=2,
        description="prompts of at least this many tokens go to a prefill pod; shorter ones are prefilled "
        "by their decode pod, in its batch (conditional disaggregation, docs/architecture.md)",
    )


@dataclass(slots=True, frozen=True)
class _Readiness:
    ok: bool
    reason: str  # why not, for logs


class ClusterBackend(Backend):
    def __init__(
        self,
        settings: ClusterSettings,
        tokenizer: Tokenizer,
        config: ModelConfig,
        model_name: str,
        redis_settings: RedisSettings | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name  # what pods register under, and the default OpenAI model id
        self.max_model_len = config.max_position_embeddings
        self.redis_settings = redis_settings or RedisSettings(url=settings.redis_url)
        self._client = connect(self.redis_settings)
        self._registry = PodRegistry(self._client, self.redis_settings)
        self._reservations = KvReservations(self._client, self.redis_settings)
        self._records = RequestStore(self._client, self.redis_settings)
        self._router = Router(
            self._registry,
            self._reservations,
            settings.placement,
            max_attention_pods=settings.max_attention_pods,
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = threading.Lock()  # guards _active and _pending
        self._active: set[str] = set()  # request ids holding a reservation
        self._pending: dict[str, int] = {}  # pod id -> our requests on it (load not yet in a heartbeat)
        self._admission = AdmissionQueue(settings.max_waiting_requests)
        self._readiness = _Readiness(False, "not started")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._maintain, name="cluster-maintenance", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._readiness = self._check_readiness()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            leftover = list(self._active)
        for request_id in leftover:  # requests cut off by shutdown: give their blocks back now
            self._release_quietly(request_id)
        self._client.close()

    def ready(self) -> bool:
        return self._readiness.ok

    def load(self) -> BackendLoad:
        with self._lock:
            return BackendLoad(running=len(self._active), waiting=self._admission.waiting)

    # ---- one request ---------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[TokenEvent]:
        request_id = f"req-{uuid.uuid4().hex}"
        route = await self._admission.admit(
            lambda: self._place(request_id, prompt_ids, params), self.settings.admission_timeout_s
        )
        finished, first = False, True
        call = None
        try:
            await asyncio.to_thread(self._store_record, route, tenant)
            call = self._stub(route.decode.info.address).Generate(
                self._generate_request(request_id, route, prompt_ids, params)
            )
            async for message in call:
                if first:
                    first = False
                    await asyncio.to_thread(self._record_state, request_id, RequestState.DECODING)
                for event in _events(message):
                    finished = event.finish_reason is not None
                    yield event
            if not finished:
                raise BackendUnavailableError(
                    f"decode pod {route.decode.pod_id} ended request {request_id} without a finish reason"
                )
        except grpc.aio.AioRpcError as exc:
            finished = True  # the call is over either way
            raise _error_from_status(route, exc) from None
        finally:
            if call is not None and not finished:
                call.cancel()  # the client went away: the decode pod aborts and frees the KV
            state = RequestState.FINISHED if finished and not first else RequestState.FAILED
            await asyncio.shield(asyncio.to_thread(self._end, route, state))
            self._admission.notify()  # its KV is back: the longest-waiting request may fit now

    def _generate_request(
        self, request_id: str, route: Route, prompt_ids: list[int], params: SamplingParams
    ) -> decode_pb2.GenerateRequest:
        request = decode_pb2.GenerateRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            prefill_address=route.prefill.info.address if route.prefill else "",
        )
        s = request.sampling
        s.max_tokens, s.temperature, s.top_p, s.top_k = (
            params.max_tokens,
            params.temperature,
            params.top_p,
            params.top_k,
        )
        if params.seed is not None:
            s.seed = params.seed % (1 << 64)
        s.stop.extend(params.stop)
        s.stop_token_ids.extend(params.stop_token_ids)
        s.ignore_eos = params.ignore_eos
        policy = params.attention_policy
        if policy is not None:
            p = request.attention_policy
            p.name, p.scoring = policy.name.value, policy.scoring.value
            if policy.budget is not None:
                p.budget = policy.budget
        placement_to_proto(route.attention.placement, request.placement)
        return request

    async def _place(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Route:
        # KV for everything the request may hold: the prompt and every token it may generate.
        num_tokens = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        with self._lock:
            pending = dict(self._pending)
        try:
            route = await asyncio.to_thread(
                self._router.place,
                request_id,
                self.model_name,
                self.config.num_kv_heads,
                num_tokens,
                prefill=len(prompt_ids) >= self.settings.remote_prefill_min_tokens,
                pending=pending,
            )
        except redis.RedisError as exc:
            raise BackendUnavailableError(f"cannot reach Redis at {self.redis_settings.url}: {exc}") from exc
        with self._lock:
            self._active.add(request_id)
            for pod in (route.decode, route.prefill):
                if pod is not None:
                    self._pending[pod.pod_id] = self._pending.get(pod.pod_id, 0) + 1
        return route

    def _end(self, route: Route, state: RequestState) -> None:
        with self._lock:
            self._active.discard(route.request_id)
            for pod in (route.decode, route.prefill):
                if pod is not None and (left := self._pending.get(pod.pod_id, 0) - 1) <= 0:
                    self._pending.pop(pod.pod_id, None)
                elif pod is not None:
                    self._pending[pod.pod_id] = left
        self._release_quietly(route.request_id)
        self._record_state(route.request_id, state)

    def _store_record(self, route: Route, tenant: str) -> None:
        """QUEUED, then PREFILLING at once: the decode pod starts the prefill as soon as it has it."""
        try:
            self._records.put(
                new_record(route.request_id, tenant, self.model_name, route.attention.placement)
            )
            self._records.update_state(route.request_id, RequestState.PREFILLING)
        except redis.RedisError as exc:  # the record is for recovery; serving goes on without it
            log.warning("request %s: could not store its record: %s", route.request_id, exc)

    def _record_state(self, request_id: str, state: RequestState) -> None:
        try:
            self._records.update_state(request_id, state)
        except (redis.RedisError, DisaggError) as exc:  # never fail a request over its record
            log.warning("request %s: could not move its record to %s: %s", request_id, state, exc)

    def _release_quietly(self, request_id: str) -> None:
        try:
            self._router.release(request_id)
        except redis.RedisError as exc:  # the lease runs out by itself
            log.warning("request %s: could not release its KV reservation (%s); it expires", request_id, exc)

    def _stub(self, address: str) -> decode_pb2_grpc.DecodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address, options=grpc_message_options(self.settings.max_message_bytes)
            )
            self._channels[address] = channel
        return decode_pb2_grpc.DecodeStub(channel)

    # ---- maintenance thread --------------------------------------------------------------------
    def _maintain(self) -> None:
        refresh_every = self.redis_settings.reservation_ttl_s / 3
        last_refresh = time.monotonic()
        while not self._stop.wait(0.5):
            self._readiness = self._check_readiness()
            if time.monotonic() - last_refresh >= refresh_every:
                last_refresh = time.monotonic()
                with self._lock:
                    active = list(self._active)
                for request_id in active:
                    try:
                        if not self._reservations.refresh(request_id):
                            log.warning("request %s: its KV lease had expired before refresh", request_id)
                    except redis.RedisError as exc:
                        log.warning("could not refresh KV leases: %s", exc)
                        break

    def _check_readiness(self) -> _Readiness:
        try:
            missing = [
                role.value
                for role in (Role.DECODE, Role.ATTENTION)
                if not self._registry.live_pods(role, self.model_name)
            ]
        except redis.RedisError as exc:
            state = _Readiness(False, f"Redis unreachable: {exc}")
        else:
            state = _Readiness(not missing, f"no live {', '.join(missing)} pod" if missing else "")
        if state.ok != self._readiness.ok:
            log.info("cluster %s%s", "ready" if state.ok else "not ready: ", state.reason)
        return state


def _events(message: decode_pb2.GenerateResponse) -> list[TokenEvent]:
    """One TokenEvent per token; the message's text (and the request's cost, on the last message)
    goes with its last token."""
    reason = FinishReason(message.finish_reason) if message.finish_reason else None
    cost = _cost(message.cost) if message.HasField("cost") else None
    ids = list(message.token_ids)
    if not ids:
        return [TokenEvent(0, None, message.text, reason, cost)]
    events = [TokenEvent(0, token, "", None) for token in ids[:-1]]
    events.append(TokenEvent(0, ids[-1], message.text, reason, cost))
    return events


def _cost(cost: decode_pb2.RequestCost) -> RequestCost:
    return RequestCost(
        prefill_usd=cost.prefill_usd, decode_usd=cost.decode_usd, attention_usd=cost.attention_usd
    )


def _error_from_status(route: Route, exc: grpc.aio.AioRpcError) -> Exception:
    where = f"decode pod {route.decode.pod_id} ({route.decode.info.address})"
    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return NoCapacityError(f"{where}: {details}")
    return BackendUnavailableError(f"{where}: {code.name}: {details}")
