"""Atomic KV-block reservations on attention pods, in Redis (Lua).

An attention pod publishes `total_blocks` in its pod hash (registry.py); everything else is here:

    disagg:kv:{pod}:reserved   string  sum of the blocks held on the pod
    disagg:kv:{pod}:held       hash    request -> blocks held for it on the pod
    disagg:kv:{pod}:leases     zset    request -> lease expiry (ms, Redis server clock)
    disagg:resv:{request}      hash    pod -> blocks, TTL = the lease: what `release` undoes

    free(pod) = total_blocks − reserved

Lifecycle of one request's reservation:

    reserve(request, {pod: blocks, ...}) ─▶ refresh(request)* ─▶ release(request)
                 all-or-nothing                 keep the lease       idempotent

Every script first purges the expired leases of the pods it touches (their blocks return to the
pool), so a gateway that crashes mid-request leaks its blocks for one lease (`reservation_ttl_s`) at
most. The `kv:` keys of a pod expire one second after its last lease, so dead pods leave nothing.
Lease times come from Redis' own clock (TIME), never from the clients'. Counts never go negative:
the scripts only subtract what `held` records. Single Redis instance (keys span hash slots).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import redis

from services.core.errors import DisaggError
from services.core.registry import (
    Keys,
    RedisSettings,
    check_client,
    check_id,
    record_errors,
    str_hash,
    str_list,
)

# Shared prelude: `now` in ms from the server clock, and the two per-pod helpers.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function purge(reserved, held, leases)
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', '(' .. now)) do
    local blocks = tonumber(redis.call('HGET', held, rid) or '0')
    redis.call('HDEL', held, rid)
    redis.call('ZREM', leases, rid)
    if redis.call('DECRBY', reserved, blocks) < 0 then redis.call('SET', reserved, 0) end
  end
end
local function touch(reserved, held, leases)
  local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
  if #last == 0 then
    redis.call('DEL', reserved, held, leases)
  else
    local at = tonumber(last[2]) + 1000
    redis.call('PEXPIREAT', reserved, at)
    redis.call('PEXPIREAT', held, at)
    redis.call('PEXPIREAT', leases, at)
  end
end
"""

