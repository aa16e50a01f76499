"""Who is calling, and may they: API key -> tenant, the tenant's limits at admission, usage at the end.

    tenancy = Tenancy(ApiKeyStore(...), TenantStore(...), cache_s=1.0, bootstrap_keys=[...])
    tenancy.bootstrap()                                    # at start: import the keys file (idempotent)
    tenant = await tenancy.authenticate(authorization)     # the FastAPI dependency `authenticate` calls it
    charge = await tenancy.admit(tenant, prompt + max_tokens)     # 429 / 402 here, before any KV is held
    ...generation...
    tenancy.finish(charge, tally)                          # once per admitted request (off the event loop)

Authentication: while Redis holds no API key (and no keys file is configured) every request is tenant
`default` and any `Authorization` header is ignored (OpenAI clients always send one). Once a key
exists (revoked keys count: revoking the last key locks the gateway rather than opening it), the
completion routes and /v1/models need `Authorization: Bearer <key>`; /health and /metrics never do.
The gateway caches "do keys exist", each valid key's tenant and each tenant's limits for `cache_s`
(1 s by default), so the hot path costs no Redis round trip for authentication: a new first key, a
revoked key or a changed limit takes effect within `cache_s` on every gateway replica. Unknown and
revoked keys are not cached (each costs one lookup), so the cache only ever holds real keys. A
tenant without limits costs no Redis call at admission either.

Redis unreachable: fail closed. Anything not answered from a fresh cache entry gets a 503
`auth_unavailable` naming the Redis; nothing is served as `default` because Redis cannot say whether
keys exist. Usage that cannot be recorded is logged and lost (the request itself already finished).

A keys file (`DISAGG_GATEWAY_API_KEYS_FILE`, one `TENANT:KEY` per line, `#` comments) makes the
gateway authenticated even before Redis holds any key, and its keys are imported again whenever Redis
holds no key at all (a Redis restarted without persistence). Keys are never logged: errors name a
key by its id (`key_` + 12 hex digits of its SHA-256) or by a file's line number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import redis
from fastapi import Request

from services.core.api_keys import IMPORTED_KEY_PATTERN, ApiKeyStore, LookupStatus, hash_key
from services.core.errors import BackendUnavailableError, DisaggError
from services.core.registry import ID_PATTERN
from services.core.tenants import DEFAULT_TENANT, Charge, TenantLimits, TenantStore
from services.gateway.render import Tally

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CACHED = 4096  # keys (and tenants) held in each cache; more are dropped, not refused
MAX_KEY_CHARS = 512  # a longer Authorization value is not a key of ours: refuse it unhashed


class InvalidApiKeyError(DisaggError):
    """No, a malformed, an unknown or a revoked API key (401)."""


class AuthUnavailableError(BackendUnavailableError):
    """Redis could not be asked about keys or limits; authentication fails closed (503)."""


def request_cost_usd(tally: Tally) -> float:
    """What a finished request adds to its tenant's monthly spend: its `usage.cost_usd` (docs/cost.md).
    A request that ended without its last event has no cost from the pods (0.0 here; the gateway's
    metrics still count its gateway share)."""
    return tally.cost.total_usd if tally.cost is not None else 0.0


class _TtlCache(Generic[T]):
    """A small dict whose entries expire `ttl_s` after they were put."""

    def __init__(self, ttl_s: float, max_entries: int = MAX_CACHED) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, T]] = {}

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key: str, value: T) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[key] = (now + self.ttl_s, value)


class Tenancy:
    """Authentication, admission against tenant limits and usage recording for one gateway."""

    def __init__(
        self,
        keys: ApiKeyStore | None,
        tenants: TenantStore | None,
        *,
        cache_s: float = 1.0,
        bootstrap_keys: list[tuple[str, str]] | None = None,
        redis_url: str = "",
    ) -> None:
        self.keys = keys  # None: no Redis, single tenant `default`
        self.tenants = tenants
        self.redis_url = redis_url  # for error messages
        self._bootstrap = bootstrap_keys or []  # (tenant, key) from the keys file
        self._keys_exist = _TtlCache[bool](cache_s)
        self._key_tenants = _TtlCache[str](cache_s)  # sha256(key) -> tenant
        self._limits = _TtlCache[TenantLimits](cache_s)
        self._recording: set[asyncio.Future[None]] = set()

    @classmethod
    def single_tenant(cls) -> Tenancy:
        """No Redis: every request is tenant `default`, with no limits and no recorded usage."""
        return cls(None, None)

    def close(self) -> None:
        if self.keys is not None:
            self.keys.client.close()

    # ---- start ----
    def bootstrap(self) -> None:
        """Import the keys file into Redis; a failure is logged and retried on the next key check."""
        if not self._bootstrap or self.keys is None:
            return
        try:
            outcomes = [self.keys.import_key(tenant, key) for tenant, key in self._bootstrap]
        except redis.RedisError as exc:
            log.warning("could not import the API keys file into Redis (%s); retrying on demand", exc)
            return
        counts = {o: outcomes.count(o) for o in ("created", "exists", "revoked")}
        log.info("API keys file: %(created)d imported, %(exists)d present, %(revoked)d revoked", counts)

    # ---- per request ----
    async def authenticate(self, authorization: str | None) -> str:
        """The caller's tenant; raises InvalidApiKeyError (401) or AuthUnavailableError (503)."""
        if self.keys is None or not await self._keys_required(self.keys):
            return DEFAULT_TENANT
        key = _bearer_key(authorization)
        key_hash = hash_key(key)
        if (tenant := self._key_tenants.get(key_hash)) is not None:
            return tenant
        found = await self._ask(self.keys.lookup, key, what="look up the API key")
        if found.status is LookupStatus.VALID and found.tenant is not None:
            self._key_tenants.put(key_hash, found.tenant)
            return found.tenant
        if found.status is LookupStatus.REVOKED:
            raise InvalidApiKeyError(f"API key {found.key_id} was revoked; ask for a new key")
        raise InvalidApiKeyError(
            "Incorrect API key provided; send a key made by `disagg keys create --tenant T` as "
            "`Authorization: Bearer <key>`"
        )

    async def admit(self, tenant: str, tokens: int) -> Charge:
        """Count a request of `tokens` (prompt + max_tokens) against its tenant's limits, or raise."""
        if self.tenants is None:
            return Charge(tenant, 0, None)
        limits = self._limits.get(tenant)
        if limits is None:
            limits = await self._ask(self.tenants.limits, tenant, what="read the tenant's limits")
            self._limits.put(tenant, limits)
        if limits.unlimited:
            return Charge(tenant, 0, None)
        return await self._ask(self.tenants.admit, tenant, limits, tokens, what="check the tenant's limits")

    def finish(self, charge: Charge, tally: Tally) -> None:
        """Record the finished request's usage and settle its charge, on a worker thread."""
        if self.tenants is None:
            return
        # A request that ended before its first token (no room, a failed pod) used no prompt compute.
        started = tally.completion_tokens > 0 or tally.finish_reason is not None
        prompt = tally.prompt_tokens if started else 0
        args = (self.tenants, charge, prompt, tally.completion_tokens, request_cost_usd(tally))
        future = asyncio.get_running_loop().run_in_executor(None, self._record, *args)
        self._recording.add(future)
        future.add_done_callback(self._recording.discard)

    async def flush(self) -> None:
        """Wait until the usage of finished requests is recorded (tests, shutdown)."""
        if self._recording:
            await asyncio.gather(*list(self._recording))

    # ---- helpers ----
    async def _keys_required(self, keys: ApiKeyStore) -> bool:
        cached = self._keys_exist.get("any")
        if cached is None:
            cached = await self._ask(self._check_keys, keys, what="check whether API keys exist")
            self._keys_exist.put("any", cached)
        return cached

    def _check_keys(self, keys: ApiKeyStore) -> bool:
        if keys.any_keys():
            return True
        if self._bootstrap:  # a keys file is configured but Redis holds no key: (re)import it
            self.bootstrap()
            return True
        return False

    async def _ask(self, call: Callable[..., T], *args: object, what: str) -> T:
        try:
            return await asyncio.to_thread(call, *args)
        except redis.RedisError as exc:
            raise AuthUnavailableError(
                f"cannot reach Redis at {self.redis_url or 'its configured URL'} to {what} ({exc}); "
                "requests are refused until it answers again (authentication fails closed)"
            ) from exc

    def _record(self, store: TenantStore, charge: Charge, prompt: int, completion: int, cost: float) -> None:
        try:
            store.record_usage(charge.tenant, prompt, completion, cost, charge)
        except redis.RedisError as exc:
            log.warning("tenant %s: usage of a finished request was not recorded: %s", charge.tenant, exc)


