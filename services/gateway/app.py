"""The OpenAI-compatible HTTP edge: routes, error mapping and streaming.

    POST /v1/completions        POST /v1/chat/completions       (JSON, or SSE with "stream": true)
    GET  /v1/models             GET  /health                    GET /docs (OpenAPI)
    GET  /metrics               (Prometheus text format; docs/metrics.md)

A request: authenticate (the `authenticate` dependency sets `request.state.tenant`; see auth.py) ->
start its meter (`metering.py`: the tenant's latencies, tokens and cost) -> validate and tokenize
(`prompts.py`) -> admit it against the tenant's limits, then as a guarded generation (`runner.py`;
closing it records the tenant's usage and the request's metrics) -> render events as one JSON body or
as SSE chunks (`render.py`), `usage` carrying the request's cost. Every error becomes OpenAI's error
JSON here and only here (`errors.describe`). A streaming response waits for the first token before
sending headers, so errors up to then still get their real status; later ones become an SSE error event.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal, ParamSpec

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.core.cost import CostMeter
from services.core.errors import DisaggError
from services.core.metrics import PodMetrics
from services.decode.engine import TokenEvent
from services.gateway.auth import Tenancy, authenticate
from services.gateway.backend import Backend
from services.gateway.errors import (
    INVALID_REQUEST,
    ClientDisconnectedError,
    HttpError,
    ShuttingDownError,
    describe,
    invalid_request,
)
from services.gateway.metering import GatewayMetering, RequestMeter
from services.gateway.prompts import ModelLimits, PreparedRequest, prepare_chat, prepare_completion
from services.gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from services.gateway.render import DONE, ChatFormat, CompletionFormat, ResponseFormat, Tally, sse
from services.gateway.runner import Admission, Generation
from services.gateway.settings import GatewaySettings

P = ParamSpec("P")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 402, 404, 429, 500, 503, 504)
}
AUTHENTICATED = [Depends(authenticate)]  # routes that need an API key once keys exist


class Gateway:
    """The state behind the routes: the backend, the settings and the admitted requests."""

    def __init__(self, backend: Backend, settings: GatewaySettings, tenancy: Tenancy | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.tenancy = tenancy or Tenancy.single_tenant()
        self.metrics = PodMetrics(backend.role, settings.pod_id, backend.model_name)
        backend.instrument(self.metrics)
        more_costs = backend.cost_sources()  # non-empty: the backend carries this process's price
        price = 0.0 if more_costs else settings.cost_usd_per_hour
        self.metering = GatewayMetering(self.metrics, CostMeter(price), backend.load, more_costs)
        self.admission = Admission(settings.max_concurrent_requests)
        self.limits = ModelLimits(
            served=settings.served_model_names or [backend.model_name],
            max_model_len=backend.max_model_len,
            default_max_tokens=settings.default_max_tokens,
        )
        self.started = int(time.time())

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests now; after `grace_s`, end the ones still running with a 503 error."""
        self.admission.drain()
        error = ShuttingDownError(
            f"the server is shutting down and the request did not finish in the {grace_s:g} s grace period"
        )
        asyncio.get_running_loop().call_later(grace_s, self.admission.abort_all, error)

    def health(self) -> tuple[int, Health]:
        load = self.backend.load()
        status: Literal["ok", "unavailable", "draining"] = (
            "draining" if self.admission.draining else "ok" if self.backend.ready() else "unavailable"
        )
        body = Health(
            status=status, running=load.running, waiting=load.waiting, in_flight=self.admission.in_flight
        )
        return (200 if status == "ok" else 503), body

    async def serve(
        self,
        request: Request,
        prepare: Coroutine[Any, Any, PreparedRequest],
        response_format: type[ResponseFormat],
    ) -> Response:
        """One request, metered from arrival: an error before its generation is counted here; once
        admitted, the generation counts it when it closes."""
        meter = self.metering.begin(request.state.tenant)
        try:
            prepared = await prepare
            meter.prompt(len(prepared.prompt_ids))
            fmt = response_format(prepared.model, prepared.include_usage)
            return await self.respond(request, prepared, fmt, meter)
        except BaseException as exc:
            meter.fail(exc)
            meter.finish()
            raise

    async def respond(
        self, request: Request, prepared: PreparedRequest, fmt: ResponseFormat, meter: RequestMeter
    ) -> Response:
        tokens = len(prepared.prompt_ids) + prepared.params.max_tokens
        charge = await self.tenancy.admit(request.state.tenant, tokens)
        tally = Tally(prompt_tokens=len(prepared.prompt_ids))
        finish = functools.partial(self.tenancy.finish, charge, tally)  # once, when the request ends
        try:
            generation = self.admission.admit(
                self.backend,
                prepared.prompt_ids,
                prepared.params,
                timeout_s=self.settings.request_timeout_seconds,
                meter=meter,
                disconnected=functools.partial(_wait_for_disconnect, request),
                on_close=finish,
            )
        except BaseException:
            finish()
            raise
        if not prepared.stream:
            try:
                async for event in generation:
                    tally.add(event)
            finally:
                generation.close()
            return _json(fmt.response(tally).model_dump_json())
        try:
            first = await generation.next()
        except BaseException:
            generation.close()
            raise
        body = _sse_stream(generation, first, tally, fmt, prepared.include_usage)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def create_app(backend: Backend, settings: GatewaySettings, tenancy: Tenancy | None = None) -> FastAPI:
    gateway = Gateway(backend, settings, tenancy)
    app = FastAPI(
        title="disagg gateway",
        summary="OpenAI-compatible completions and chat completions served by disagg",
        version="0.1.0",
    )
    app.state.gateway = gateway
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DisaggError, _dependency_error)  # errors raised by `authenticate`

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=ERROR_RESPONSES,
        dependencies=AUTHENTICATED,
    )
    @_openai_errors
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = prepare_completion(body, backend.tokenizer, gateway.limits)
        return await gateway.serve(request, prepared, CompletionFormat)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=ERROR_RESPONSES,
        dependencies=AUTHENTICATED,
    )
    @_openai_errors
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prepared = prepare_chat(body, backend.tokenizer, gateway.limits)
        return await gateway.serve(request, prepared, ChatFormat)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, dependencies=AUTHENTICATED)
    async def models() -> ModelList:
        cards = [
            ModelCard(id=name, created=gateway.started, max_model_len=backend.max_model_len)
            for name in gateway.limits.served
        ]
        return ModelList(data=cards)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Response:
        status, body = gateway.health()
        return _json(body.model_dump_json(), status)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = gateway.metrics.exposition()
        return Response(content=body, media_type=content_type)

    return app