# KEYS: resv, then per pod: pod hash, reserved, held, leases.  ARGV: request, lease_ms, then per pod:
# pod id, blocks.  Returns {'ok'} | {'exists'} | {'unknown', pod} | {'short', pod, free}.
_RESERVE_LUA = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local n = (#KEYS - 1) / 4
for i = 1, n do
  local k = 1 + (i - 1) * 4
  purge(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
  local total = redis.call('HGET', KEYS[k + 1], 'total_blocks')
  if not total then return {'unknown', ARGV[1 + 2 * i]} end
  local free = tonumber(total) - tonumber(redis.call('GET', KEYS[k + 2]) or '0')
  if tonumber(ARGV[2 + 2 * i]) > free then return {'short', ARGV[1 + 2 * i], tostring(math.max(free, 0))} end
end
local expiry = now + tonumber(ARGV[2])
for i = 1, n do
  local k = 1 + (i - 1) * 4
  local pod, blocks = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  redis.call('INCRBY', KEYS[k + 2], blocks)
  redis.call('HSET', KEYS[k + 3], ARGV[1], blocks)
  redis.call('ZADD', KEYS[k + 4], expiry, ARGV[1])
  touch(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
  redis.call('HSET', KEYS[1], pod, blocks)
end
redis.call('PEXPIREAT', KEYS[1], expiry)
return {'ok'}
"""
)

# KEYS: resv, then per pod: reserved, held, leases.  ARGV: request.  Returns the blocks freed.
_RELEASE_LUA = (
    _PRELUDE
    + """
local freed = 0
for k = 2, #KEYS, 3 do
  purge(KEYS[k], KEYS[k + 1], KEYS[k + 2])
  local blocks = redis.call('HGET', KEYS[k + 1], ARGV[1])
  if blocks then
    redis.call('HDEL', KEYS[k + 1], ARGV[1])
    redis.call('ZREM', KEYS[k + 2], ARGV[1])
    if redis.call('DECRBY', KEYS[k], blocks) < 0 then redis.call('SET', KEYS[k], 0) end
    freed = freed + tonumber(blocks)
  end
  touch(KEYS[k], KEYS[k + 1], KEYS[k + 2])
end
redis.call('DEL', KEYS[1])
return freed
"""
)

# KEYS: resv, then per pod: reserved, held, leases.  ARGV: request, lease_ms.  Returns 1 if alive.
_REFRESH_LUA = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local expiry = now + tonumber(ARGV[2])
for k = 2, #KEYS, 3 do
  if not redis.call('ZSCORE', KEYS[k + 2], ARGV[1]) then return 0 end
  redis.call('ZADD', KEYS[k + 2], 'XX', expiry, ARGV[1])
  touch(KEYS[k], KEYS[k + 1], KEYS[k + 2])
end
redis.call('PEXPIREAT', KEYS[1], expiry)
return 1
"""
)

# KEYS: per pod: pod hash, reserved, held, leases.  Returns per pod {total or '', reserved}.
_USAGE_LUA = (
    _PRELUDE
    + """
local out = {}
for k = 1, #KEYS, 4 do
  purge(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3])
  local total = redis.call('HGET', KEYS[k], 'total_blocks') or ''
  table.insert(out, {total, redis.call('GET', KEYS[k + 1]) or '0'})
end
return out
"""
)


class ReservationExistsError(DisaggError):
    """`reserve` was called twice for one request; release the first reservation before reserving again."""


class RefusalReason(StrEnum):
    INSUFFICIENT = "insufficient"  # the pod has fewer free blocks than asked for
    NOT_REGISTERED = "not_registered"  # no live attention pod record (dead, or never registered)


@dataclass(slots=True, frozen=True)
class Granted:
    blocks: Mapping[str, int]  # pod id -> blocks now held for the request


@dataclass(slots=True, frozen=True)
class Refused:
    """Nothing was reserved, on any pod. The caller re-reads usage and re-plans, or answers 503."""

    pod_id: str  # the first pod that could not grant
    reason: RefusalReason
    free: int  # the pod's free blocks at that moment (0 when not registered)


ReserveResult = Granted | Refused


@dataclass(slots=True, frozen=True)
class KvUsage:
    pod_id: str
    total: int | None  # None: the pod has no live record (its reservations still count until released)
    reserved: int

    @property
    def free(self) -> int:
        return max(0, (self.total or 0) - self.reserved)


class KvReservations:
    """Reserve, refresh and release KV blocks of a request across attention pods, atomically."""

    def __init__(self, client: redis.Redis, settings: RedisSettings, lease_s: float | None = None) -> None:
        check_client(client)
        self.client = client
        self.keys = Keys(settings.key_prefix)
        self.lease_ms = max(1, int((lease_s if lease_s is not None else settings.reservation_ttl_s) * 1000))
        self._reserve = client.register_script(_RESERVE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._refresh = client.register_script(_REFRESH_LUA)
        self._usage = client.register_script(_USAGE_LUA)

    def reserve(self, request_id: str, blocks: Mapping[str, int]) -> ReserveResult:
        """Hold `blocks[pod]` blocks on every pod for the request, or nothing at all."""
        check_id("request_id", request_id)
        if not blocks:
            raise ValueError(f"request {request_id}: reserve needs at least one pod")
        keys, args = [self.keys.reservation(request_id)], [request_id, str(self.lease_ms)]
        for pod_id, count in blocks.items():
            check_id("pod_id", pod_id)
            if count < 1:
                raise ValueError(
                    f"request {request_id}: blocks on pod {pod_id} must be positive, got {count}"
                )
            keys += [self.keys.pod(pod_id), *self.keys.kv(pod_id)]
            args += [pod_id, str(count)]
        reply = self._reserve(keys=keys, args=args)
        match reply:
            case ["ok"]:
                return Granted(blocks=dict(blocks))
            case ["exists"]:
                raise ReservationExistsError(
                    f"request {request_id} already holds a KV reservation; release it first"
                )
            case ["unknown", pod_id]:
                return Refused(pod_id=pod_id, reason=RefusalReason.NOT_REGISTERED, free=0)
            case ["short", pod_id, free]:
                return Refused(pod_id=pod_id, reason=RefusalReason.INSUFFICIENT, free=int(free))
        raise RuntimeError(f"unexpected reply from the reserve script: {reply!r}")

    def release(self, request_id: str) -> int:
        """Return the request's blocks to their pods. Idempotent: a second call frees 0 blocks."""
        resv_key = self.keys.reservation(check_id("request_id", request_id))
        pod_ids = str_list(self.client.hkeys(resv_key))
        keys = [resv_key]
        for pod_id in pod_ids:
            keys += self.keys.kv(pod_id)
        return int(self._release(keys=keys, args=[request_id]))

    def refresh(self, request_id: str) -> bool:
        """Extend the lease by `lease_s`. False when it already expired: its blocks may be reused."""
        resv_key = self.keys.reservation(check_id("request_id", request_id))
        keys = [resv_key]
        for pod_id in str_list(self.client.hkeys(resv_key)):
            keys += self.keys.kv(pod_id)
        return bool(self._refresh(keys=keys, args=[request_id, str(self.lease_ms)]))

    def held(self, request_id: str) -> dict[str, int]:
        """Blocks held for the request per pod; empty when it holds none."""
        resv_key = self.keys.reservation(request_id)
        raw = str_hash(self.client.hgetall(resv_key))
        with record_errors(resv_key):
            return {pod_id: int(count) for pod_id, count in raw.items()}

    def usage(self, pod_ids: list[str]) -> list[KvUsage]:
        """Total and reserved blocks of each pod, after purging expired leases; in the given order."""
        keys = []
        for pod_id in pod_ids:
            keys += [self.keys.pod(pod_id), *self.keys.kv(pod_id)]
        rows = self._usage(keys=keys, args=[]) if keys else []
        out = []
        for pod_id, (total, reserved) in zip(pod_ids, rows, strict=True):
            with record_errors(self.keys.pod(pod_id)):
                out.append(KvUsage(pod_id, int(total) if total else None, int(reserved)))
        return out
