"""API keys in Redis, stored only as SHA-256 hashes: create, import (bootstrap), look up, list, revoke.

Key schema (prefix `disagg:` by default, `RedisSettings.key_prefix`; see also registry.py, tenants.py):

    key                            type    TTL    content
    -----------------------------  ------  -----  --------------------------------------------------
    disagg:apikey:{key_id}         hash    none   key_id, tenant, sha256, created_at, last_used_at,
                                                  revoked_at ("" while active); unix seconds
    disagg:apikey-hash:{sha256}    string  none   key_id: the lookup index from a presented key
    disagg:apikeys                 set     none   every key id not deleted; SCARD > 0 = "keys exist"

A key is `sk-disagg-` + 43 URL-safe characters (256 random bits from `secrets`). Redis never sees the
key itself: only `sha256(key)` (hex) and a key id derived from it (`key_` + its first 12 hex digits),
so the same key always gets the same id and importing a key file twice changes nothing. Plain SHA-256
is enough for random tokens of this entropy (nothing to brute-force); a pepper would only make every
key unusable when it is lost or rotated. The clear key is returned once, by `create`, and never logged.

Lifecycle of a key:

    create(tenant) ─▶ lookup(key)* (updates last_used_at) ─▶ revoke(key_id) ─▶ delete(key_id)
                                                             record kept, marked   record gone

"Keys exist" (the gateway then requires one) counts revoked keys too: revoking the last key locks
the gateway instead of opening it to everyone. Only deleting every (revoked) key returns it to the
keyless single-tenant mode. `lookup`, `revoke` and `delete` are Lua scripts, so a lookup racing a
revoke sees the key either active or revoked, never half of it. Revoked keys keep their hash index
so the gateway can say "revoked" rather than "unknown"; `import_key` never revives a revoked key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from services.core.errors import DisaggError
from services.core.registry import RedisSettings, check_client, record_errors, str_hash, str_list
from services.core.tenants import check_tenant

KEY_PREFIX = "sk-disagg-"
KEY_ID_HEX_DIGITS = 12  # 48 bits of the hash: unique in practice, and tells nothing about the key
# What an imported key (a bootstrap file) may look like: printable, no spaces, not trivially short.
IMPORTED_KEY_PATTERN = re.compile(r"[!-~]{16,256}")


class ApiKeyError(DisaggError):
    """An API-key operation the user asked for cannot be done (unknown key id, malformed key, ...)."""


@dataclass(slots=True, frozen=True)
class ApiKeyRecord:
    """What Redis holds about one key (never the key itself)."""

    key_id: str  # "key_" + the first 12 hex digits of sha256(key)
    tenant: str
    created_at: float  # unix seconds
    last_used_at: float | None  # unix seconds of the last gateway lookup (per cache refresh), None: never
    revoked_at: float | None  # unix seconds; None while active

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class LookupStatus(StrEnum):
    VALID = "valid"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(slots=True, frozen=True)
class KeyLookup:
    status: LookupStatus
    key_id: str | None  # None when unknown
    tenant: str | None  # the key's tenant when valid


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key: the only form in which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key_hash: str) -> str:
    return f"key_{key_hash[:KEY_ID_HEX_DIGITS]}"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# KEYS: hash index.  ARGV: key prefix, now.  Returns {status, key_id, tenant}.
_LOOKUP_LUA = """
local key_id = redis.call('GET', KEYS[1])
if not key_id then return {'unknown', '', ''} end
local record = ARGV[1] .. 'apikey:' .. key_id
local fields = redis.call('HMGET', record, 'tenant', 'revoked_at')
if not fields[1] then return {'unknown', '', ''} end
if fields[2] and fields[2] ~= '' then return {'revoked', key_id, fields[1]} end
redis.call('HSET', record, 'last_used_at', ARGV[2])
return {'valid', key_id, fields[1]}
"""

# KEYS: record.  ARGV: now.  Returns 'revoked', 'already' or 'unknown'.
_REVOKE_LUA = """
local revoked = redis.call('HGET', KEYS[1], 'revoked_at')
if not revoked then return 'unknown' end
if revoked ~= '' then return 'already' end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1])
return 'revoked'
"""

# KEYS: record, all set.  ARGV: prefix, key_id.  Returns 'deleted', 'active' or 'unknown'.
_DELETE_LUA = """
local fields = redis.call('HMGET', KEYS[1], 'revoked_at', 'sha256')
if not fields[1] then return 'unknown' end
if fields[1] == '' then return 'active' end
redis.call('DEL', KEYS[1], ARGV[1] .. 'apikey-hash:' .. fields[2])
redis.call('SREM', KEYS[2], ARGV[2])
return 'deleted'
"""

# KEYS: record, hash index, all set.  ARGV: key_id, tenant, sha256, now.
# Returns 'created', 'exists' (same key already there, its tenant unchanged) or 'revoked'.
_IMPORT_LUA = """
local revoked = redis.call('HGET', KEYS[1], 'revoked_at')
if revoked then
  if revoked ~= '' then return 'revoked' end
  return 'exists'
