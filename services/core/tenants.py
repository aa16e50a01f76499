"""Tenants in Redis: limits, per-minute rate windows, and month-to-date usage and spend.

Key schema (prefix `disagg:` by default, `RedisSettings.key_prefix`; API keys are in api_keys.py):

    key                              type    TTL             content
    -------------------------------  ------  --------------  -------------------------------------------
    disagg:tenant:{tenant}           hash    none            requests_per_minute, tokens_per_minute,
                                                             monthly_budget_usd (a missing field: no limit)
    disagg:tenants                   set     none            tenants with limits or usage (for `list`)
    disagg:rate:{tenant}             hash    2 windows       window (index, Redis clock), req_cur, req_prev,
                                                             tok_cur, tok_prev
    disagg:usage:{tenant}:{YYYY-MM}  hash    400 days        requests, prompt_tokens, completion_tokens,
                                                             cost_usd (UTC month of the request's end)

Rate limits are sliding-window counters (two fixed one-minute windows, the previous one weighted by
how much of it still overlaps the last 60 s, as if its traffic had been spread evenly over it),
counted on Redis' clock in one Lua script, so every gateway replica shares them and admission is
all-or-nothing. A refusal says when the same request would fit with no other traffic (Retry-After,
rounded up to whole seconds); with the even-spread assumption that can be up to two minutes away
(a full window now is still weighted while the next one runs). Lifecycle of one request:

    admit(tenant, limits, tokens)  ─▶  generation  ─▶  record_usage(tenant, prompt, completion, cost, charge)
      budget: month-to-date spend < budget          settles the tokens window to the actual usage and adds
      requests/min: +1, tokens/min: +tokens         to the month's usage hash (INCRBYFLOAT for cost)

`tokens` at admission is the prompt plus the requested `max_tokens` (the most the request can use,
as OpenAI counts it); `record_usage` gives back what it did not use, in the window it was charged
to (if that window still counts). A tenant without limits costs no Redis call at admission. The
budget is checked at admission against the spend so far: requests already running may still
overshoot it by their own cost. Months are UTC calendar months of the gateway's clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from services.core.errors import DisaggError
from services.core.registry import (
    ID_PATTERN,
    RedisSettings,
    check_client,
    record_errors,
    redis_mapping,
    str_hash,
    str_list,
)

DEFAULT_TENANT = "default"  # every request's tenant when no API keys exist
RATE_WINDOW_MS = 60_000
USAGE_TTL_S = 400 * 86400  # a year of monthly usage stays readable


class TenantError(DisaggError):
    """A tenant name or limit is invalid."""


class LimitKind(StrEnum):
    REQUESTS = "requests"  # requests per minute
    TOKENS = "tokens"  # prompt + max_tokens per minute


class RateLimitedError(DisaggError):
    """The tenant is over a per-minute limit; `retry_after_s` None: this request can never fit."""

    def __init__(
        self, tenant: str, kind: LimitKind, limit: int, retry_after_s: int | None, cost: int
    ) -> None:
        if retry_after_s is None:
            message = (
                f"this request needs {cost} tokens (prompt + max_tokens) but tenant {tenant!r} may use "
                f"{limit} tokens per minute; lower max_tokens or shorten the prompt"
            )
        else:
            message = (
                f"tenant {tenant!r} is over its limit of {limit} {kind.value} per minute; "
                f"retry in {retry_after_s} s"
            )
        super().__init__(message)
        self.tenant = tenant
        self.kind = kind
        self.retry_after_s = retry_after_s


class BudgetExceededError(DisaggError):
    """The tenant's month-to-date spend reached its monthly budget."""

    def __init__(self, tenant: str, budget_usd: float, spend_usd: float, month: str) -> None:
        super().__init__(
            f"tenant {tenant!r} has spent ${spend_usd:.4f} of its ${budget_usd:.2f} monthly budget in "
            f"{month} (UTC); raise it with `disagg tenants set {tenant} --monthly-budget-usd X` or wait "
            "for next month"
        )
        self.tenant = tenant


def check_tenant(name: str) -> str:
    if not ID_PATTERN.fullmatch(name):
        raise TenantError(
            f"tenant {name!r} must match {ID_PATTERN.pattern} (letters, digits, '.', '_', '-'; at most 128)"
        )
    return name


def current_month() -> str:
    return time.strftime("%Y-%m", time.gmtime())


