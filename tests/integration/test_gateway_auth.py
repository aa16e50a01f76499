"""Gateway authentication, rate limits and budgets: the real FastAPI app, a real valkey-server.

Authentication does not depend on the model, so the backend here is a small scripted one (it writes
`max_tokens` tokens) over a real word-level `tokenizers` tokenizer: these tests take seconds. The
slow test at the end runs the real gateway process on the real model's tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models, pre_tokenizers

from services.core.api_keys import ApiKeyStore
from services.core.errors import DisaggError
from services.core.model.tokenizer import Tokenizer
from services.core.registry import RedisSettings, connect
from services.core.tenants import DEFAULT_TENANT, TenantLimits, TenantStore
from services.decode.engine import TokenEvent
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason
from services.gateway.app import create_app
from services.gateway.auth import Tenancy, read_keys_file
from services.gateway.backend import Backend, BackendLoad
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
WORDS = ["[UNK]", "hello", "world", "the", "cat"]
BODY = {"model": "scripted", "prompt": "hello world", "max_tokens": 3}


class ScriptedBackend(Backend):
    """Generates `max_tokens` tokens ("w0 w1 ..."), then finishes with `length`."""

    def __init__(self) -> None:
        hf = HfTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = Tokenizer(hf, special_tokens={}, chat_template=None, eos_token_ids=())
        self.model_name = "scripted"
        self.max_model_len = 4096
        self.tenants: list[str] = []  # the tenant of every request, as the gateway hands it over

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def load(self) -> BackendLoad:
        return BackendLoad(0, 0)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[TokenEvent]:
        self.tenants.append(tenant)
        for i in range(params.max_tokens):
            last = i == params.max_tokens - 1
            yield TokenEvent(0, 1, f"w{i} ", FinishReason.LENGTH if last else None)


def tenancy_for(settings: RedisSettings, cache_s: float = 0.0, **kwargs: Any) -> Tenancy:
    client = connect(settings)
    return Tenancy(
        ApiKeyStore(client, settings),
        TenantStore(client, settings),
        cache_s=cache_s,
        redis_url=settings.url,
        **kwargs,
    )


def serve(tenancy: Tenancy, *calls: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    """Run `calls` (method, path, httpx kwargs) in order against a fresh app; wait for usage to land."""

    async def scenario() -> list[httpx.Response]:
        app = create_app(ScriptedBackend(), GatewaySettings(), tenancy)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            responses = [await client.request(method, path, **kw) for method, path, kw in calls]
        await tenancy.flush()
        return responses

    return asyncio.run(scenario())


def completion(key: str | None = None, **body: Any) -> tuple[str, str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return "POST", "/v1/completions", {"json": {**BODY, **body}, "headers": headers}


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return str(error["message"])


# ---- no keys: one tenant -------------------------------------------------------------------------


def test_without_keys_everything_is_tenant_default(redis_settings: RedisSettings, store: TenantStore) -> None:
    plain, with_header = serve(tenancy_for(redis_settings), completion(), completion("unused"))
    assert plain.status_code == with_header.status_code == 200
    assert plain.json()["choices"][0]["text"] == "w0 w1 w2 "
    usage = store.usage("default")
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 4, 6)


def test_without_redis_the_gateway_is_single_tenant() -> None:
    (response,) = serve(Tenancy.single_tenant(), completion())
    assert response.status_code == 200


# ---- keys ----------------------------------------------------------------------------------------


def test_keys_exist_so_a_key_is_required(
    redis_settings: RedisSettings, keys: ApiKeyStore, store: TenantStore
) -> None:
    key, _ = keys.create("acme")
    missing, wrong, malformed, valid, stream, models, models_ok, health, metrics = serve(
        tenancy_for(redis_settings),
        completion(),
        completion("sk-disagg-not-a-real-key-0000000000000000000000"),
        ("POST", "/v1/completions", {"json": BODY, "headers": {"Authorization": f"Basic {key}"}}),
        completion(key),
        completion(key, stream=True),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models", {"headers": {"Authorization": f"Bearer {key}"}}),
        ("GET", "/health", {}),
        ("GET", "/metrics", {}),
    )
    assert "didn't provide an API key" in error_of(missing, 401, "invalid_api_key")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "Incorrect API key" in error_of(wrong, 401, "invalid_api_key")
    assert "Bearer <key>" in error_of(malformed, 401, "invalid_api_key")
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert valid.status_code == 200 and valid.json()["usage"]["completion_tokens"] == 3
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    error_of(models, 401, "invalid_api_key")
    assert models_ok.status_code == 200 and health.status_code == 200
    usage = store.usage("acme")
    assert (usage.requests, usage.completion_tokens) == (2, 6) and store.usage("default").requests == 0
    for response in (missing, wrong, malformed, valid):
        assert key not in response.text

    # The four 401s (three completions, one model list) are counted, under no tenant's name.
    def requests(tenant: str, status: str) -> float:
        labels = (f'tenant="{tenant}"', f'status="{status}"')
        lines = [ln for ln in metrics.text.splitlines() if ln.startswith("disagg_requests_total{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if all(x in ln for x in labels))

    # The four 401s (three completions, one model list) are counted, under no tenant's name.
    assert (requests("-", "unauthorized"), requests("acme", "ok"), requests("acme", "unauthorized")) == (
        4,
        2,
        0,
    )


def test_a_revoked_key_stops_working_within_the_cache_time(
    redis_settings: RedisSettings, keys: ApiKeyStore
) -> None:
    key, record = keys.create("acme")
    tenancy = tenancy_for(redis_settings, cache_s=0.5)
    (before,) = serve(tenancy, completion(key))
    keys.revoke(record.key_id)
    (cached,) = serve(tenancy, completion(key))  # answered from the cache: no Redis round trip
    time.sleep(0.6)
    (after,) = serve(tenancy, completion(key))
    assert before.status_code == cached.status_code == 200
    assert f"API key {record.key_id} was revoked" in error_of(after, 401, "invalid_api_key")


def test_redis_unreachable_fails_closed() -> None:
    dead = RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=0.5)
    (response,) = serve(tenancy_for(dead), completion("sk-disagg-whatever-0123456789"))
    message = error_of(response, 503, "auth_unavailable")
    assert "redis://127.0.0.1:1/0" in message and "fails closed" in message


def test_a_keys_file_is_imported_and_reimported_after_redis_loses_it(
    redis_settings: RedisSettings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    key = "k8s-secret-key-0123456789abcdef"
    path = tmp_path / "keys"
    path.write_text(f"# from the Helm chart's Secret\n\nacme:{key}\n")
    tenancy = tenancy_for(redis_settings, bootstrap_keys=read_keys_file(path))
    tenancy.bootstrap()
    first, anonymous = serve(tenancy, completion(key), completion())
    for name in redis_client.scan_iter(f"{redis_settings.key_prefix}*"):  # Redis restarted empty
        redis_client.delete(name)
    (again,) = serve(tenancy, completion(key))
    assert first.status_code == again.status_code == 200
    error_of(anonymous, 401, "invalid_api_key")


def test_keys_file_errors_name_the_line_not_the_key(tmp_path: Path) -> None:
    key = "a-secret-that-must-not-leak-0123"
    for content, problem in (
        (f"{key}\n", "expected TENANT:KEY"),
        (f"{key}:acme\n", "the key after ':'"),  # reversed
        (f"no spaces:{key}\n", "the tenant before ':'"),
        ("acme:short\n", "16-256 printable"),
    ):
        path = tmp_path / "keys"
        path.write_text(f"# comment\n{content}")
        with pytest.raises(DisaggError) as error:
            read_keys_file(path)
        assert "line 2" in str(error.value) and key not in str(error.value)
        assert problem in str(error.value)


# ---- limits --------------------------------------------------------------------------------------


def test_over_the_request_rate_is_429_with_retry_after(
    redis_settings: RedisSettings, keys: ApiKeyStore, store: TenantStore
) -> None:
    key, _ = keys.create("acme")
    store.set_limits("acme", TenantLimits(requests_per_minute=2))
    *ok, limited = serve(tenancy_for(redis_settings), completion(key), completion(key), completion(key))
    assert [r.status_code for r in ok] == [200, 200]
    message = error_of(limited, 429, "rate_limit_exceeded")
    assert limited.json()["error"]["type"] == "requests"
    assert "'acme' is over its limit of 2 requests per minute" in message
    assert 1 <= int(limited.headers["Retry-After"]) <= 120  # up to two windows: see tenants.py


def test_requests_are_metered_and_charged_under_their_keys_tenant(
    redis_settings: RedisSettings, keys: ApiKeyStore, store: TenantStore
) -> None:
    """The gateway's metrics carry the key's tenant, and a tenant's spend is its responses' cost; the
    backend gets the tenant with each request (the cluster writes it into the request record)."""
    acme, _ = keys.create("acme")
    globex, _ = keys.create("globex")
    store.set_limits("globex", TenantLimits(requests_per_minute=1))
    tenancy = tenancy_for(redis_settings)

    async def scenario() -> list[httpx.Response]:
        app = create_app(backend, GatewaySettings(cost_usd_per_hour=3600.0), tenancy)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            calls = [completion(acme), completion(acme), completion(globex), completion(globex)]
            responses = [await client.request(method, path, **kw) for method, path, kw in calls]
            responses.append(await client.get("/metrics"))
        await tenancy.flush()
        return responses

    backend = ScriptedBackend()
    *answers, metrics = asyncio.run(scenario())
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert backend.tenants == ["acme", "acme", "globex"]  # the rate-limited request never reached it
    costs = [r.json()["usage"]["cost_usd"] for r in answers[:3]]
    assert all(c > 0 for c in costs)  # the gateway's own share: the scripted backend reports no pods
    assert store.usage("acme").cost_usd == pytest.approx(costs[0] + costs[1])
    assert store.usage("globex").cost_usd == pytest.approx(costs[2])
    lines = metrics.text.splitlines()

    def series(name: str, **labels: str) -> float:
        match = [
            ln
            for ln in lines
            if ln.startswith(name + "{") and all(f'{k}="{v}"' in ln for k, v in labels.items())
        ]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in match)

    assert series("disagg_requests_total", tenant="acme", status="ok") == 2
    assert series("disagg_requests_total", tenant="globex", status="ok") == 1
    assert series("disagg_requests_total", tenant="globex", status="rate_limited") == 1
    assert series("disagg_request_cost_usd_total", tenant="acme") == pytest.approx(costs[0] + costs[1])


def test_over_the_token_rate_is_429(
    redis_settings: RedisSettings, keys: ApiKeyStore, store: TenantStore
) -> None:
    key, _ = keys.create("acme")
    store.set_limits("acme", TenantLimits(tokens_per_minute=50))
    # 2 prompt tokens + 20 = 22 each: two fit, and each gives back nothing (it uses all 20).
    fits, fits_too, limited, never = serve(
        tenancy_for(redis_settings),
        completion(key, max_tokens=20),
        completion(key, max_tokens=20),
        completion(key, max_tokens=20),
        completion(key, max_tokens=60),
    )
    assert fits.status_code == fits_too.status_code == 200
    error_of(limited, 429, "rate_limit_exceeded")
    assert limited.json()["error"]["type"] == "tokens" and int(limited.headers["Retry-After"]) >= 1
    assert "lower max_tokens" in error_of(never, 429, "rate_limit_exceeded")
    assert "Retry-After" not in never.headers  # waiting would not help


def test_over_the_monthly_budget_is_402(
    redis_settings: RedisSettings, keys: ApiKeyStore, store: TenantStore
) -> None:
    key, _ = keys.create("acme")
    store.set_limits("acme", TenantLimits(monthly_budget_usd=2.0))
    store.record_usage("acme", 100, 100, 2.5)
    (response,) = serve(tenancy_for(redis_settings), completion(key))
    message = error_of(response, 402, "insufficient_quota")
    assert response.json()["error"]["type"] == "insufficient_quota"
    assert "'acme' has spent $2.5000 of its $2.00 monthly budget" in message


def test_keys_never_reach_the_logs(
    redis_settings: RedisSettings, keys: ApiKeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    key, record = keys.create("acme")
    keys.revoke(record.key_id)
    other, _ = keys.create("acme")
    caplog.set_level(logging.DEBUG)
    serve(tenancy_for(redis_settings), completion(other), completion(key), completion(other + "x"))
    assert caplog.records  # something was logged (redis-py, httpx, the gateway)
    assert key not in caplog.text and other not in caplog.text


# ---- the real gateway process --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "keyed_status"),
    [
        ("--colocated", 200),  # --redis-url with --colocated: a Redis for tenants only
        ("cluster", 503),  # no pods registered: past authentication and admission there is no capacity
    ],
)
def test_the_gateway_process_imports_its_keys_file_and_logs_no_key(
    model_folder: Path, redis_settings: RedisSettings, tmp_path: Path, mode: str, keyed_status: int
) -> None:
    key = "helm-secret-key-0123456789abcdef"
    path = tmp_path / "keys"
    path.write_text(f"acme:{key}\n")
    env = {
        **os.environ,
        "DISAGG_CACHE_DIR": str(model_folder.parent),
        "DISAGG_REDIS_KEY_PREFIX": redis_settings.key_prefix,
        "DISAGG_GATEWAY_API_KEYS_FILE": str(path),
    }
    argv = [sys.executable, "-m", "services.gateway.server", "--port", "0", "--redis-url", redis_settings.url]
    argv += [mode] if mode.startswith("--") else []
    log_path = tmp_path / "gateway.log"
    with (
        log_path.open("w") as log,
        subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True) as proc,
    ):
        try:
            url = wait_for_ready(proc)
            body = {"prompt": "Hello", "max_tokens": 2}
            anonymous = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            auth = {"Authorization": f"Bearer {key}"}
            keyed = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
    stderr = log_path.read_text()
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert keyed.status_code == keyed_status, keyed.text
    if keyed_status == 200:
        assert keyed.json()["usage"]["completion_tokens"] == 2
    assert "API keys file: 1 imported" in stderr and key not in stderr


def wait_for_ready(proc: subprocess.Popen[str], timeout_s: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ready: "):
            return line.split(" ", 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"the gateway did not become ready (exit {proc.poll()})")
