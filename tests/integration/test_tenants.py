"""API keys, tenant limits, rate windows and monthly usage against a real valkey-server; and the
`disagg keys` / `disagg tenants` commands as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from services.cli import main
from services.core.api_keys import KEY_PREFIX, ApiKeyError, ApiKeyStore, LookupStatus
from services.core.registry import RedisSettings
from services.core.tenants import (
    BudgetExceededError,
    Charge,
    LimitKind,
    RateLimitedError,
    TenantError,
    TenantLimits,
    TenantStore,
    current_month,
)

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def everything_under(client: redis.Redis, prefix: str) -> str:
    """Every key name and value under `prefix`, as one string."""
    dump = []
    for name in client.scan_iter(f"{prefix}*"):
        kind = client.type(name)
        value = {
            "string": client.get,
            "hash": client.hgetall,
            "set": client.smembers,
            "zset": lambda n: client.zrange(n, 0, -1, withscores=True),
            "list": lambda n: client.lrange(n, 0, -1),
        }[kind](name)
        dump.append(f"{name} {value}")
    return "\n".join(dump)


# ---- API keys ------------------------------------------------------------------------------------


def test_keys_are_stored_only_as_hashes(
    keys: ApiKeyStore, redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    key, record = keys.create("acme")
    assert key.startswith(KEY_PREFIX) and len(key) >= len(KEY_PREFIX) + 43
    assert keys.lookup(key).status is LookupStatus.VALID
    keys.revoke(record.key_id)
    dump = everything_under(redis_client, redis_settings.key_prefix)
    assert record.key_id in dump  # the dump really holds the records
    secret = key[len(KEY_PREFIX) :]
    # Neither the key nor any 12-character piece of its random part is anywhere in Redis.
    assert key not in dump
    assert not any(secret[i : i + 12] in dump for i in range(len(secret) - 11))


def test_create_lookup_list_revoke(keys: ApiKeyStore) -> None:
    assert not keys.any_keys()
    key_a, a = keys.create("acme")
    key_b, b = keys.create("beta")
    assert keys.any_keys() and a.key_id != b.key_id and key_a != key_b
    found = keys.lookup(key_a)
    assert (found.status, found.key_id, found.tenant) == (LookupStatus.VALID, a.key_id, "acme")
    assert keys.lookup(key_a + "x").status is LookupStatus.UNKNOWN
    assert [r.key_id for r in keys.list()] == [a.key_id, b.key_id]
    assert [r.key_id for r in keys.list("beta")] == [b.key_id]
    used = keys.get(a.key_id)
    assert used is not None and used.last_used_at is not None and used.last_used_at >= a.created_at
    assert keys.get(b.key_id).last_used_at is None  # type: ignore[union-attr]

    assert keys.revoke(a.key_id) is True
    assert keys.revoke(a.key_id) is False  # idempotent, and says so
    revoked = keys.lookup(key_a)
    assert (revoked.status, revoked.key_id) == (LookupStatus.REVOKED, a.key_id)
    listed = {r.key_id: r for r in keys.list()}
    assert not listed[a.key_id].active and listed[b.key_id].active
    with pytest.raises(ApiKeyError, match="revoke it first"):
        keys.delete(b.key_id)
    keys.revoke(b.key_id)
    assert keys.any_keys()  # revoked keys still count: the gateway stays locked
    keys.delete(a.key_id)
    keys.delete(b.key_id)
    assert not keys.any_keys() and keys.list() == [] and keys.lookup(key_a).status is LookupStatus.UNKNOWN
    with pytest.raises(ApiKeyError, match="no API key with id"):
        keys.revoke("key_000000000000")


def test_import_is_idempotent_and_never_revives_a_revoked_key(keys: ApiKeyStore) -> None:
    key = "bootstrap-key-0123456789abcdef"
    assert keys.import_key("acme", key) == "created"
    assert keys.import_key("acme", key) == "exists"
    assert keys.import_key("other", key) == "exists"  # the key keeps its first tenant
    assert keys.lookup(key).tenant == "acme" and len(keys.list()) == 1
    keys.revoke(keys.list()[0].key_id)
    assert keys.import_key("acme", key) == "revoked"
    assert keys.lookup(key).status is LookupStatus.REVOKED
    with pytest.raises(ApiKeyError, match="16-256 printable"):
        keys.import_key("acme", "short")
    with pytest.raises(TenantError, match="must match"):
        keys.create("no spaces allowed")


# ---- rate limits ---------------------------------------------------------------------------------


def test_requests_per_minute_and_the_retry_after_it_reports(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    store = TenantStore(redis_client, redis_settings, window_ms=1000)  # a one-second "minute"
    limits = TenantLimits(requests_per_minute=3)
    for _ in range(3):
        store.admit("acme", limits, 10)
    with pytest.raises(RateLimitedError) as refused:
        store.admit("acme", limits, 10)
    error = refused.value
    assert error.kind is LimitKind.REQUESTS and error.retry_after_s is not None
    assert 1 <= error.retry_after_s <= 2 and "3 requests per minute" in str(error)
    store.admit("other", limits, 10)  # tenants do not share windows
    time.sleep(error.retry_after_s)  # Retry-After is enough, with no other traffic
    store.admit("acme", limits, 10)


def test_tokens_per_minute_are_settled_to_actual_usage(store: TenantStore) -> None:
    limits = TenantLimits(tokens_per_minute=100)
    charge = store.admit("acme", limits, 60)  # prompt + max_tokens
    assert charge.tokens == 60 and charge.window is not None
    with pytest.raises(RateLimitedError) as refused:
        store.admit("acme", limits, 60)
    assert refused.value.kind is LimitKind.TOKENS and refused.value.retry_after_s is not None
    store.record_usage("acme", prompt_tokens=4, completion_tokens=6, cost_usd=0.0, charge=charge)
    store.admit("acme", limits, 60)  # 10 + 60 <= 100 now
    with pytest.raises(RateLimitedError) as too_big:
        store.admit("acme", limits, 101)
    assert too_big.value.retry_after_s is None and "lower max_tokens" in str(too_big.value)


def test_admission_is_atomic_across_concurrent_callers(store: TenantStore) -> None:
    limits = TenantLimits(requests_per_minute=10)

    def admit(_: int) -> bool:
        try:
            store.admit("acme", limits, 1)
        except RateLimitedError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(admit, range(40)))
    assert sum(admitted) == 10


def test_a_refused_request_counts_nothing(store: TenantStore) -> None:
    limits = TenantLimits(requests_per_minute=5, tokens_per_minute=100)
    store.admit("acme", limits, 90)
    for _ in range(5):
        with pytest.raises(RateLimitedError):
            store.admit("acme", limits, 50)  # refused for tokens: no request slot is taken
    for _ in range(4):
        store.admit("acme", limits, 1)


# ---- budget and usage ----------------------------------------------------------------------------


def test_monthly_budget_is_enforced_at_admission(store: TenantStore) -> None:
    store.record_usage("acme", 10, 20, 1.5)
    store.record_usage("acme", 5, 5, 0.75, Charge("acme", 0, None))
    usage = store.usage("acme")
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 15, 25)
    assert usage.cost_usd == pytest.approx(2.25)
    assert store.usage("acme", "1999-01").requests == 0
    store.admit("acme", TenantLimits(monthly_budget_usd=3.0), 1)
    with pytest.raises(BudgetExceededError) as over:
        store.admit("acme", TenantLimits(monthly_budget_usd=2.0), 1)
    message = str(over.value)
    assert "$2.2500" in message and "$2.00 monthly budget" in message and current_month() in message
    with pytest.raises(BudgetExceededError):
        store.admit("new", TenantLimits(monthly_budget_usd=0.0), 1)  # a zero budget blocks


def test_limits_round_trip_and_validation(store: TenantStore) -> None:
    assert store.limits("acme").unlimited
    store.set_limits("acme", TenantLimits(requests_per_minute=60, monthly_budget_usd=12.5))
    assert store.limits("acme") == TenantLimits(60, None, 12.5)
    store.set_limits("acme", TenantLimits(tokens_per_minute=1000))
    assert store.limits("acme") == TenantLimits(None, 1000, None)
    assert store.tenants() == ["acme"]
    unlimited = store.admit("free", TenantLimits(), 10**9)
    assert unlimited == Charge("free", 0, None)
    for bad in ({"requests_per_minute": 0}, {"tokens_per_minute": -1}, {"monthly_budget_usd": float("nan")}):
        with pytest.raises(TenantError):
            TenantLimits(**bad)  # type: ignore[arg-type]


# ---- the CLI -------------------------------------------------------------------------------------


def run_cli(*args: str, settings: RedisSettings) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISAGG_REDIS_URL": settings.url, "DISAGG_REDIS_KEY_PREFIX": settings.key_prefix}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
    )


def test_keys_create_as_a_process(keys: ApiKeyStore, redis_settings: RedisSettings) -> None:
    created = run_cli("keys", "create", "--tenant", "acme", settings=redis_settings)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith(KEY_PREFIX) and "\n" not in key  # stdout is the key alone: KEY=$(...)
    key_id = keys.lookup(key).key_id
    assert key_id is not None and key_id in created.stderr and key not in created.stderr


def cli(capsys: pytest.CaptureFixture[str], settings: RedisSettings, *args: str) -> tuple[int, str, str]:
    """The same `disagg` entry point in this process (each new process costs seconds of imports)."""
    code = main([*args, "--redis-url", settings.url])
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_and_tenants_commands(
    keys: ApiKeyStore,
    store: TenantStore,
    redis_settings: RedisSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DISAGG_REDIS_KEY_PREFIX", redis_settings.key_prefix)
    code, key, err = cli(capsys, redis_settings, "keys", "create", "--tenant", "acme")
    key = key.strip()
    key_id = keys.lookup(key).key_id
    assert code == 0 and key_id is not None and key_id in err

    code, listed, _ = cli(capsys, redis_settings, "keys", "list", "--tenant", "acme")
    row = next(line for line in listed.splitlines() if key_id in line)
    assert (
        code == 0 and "acme" in row and "never" not in row and key not in listed
    )  # the lookup above used it
    assert cli(capsys, redis_settings, "keys", "revoke", key_id)[0] == 0
    assert keys.lookup(key).status is LookupStatus.REVOKED

    limits = ("--requests-per-minute", "60", "--monthly-budget-usd", "5")
    assert cli(capsys, redis_settings, "tenants", "set", "acme", *limits)[0] == 0
    assert cli(capsys, redis_settings, "tenants", "set", "acme", "--tokens-per-minute", "900")[0] == 0
    assert store.limits("acme") == TenantLimits(60, 900, 5.0)  # flags not given keep their value
    store.record_usage("acme", 100, 23, 1.25)
    code, table, _ = cli(capsys, redis_settings, "tenants", "list")
    row = next(line for line in table.splitlines() if "acme" in line)
    assert code == 0 and all(cell in row for cell in ("60", "900", "5.00", "1.2500", "123"))

    for args, needle in (
        (("tenants", "set", "acme", "--tokens-per-minute", "0"), "tokens_per_minute must be at least 1"),
        (("keys", "delete", "key_nope"), "no API key with id 'key_nope'"),
    ):
        code, _, err = cli(capsys, redis_settings, *args)
        assert code == 2 and err.startswith("disagg: error: ") and needle in err
        assert len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, RedisSettings(url="redis://127.0.0.1:1/0"), "keys", "list")
    assert code == 2 and err.strip().startswith("disagg: error: cannot use Redis at redis://127.0.0.1:1/0")
