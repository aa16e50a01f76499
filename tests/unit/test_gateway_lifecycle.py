"""Request lifecycle in the gateway, on the real model: deadlines, disconnects, capacity, shutdown,
internal errors. Each scenario drives the ASGI app from one asyncio loop, so requests overlap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from services.core.errors import BackendUnavailableError
from services.core.model.load import LoadedModel
from services.core.tenants import DEFAULT_TENANT
from services.decode.engine import TokenEvent
from services.decode.sampling import SamplingParams
from services.gateway.app import Gateway, create_app
from services.gateway.backend import Backend, BackendLoad, ColocatedBackend
from services.gateway.settings import GatewaySettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MODEL = "smollm2-135m"
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0}


@pytest.fixture(scope="module")
def backend(model: LoadedModel) -> Iterator[ColocatedBackend]:
    backend = ColocatedBackend(model, model_name=MODEL)
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture(autouse=True)
def no_request_left_behind(backend: ColocatedBackend) -> Iterator[None]:
    yield
    asyncio.run(wait_idle(backend))


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def wait_idle(backend: Backend) -> None:
    await wait_until(lambda: backend.load() == BackendLoad(running=0, waiting=0))


def client_for(backend: Backend, **settings: Any) -> httpx.AsyncClient:
    app = create_app(backend, GatewaySettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


async def call_then_disconnect(
    app: Any, path: str, body: dict[str, Any], disconnect_when: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Call the ASGI app as a server would; report the client gone once `disconnect_when(sent)`."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
        "client": ("127.0.0.1", 50000),
        "server": ("gateway", 80),
    }
    call = asyncio.create_task(app(scope, receive, send))
    await wait_until(lambda: disconnect_when(sent))
    gone.set()
    await asyncio.wait_for(call, 10)
    return sent


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- deadline ------------------------------------------------------------------------------------


def test_deadline_cancels_the_request_with_504(backend: ColocatedBackend) -> None:
    async def scenario() -> None:
        async with client_for(backend, request_timeout_seconds=0.5) as client:
            response = await client.post("/v1/completions", json=LONG)
        assert response.status_code == 504
        error = error_of(response)
        assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded")
        await wait_idle(backend)  # the KV is freed

    asyncio.run(scenario())


def test_deadline_during_a_stream_is_an_error_event(backend: ColocatedBackend) -> None:
    async def scenario() -> None:
        async with client_for(backend, request_timeout_seconds=0.5) as client:
            response = await client.post("/v1/completions", json={**LONG, "stream": True})
        assert response.status_code == 200
        blocks = [b for b in response.text.split("\n\n") if b]
        assert len(blocks) > 1 and "[DONE]" not in response.text
        last = json.loads(blocks[-1].removeprefix("data: "))
        assert last["error"]["code"] == "deadline_exceeded"

    asyncio.run(scenario())


# ---- disconnects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_frees_the_request(backend: ColocatedBackend, stream: bool) -> None:
    async def scenario() -> None:
        app = create_app(backend, GatewaySettings())

        def started(sent: list[dict[str, Any]]) -> bool:  # streams: after the first token went out
            return backend.load().running == 1 and (not stream or len(sent) > 1)

        sent = await call_then_disconnect(app, "/v1/completions", {**LONG, "stream": stream}, started)
        await wait_idle(backend)
        gateway: Gateway = app.state.gateway
        assert gateway.admission.in_flight == 0
        if stream:
            assert sent[0]["status"] == 200
            assert all(b"[DONE]" not in m.get("body", b"") for m in sent)

    asyncio.run(scenario())


def test_cancelled_handler_frees_the_request(backend: ColocatedBackend) -> None:
    """A server that cancels the handler task (uvicorn at its forced shutdown) also frees the KV."""

    async def scenario() -> None:
        async with client_for(backend) as client:
            call = asyncio.create_task(client.post("/v1/completions", json=LONG))
            await wait_until(lambda: backend.load().running == 1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await wait_idle(backend)

    asyncio.run(scenario())


# ---- capacity and shutdown -------------------------------------------------------------------------


def test_over_the_concurrency_limit_is_503(backend: ColocatedBackend) -> None:
    async def scenario() -> None:
        async with client_for(backend, max_concurrent_requests=1, request_timeout_seconds=3) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=LONG))
            await wait_until(lambda: backend.load().running == 1)
            second = await client.post("/v1/completions", json={**LONG, "max_tokens": 2})
            assert second.status_code == 503 and error_of(second)["code"] == "no_capacity"
            assert (await first).status_code == 504

    asyncio.run(scenario())


def test_shutdown_drains_then_aborts_with_503(backend: ColocatedBackend) -> None:
    async def scenario() -> None:
        app = create_app(backend, GatewaySettings())
        gateway: Gateway = app.state.gateway
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            short = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 3}))
            long = asyncio.create_task(client.post("/v1/completions", json=LONG))
            await wait_until(lambda: backend.load().running == 2)
            gateway.begin_shutdown(grace_s=1.0)
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            refused = await client.post("/v1/completions", json=LONG)
            assert refused.status_code == 503 and error_of(refused)["code"] == "shutting_down"
            assert (await short).status_code == 200  # finished within the grace period
            aborted = await long
            assert aborted.status_code == 503 and error_of(aborted)["code"] == "shutting_down"
        await wait_idle(backend)

    asyncio.run(scenario())


# ---- failures in the backend ---------------------------------------------------------------------


class BrokenBackend(Backend):
    """The real tokenizer, and a generate that fails the way it is told to."""

    def __init__(self, real: Backend, error: Exception, after_events: int) -> None:
        self.model_name = real.model_name
        self.max_model_len = real.max_model_len
        self.tokenizer = real.tokenizer
        self._error = error
        self._after = after_events

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ready(self) -> bool:
        return False

    def load(self) -> BackendLoad:
        return BackendLoad(0, 0)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[TokenEvent]:
        for i in range(self._after):
            yield TokenEvent(0, 100 + i, f"t{i}", None)
        raise self._error


def run_against(backend: Backend, body: dict[str, Any]) -> httpx.Response:
    async def call() -> httpx.Response:
        async with client_for(backend) as client:
            return await client.post("/v1/completions", json=body)

    return asyncio.run(call())


def test_internal_errors_are_500_without_details(backend: ColocatedBackend) -> None:
    broken = BrokenBackend(backend, RuntimeError("secret internal detail"), after_events=0)
    response = run_against(broken, {"prompt": "Hi"})
    assert response.status_code == 500
    error = error_of(response)
    assert (
        error["type"] == "server_error" and "secret" not in response.text and "Traceback" not in response.text
    )
    stream = run_against(
        broken.__class__(backend, RuntimeError("secret"), after_events=2), {"prompt": "Hi", "stream": True}
    )
    assert stream.status_code == 200 and '"t0"' in stream.text and "secret" not in stream.text
    assert stream.text.rstrip().endswith('"code":"internal"}}')


def test_backend_unavailable_is_503_and_health_follows_ready(backend: ColocatedBackend) -> None:
    broken = BrokenBackend(backend, BackendUnavailableError("decode pod lost"), after_events=0)
    response = run_against(broken, {"prompt": "Hi"})
    assert response.status_code == 503 and error_of(response)["code"] == "backend_unavailable"
    assert "decode pod lost" in error_of(response)["message"]

    async def health() -> httpx.Response:
        async with client_for(broken) as client:
            return await client.get("/health")

    assert asyncio.run(health()).status_code == 503