end
redis.call('HSET', KEYS[1], 'key_id', ARGV[1], 'tenant', ARGV[2], 'sha256', ARGV[3],
           'created_at', ARGV[4], 'last_used_at', '', 'revoked_at', '')
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 'created'
"""


class ApiKeyStore:
    """API keys of every tenant in one Redis; safe to share between threads (redis-py pools)."""

    def __init__(self, client: redis.Redis, settings: RedisSettings) -> None:
        check_client(client)
        self.client = client
        self.prefix = settings.key_prefix
        self._lookup = client.register_script(_LOOKUP_LUA)
        self._revoke = client.register_script(_REVOKE_LUA)
        self._delete = client.register_script(_DELETE_LUA)
        self._import = client.register_script(_IMPORT_LUA)

    # ---- key names ----
    def _record(self, key_id: str) -> str:
        return f"{self.prefix}apikey:{key_id}"

    def _index(self, key_hash: str) -> str:
        return f"{self.prefix}apikey-hash:{key_hash}"

    @property
    def _all(self) -> str:
        return f"{self.prefix}apikeys"

    # ---- operations ----
    def create(self, tenant: str) -> tuple[str, ApiKeyRecord]:
        """A new key for `tenant`: (the clear key, to show once; its record)."""
        key = new_key()
        if self.import_key(tenant, key) != "created":  # 2^-256 odds; refuse rather than share a record
            raise ApiKeyError("a freshly generated key collided with an existing one; run the command again")
        record = self.get(key_id_of(hash_key(key)))
        if record is None:
            raise ApiKeyError("the new key vanished from Redis right after it was written; check the server")
        return key, record

    def import_key(self, tenant: str, key: str) -> str:
        """Store a key chosen elsewhere (a bootstrap file). Idempotent; never revives a revoked key.

        Returns "created", "exists" or "revoked". A key already stored for another tenant keeps it.
        """
        check_tenant(tenant)
        if not IMPORTED_KEY_PATTERN.fullmatch(key):
            raise ApiKeyError(
                "an API key must be 16-256 printable characters without spaces "
                "(`disagg keys create` makes good ones)"
            )
        key_hash = hash_key(key)
        key_id = key_id_of(key_hash)
        keys = [self._record(key_id), self._index(key_hash), self._all]
        return str(self._import(keys=keys, args=[key_id, tenant, key_hash, repr(time.time())]))

    def lookup(self, key: str) -> KeyLookup:
        """What a presented key is; a valid key's `last_used_at` is set to now."""
        status, key_id, tenant = self._lookup(
            keys=[self._index(hash_key(key))], args=[self.prefix, repr(time.time())]
        )
        return KeyLookup(LookupStatus(status), key_id or None, tenant or None)

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id. False if it was already revoked; ApiKeyError if there is no such key."""
        reply = self._revoke(keys=[self._record(key_id)], args=[repr(time.time())])
        if reply == "unknown":
            raise ApiKeyError(f"no API key with id {key_id!r}; `disagg keys list` shows the ids")
        return reply == "revoked"

    def delete(self, key_id: str) -> None:
        """Forget a revoked key entirely (an active key must be revoked first)."""
        reply = self._delete(keys=[self._record(key_id), self._all], args=[self.prefix, key_id])
        if reply == "unknown":
            raise ApiKeyError(f"no API key with id {key_id!r}; `disagg keys list` shows the ids")
        if reply == "active":
            raise ApiKeyError(f"API key {key_id} is active; revoke it first (`disagg keys revoke {key_id}`)")

    def any_keys(self) -> bool:
        """Whether any key exists, revoked ones included: the gateway then requires a valid key."""
        return int(self.client.scard(self._all)) > 0

    def get(self, key_id: str) -> ApiKeyRecord | None:
        key = self._record(key_id)
        fields = str_hash(self.client.hgetall(key))
        return _parse_record(key, fields) if fields else None

    def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        """Every key (revoked ones too), oldest first; only `tenant`'s when given."""
        key_ids = sorted(str_list(self.client.smembers(self._all)))
        with self.client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(self._record(key_id))
            rows = [str_hash(raw) for raw in pipe.execute()]
        records = [
            _parse_record(self._record(key_id), fields)
            for key_id, fields in zip(key_ids, rows, strict=True)
            if fields
        ]
        records = [r for r in records if tenant is None or r.tenant == tenant]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))


def _parse_record(key: str, fields: dict[str, str]) -> ApiKeyRecord:
    with record_errors(key):
        return ApiKeyRecord(
            key_id=fields["key_id"],
            tenant=fields["tenant"],
            created_at=float(fields["created_at"]),
            last_used_at=float(fields["last_used_at"]) if fields.get("last_used_at") else None,
            revoked_at=float(fields["revoked_at"]) if fields.get("revoked_at") else None,
        )