async def _sse_stream(
    generation: Generation, first: TokenEvent, tally: Tally, fmt: ResponseFormat, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        for chunk in fmt.opening():
            yield chunk
        event = first
        while True:
            tally.add(event)
            if event.text:
                yield fmt.delta(event.text)
            if tally.finish_reason is not None:
                break
            event = await generation.next()
        yield fmt.finish(tally.finish_reason)
        if include_usage:
            yield fmt.usage(tally.usage)
        yield DONE
    except ClientDisconnectedError:
        return  # nobody is listening
    except Exception as exc:  # after the first byte the status is sent: the error travels as an event
        yield sse(describe(exc).body)
    finally:
        generation.close()


async def _wait_for_disconnect(request: Request) -> None:
    """Returns once the client is gone (the request body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _openai_errors(route: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """Turn any error a route raises into OpenAI's error JSON (internal ones: a 500 with an id)."""

    @functools.wraps(route)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
        try:
            return await route(*args, **kwargs)
        except Exception as exc:
            return _error(describe(exc))

    return wrapper


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 becomes OpenAI's 400, naming the first bad field."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if not errors:
        return _error(invalid_request(str(exc)))
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return _error(invalid_request(f"the request body is not valid JSON: {detail}"))
    if not location:
        if "json" not in request.headers.get("content-type", ""):
            return _error(invalid_request("send the body as JSON with `Content-Type: application/json`"))
        return _error(invalid_request(f"the request body must be a JSON object: {first.get('msg')}"))
    field = ".".join(location)
    return _error(invalid_request(f"invalid `{field}`: {first.get('msg')}{more}", location[0]))


async def _dependency_error(request: Request, exc: Exception) -> Response:
    return _error(describe(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else "internal error"
    info = ErrorInfo(message=f"{detail}: {request.method} {request.url.path}", type=INVALID_REQUEST)
    return _error(HttpError(status, ErrorResponse(error=info)))


def _error(error: HttpError) -> Response:
    return _json(error.body.model_dump_json(), error.status, error.headers)


def _json(body: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


__all__ = ["Gateway", "create_app"]