@dataclass(slots=True, frozen=True)
class TenantLimits:
    requests_per_minute: int | None = None  # None: unlimited
    tokens_per_minute: int | None = None  # prompt + max_tokens at admission, settled to actual usage
    monthly_budget_usd: float | None = None  # None: no budget; 0 blocks the tenant

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TenantError(f"{name} must be at least 1 (or unset for no limit), got {value}")
        budget = self.monthly_budget_usd
        if budget is not None and not (math.isfinite(budget) and budget >= 0):
            raise TenantError(f"monthly_budget_usd must be a finite amount >= 0 (or unset), got {budget}")

    @property
    def unlimited(self) -> bool:
        return (self.requests_per_minute, self.tokens_per_minute, self.monthly_budget_usd) == (None,) * 3


@dataclass(slots=True, frozen=True)
class Charge:
    """What admission counted against a tenant; `record_usage` settles it."""

    tenant: str
    tokens: int  # counted in the tokens-per-minute window (0 when the tenant has no token limit)
    window: int | None  # rate window the request went into (Redis clock); None: nothing was counted


@dataclass(slots=True, frozen=True)
class TenantUsage:
    requests: int  # finished requests
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


# KEYS: rate hash, this month's usage hash.  ARGV: window_ms, rpm, tpm, tokens, budget ('' = no limit).
# Returns {'ok', window} | {'budget', spend} | {'requests' or 'tokens', wait_ms or 'never'}.
_ADMIT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local W, tokens = tonumber(ARGV[1]), tonumber(ARGV[4])
if ARGV[5] ~= '' then
  local spend = tonumber(redis.call('HGET', KEYS[2], 'cost_usd') or '0')
  if spend >= tonumber(ARGV[5]) then return {'budget', tostring(spend)} end
end
local win = math.floor(now / W)
local elapsed = now - win * W
local r = redis.call('HMGET', KEYS[1], 'window', 'req_cur', 'req_prev', 'tok_cur', 'tok_prev')
local rc, rp = tonumber(r[2] or '0'), tonumber(r[3] or '0')
local tc, tp = tonumber(r[4] or '0'), tonumber(r[5] or '0')
local stored = tonumber(r[1] or '-2')
if stored == win - 1 then rp, tp, rc, tc = rc, tc, 0, 0
elseif stored ~= win then rp, tp, rc, tc = 0, 0, 0, 0 end
-- ms until prev * (W - elapsed) / W + cur + cost <= limit with no other traffic; -1: never.
local function wait(limit, cur, prev, cost)
  if cost > limit then return -1 end
  if prev * (W - elapsed) / W + cur + cost <= limit then return 0 end
  if cur + cost <= limit then return math.ceil(W - (limit - cur - cost) * W / prev - elapsed) end
  return math.ceil(W - elapsed + math.max(0, W - (limit - cost) * W / cur))
end
local worst, kind = 0, ''
for _, check in ipairs({{'requests', ARGV[2], rc, rp, 1}, {'tokens', ARGV[3], tc, tp, tokens}}) do
  if check[2] ~= '' then
    local w = wait(tonumber(check[2]), check[3], check[4], check[5])
    if w == -1 then return {check[1], 'never'} end
    if w > worst then worst, kind = w, check[1] end
  end
end
if worst > 0 then return {kind, tostring(worst)} end
rc = rc + 1
if ARGV[3] ~= '' then tc = tc + tokens end
redis.call('HSET', KEYS[1], 'window', tostring(win), 'req_cur', rc, 'req_prev', rp,
           'tok_cur', tc, 'tok_prev', tp)
redis.call('PEXPIRE', KEYS[1], 2 * W)
return {'ok', tostring(win)}
"""

# KEYS: rate hash, usage hash, tenants set.  ARGV: window ('' = nothing charged), tokens to give back
# (negative: used more than charged), prompt, completion, cost, tenant, usage TTL s.
_RECORD_LUA = """
if ARGV[1] ~= '' then
  local stored = tonumber(redis.call('HGET', KEYS[1], 'window') or '-2')
  local field = nil
  if stored == tonumber(ARGV[1]) then field = 'tok_cur'
  elseif stored == tonumber(ARGV[1]) + 1 then field = 'tok_prev' end
  if field and redis.call('HINCRBY', KEYS[1], field, -tonumber(ARGV[2])) < 0 then
    redis.call('HSET', KEYS[1], field, 0)
  end
