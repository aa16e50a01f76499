"""Request records in Redis: where each in-flight request runs and how far it got, for recovery.

    disagg:req:{request}  hash, TTL request_ttl_s (refreshed on every write)
      request_id  tenant  model  state  created_at  updated_at  placement (JSON list of entries)

Lifecycle (the gateway writes, anyone may read):

    put(QUEUED) ─▶ update_state(PREFILLING) ─▶ update_state(DECODING) ─▶ FINISHED | FAILED ─▶ delete
                                  any non-terminal state may go to FAILED

Transitions are checked inside Redis (Lua), so two writers cannot move a record backwards, and an
update never resurrects a deleted or expired record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import redis

from services.core.errors import DisaggError
from services.core.placement import Placement, PlacementEntry, PlacementError
from services.core.registry import (
    Keys,
    RedisSettings,
    check_client,
    check_id,
    record_errors,
    redis_mapping,
    str_hash,
)


class RequestState(StrEnum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"


_ALLOWED_FROM: dict[RequestState, tuple[RequestState, ...]] = {
    RequestState.QUEUED: (),
    # A preempted request is recomputed from its prompt: decoding may go back through prefill.
    RequestState.PREFILLING: (RequestState.QUEUED, RequestState.DECODING),
    RequestState.DECODING: (RequestState.PREFILLING,),
    RequestState.FINISHED: (RequestState.DECODING,),
    RequestState.FAILED: (RequestState.QUEUED, RequestState.PREFILLING, RequestState.DECODING),
}


class RequestNotFoundError(DisaggError):
    """No record for this request id: it was never stored, was deleted, or expired (request_ttl_s)."""


class InvalidTransitionError(DisaggError):
    """A state change the lifecycle forbids (e.g. leaving FINISHED)."""


@dataclass(slots=True, frozen=True)
class RequestRecord:
    request_id: str
    tenant: str
    model: str
    placement: Placement
    state: RequestState
    created_at: float  # unix seconds
    updated_at: float  # unix seconds of the last state change

    def __post_init__(self) -> None:
        check_id("request_id", self.request_id)
        if not self.tenant or not self.model:
            raise ValueError(f"request {self.request_id}: tenant and model must be non-empty")

    def to_fields(self) -> dict[str, str]:
        return {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "model": self.model,
            "placement": placement_to_json(self.placement),
            "state": self.state.value,
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
        }

    @classmethod
    def from_fields(cls, key: str, fields: Mapping[str, str]) -> RequestRecord:
        with record_errors(key):
            return cls(
                request_id=fields["request_id"],
                tenant=fields["tenant"],
                model=fields["model"],
                placement=placement_from_json(fields["placement"]),
                state=RequestState(fields["state"]),
                created_at=float(fields["created_at"]),
                updated_at=float(fields["updated_at"]),
            )


def placement_to_json(placement: Placement) -> str:
    return json.dumps(
        [
            {"address": e.address, "kv_head_start": e.kv_head_start, "kv_head_count": e.kv_head_count}
            for e in placement.entries
        ]
    )


def placement_from_json(text: str) -> Placement:
    """Parse and validate; raises ValueError/TypeError/KeyError on anything malformed."""
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError(f"placement must be a JSON list, got {type(items).__name__}")
    entries = []
    for item in items:
        address, start, count = item["address"], item["kv_head_start"], item["kv_head_count"]
        if not isinstance(address, str) or type(start) is not int or type(count) is not int:
            raise TypeError(f"placement entry has fields of the wrong type: {item!r}")
        entries.append(PlacementEntry(address, start, count))
    try:
        return Placement(tuple(entries))
    except PlacementError as exc:
        raise ValueError(str(exc)) from exc


# KEYS[1]: the record.  ARGV: new state, updated_at, ttl_ms, allowed previous states...
# Returns {'ok'} | {'missing'} | {'refused', current state}.
_UPDATE_LUA = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {'missing'} end
for i = 4, #ARGV do
  if ARGV[i] == current then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {'ok'}
  end
end
return {'refused', current}
"""


class RequestStore:
    """put / get / update_state / delete of `RequestRecord`s."""

    def __init__(self, client: redis.Redis, settings: RedisSettings) -> None:
        check_client(client)
        self.client = client
        self.keys = Keys(settings.key_prefix)
        self._ttl_ms = int(settings.request_ttl_s * 1000)
        self._update = client.register_script(_UPDATE_LUA)

    def put(self, record: RequestRecord) -> None:
        """Store (or overwrite) the whole record with a fresh TTL."""
        key = self.keys.request(check_id("request_id", record.request_id))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=redis_mapping(record.to_fields()))
            pipe.pexpire(key, self._ttl_ms)
            pipe.execute()

    def get(self, request_id: str) -> RequestRecord | None:
        key = self.keys.request(request_id)
        fields = str_hash(self.client.hgetall(key))
        return RequestRecord.from_fields(key, fields) if fields else None

    def update_state(self, request_id: str, state: RequestState, now: float | None = None) -> None:
        """Move the record to `state`, atomically checking the transition; refreshes the TTL."""
        key = self.keys.request(request_id)
        allowed = [s.value for s in _ALLOWED_FROM[state]]
        updated_at = repr(time.time() if now is None else now)
        reply = self._update(keys=[key], args=[state.value, updated_at, self._ttl_ms, *allowed])
        match reply:
            case ["ok"]:
                return
            case ["missing"]:
                raise RequestNotFoundError(
                    f"no record for request {request_id} (never stored, deleted, or expired after "
                    "DISAGG_REDIS_REQUEST_TTL_S); store it with put() first"
                )
            case ["refused", current]:
                raise InvalidTransitionError(
                    f"request {request_id}: cannot go from {current} to {state.value}; "
                    f"allowed from {allowed or 'nothing (use put)'}"
                )
        raise RuntimeError(f"unexpected reply from the update script: {reply!r}")

    def delete(self, request_id: str) -> bool:
        return bool(self.client.delete(self.keys.request(request_id)))


def new_record(request_id: str, tenant: str, model: str, placement: Placement) -> RequestRecord:
    """A QUEUED record stamped now."""
    now = time.time()
    return RequestRecord(request_id, tenant, model, placement, RequestState.QUEUED, now, now)