def _bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise InvalidApiKeyError(
            "You didn't provide an API key. Send `Authorization: Bearer <key>` (keys are made with "
            "`disagg keys create --tenant T`)"
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_CHARS:
        raise InvalidApiKeyError("the Authorization header must be `Bearer <key>`")
    return key


UNAUTHENTICATED = "-"  # the tenant label of requests turned away before a tenant is known (no tenant id
# can be "-": check_tenant)


async def authenticate(request: Request) -> str:
    """FastAPI dependency of the authenticated routes: sets `request.state.tenant` (a str). A request
    turned away here (401, or 503 when Redis cannot say) is counted under tenant "-"."""
    gateway = request.app.state.gateway
    try:
        tenant: str = await gateway.tenancy.authenticate(request.headers.get("authorization"))
    except DisaggError as exc:
        meter = gateway.metering.begin(UNAUTHENTICATED)
        meter.fail(exc)
        meter.finish()
        raise
    request.state.tenant = tenant
    return tenant


def read_keys_file(path: Path) -> list[tuple[str, str]]:
    """(tenant, key) pairs of a keys file: `TENANT:KEY` per line, blank lines and `#` comments skipped.

    Errors name the file and line, never the line's content (it may hold a key).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DisaggError(f"cannot read the API keys file {path}: {exc.strerror}") from exc
    pairs = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = (part.strip() for part in line.partition(":"))
        problem = (
            "expected TENANT:KEY"
            if not sep
            else f"the tenant before ':' must match {ID_PATTERN.pattern}"
            if not ID_PATTERN.fullmatch(tenant)
            else "the key after ':' must be 16-256 printable characters without spaces"
            if not IMPORTED_KEY_PATTERN.fullmatch(key)
            else None
        )
        if problem:
            raise DisaggError(f"API keys file {path}, line {number}: {problem}")
        pairs.append((tenant, key))
    return pairs