end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[2], 'cost_usd', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('SADD', KEYS[3], ARGV[6])
return 1
"""

_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "monthly_budget_usd")


class TenantStore:
    """Limits, admission and usage of every tenant in one Redis; safe to share between threads."""

    def __init__(self, client: redis.Redis, settings: RedisSettings, window_ms: int = RATE_WINDOW_MS) -> None:
        check_client(client)
        self.client = client
        self.prefix = settings.key_prefix
        self.window_ms = window_ms  # one minute; tests shorten it
        self._admit = client.register_script(_ADMIT_LUA)
        self._record = client.register_script(_RECORD_LUA)

    def _tenant_key(self, tenant: str) -> str:
        return f"{self.prefix}tenant:{tenant}"

    def _rate_key(self, tenant: str) -> str:
        return f"{self.prefix}rate:{tenant}"

    def _usage_key(self, tenant: str, month: str) -> str:
        return f"{self.prefix}usage:{tenant}:{month}"

    @property
    def _tenants_key(self) -> str:
        return f"{self.prefix}tenants"

    # ---- limits ----
    def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        """Replace the tenant's limits (unset fields: no limit)."""
        key = self._tenant_key(check_tenant(tenant))
        fields = {name: repr(v) for name in _LIMIT_FIELDS if (v := getattr(limits, name)) is not None}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if fields:
                pipe.hset(key, mapping=redis_mapping(fields))
            pipe.sadd(self._tenants_key, tenant)
            pipe.execute()

    def limits(self, tenant: str) -> TenantLimits:
        key = self._tenant_key(tenant)
        fields = str_hash(self.client.hgetall(key))
        with record_errors(key):
            return TenantLimits(
                requests_per_minute=_opt_int(fields, "requests_per_minute"),
                tokens_per_minute=_opt_int(fields, "tokens_per_minute"),
                monthly_budget_usd=_opt_float(fields, "monthly_budget_usd"),
            )

    def tenants(self) -> list[str]:
        return sorted(str_list(self.client.smembers(self._tenants_key)))

    # ---- admission and usage ----
    def admit(self, tenant: str, limits: TenantLimits, tokens: int) -> Charge:
        """Count one request of `tokens` (prompt + max_tokens) against the tenant, or raise.

        Raises BudgetExceededError or RateLimitedError; nothing is counted then.
        """
        if limits.unlimited:
            return Charge(tenant, 0, None)
        month = current_month()
        rpm, tpm, budget = limits.requests_per_minute, limits.tokens_per_minute, limits.monthly_budget_usd
        args = [str(self.window_ms), _arg(rpm), _arg(tpm), str(tokens), _arg(budget)]
        reply = self._admit(keys=[self._rate_key(tenant), self._usage_key(tenant, month)], args=args)
        match reply:
            case ["ok", window]:
                return Charge(tenant, tokens if limits.tokens_per_minute else 0, int(window))
            case ["budget", spend]:
                raise BudgetExceededError(tenant, limits.monthly_budget_usd or 0.0, float(spend), month)
            case [("requests" | "tokens") as name, wait_ms]:
                kind = LimitKind(name)
                limit, cost = (rpm, 1) if kind is LimitKind.REQUESTS else (tpm, tokens)
                retry = None if wait_ms == "never" else max(1, math.ceil(int(wait_ms) / 1000))
                raise RateLimitedError(tenant, kind, limit or 0, retry, cost)
        raise RuntimeError(f"unexpected reply from the admission script: {reply!r}")

    def record_usage(
        self,
        tenant: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        charge: Charge | None = None,
    ) -> None:
        """Add one finished request to the tenant's monthly usage; settle its admission charge."""
        unused = charge.tokens - (prompt_tokens + completion_tokens) if charge and charge.tokens else 0
        window = "" if charge is None or charge.window is None or not charge.tokens else str(charge.window)
        keys = [self._rate_key(tenant), self._usage_key(tenant, current_month()), self._tenants_key]
        args = [window, str(unused), str(prompt_tokens), str(completion_tokens), repr(float(cost_usd))]
        self._record(keys=keys, args=[*args, tenant, str(USAGE_TTL_S)])

    def usage(self, tenant: str, month: str | None = None) -> TenantUsage:
        """Usage of `tenant` in `month` ("YYYY-MM", UTC; default: this month)."""
        key = self._usage_key(tenant, month or current_month())
        fields = str_hash(self.client.hgetall(key))
        with record_errors(key):
            return TenantUsage(
                requests=int(fields.get("requests", 0)),
                prompt_tokens=int(fields.get("prompt_tokens", 0)),
                completion_tokens=int(fields.get("completion_tokens", 0)),
                cost_usd=float(fields.get("cost_usd", 0.0)),
            )


def _arg(value: float | None) -> str:
    return "" if value is None else repr(value)


def _opt_int(fields: dict[str, str], name: str) -> int | None:
    raw = fields.get(name)
    return None if not raw else int(raw)


def _opt_float(fields: dict[str, str], name: str) -> float | None:
    raw = fields.get(name)
    return None if not raw else float(raw)
