"""Live cluster state in Redis: the pod registry, and the key schema every Redis user here shares.

Key schema (prefix `disagg:` by default, `RedisSettings.key_prefix`; ids match `ID_PATTERN`):

    key                           type    TTL                      written by          content
    ----------------------------  ------  -----------------------  ------------------  -----------------------
    disagg:pod:{pod}              hash    pod_ttl_s, per beat      the pod             PodInfo fields + load,
                                                                                       heartbeat_at
    disagg:pods:{role}            set     none (pruned on read)    the pod             pod ids ever registered
    disagg:kv:{pod}:reserved      string  last lease + 1 s         reservations (Lua)  blocks reserved (int)
    disagg:kv:{pod}:held          hash    last lease + 1 s         reservations (Lua)  request -> blocks
    disagg:kv:{pod}:leases        zset    last lease + 1 s         reservations (Lua)  request -> expiry (ms)
    disagg:resv:{request}         hash    reservation_ttl_s        reservations (Lua)  pod -> blocks
    disagg:req:{request}          hash    request_ttl_s            gateway             RequestRecord fields
    disagg:nixl:{pod}             string  pod_ttl_s, per beat      attention pod       NIXL agent metadata

Free KV blocks of an attention pod = `total_blocks` (its pod hash) − `kv:{pod}:reserved`; see
reservations.py for the Lua that keeps the three `kv:` keys and `resv:` consistent, and
request_records.py for `req:`. Values are hash fields of plain strings (no pickling); whatever comes
back is validated and a malformed record raises `CorruptRecordError`.

Lifecycle of a pod here:

    register(info) ─▶ heartbeat(pod, load) every heartbeat_interval_s ─▶ deregister(pod)

A pod that stops heartbeating (crash, SIGKILL, partition) drops out of `live_pods` when its key
expires, within `pod_ttl_s` (3 s by default) of its last beat. `Heartbeater` runs the beats on a
thread, re-registers when the key vanished (Redis restarted or the key expired during a stall), and
keeps retrying with backoff while Redis is unreachable: losing Redis never crashes a pod.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import redis
from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from services.core.errors import DisaggError

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CorruptRecordError(DisaggError):
    """A record read back from Redis is missing fields or holds values of the wrong type."""


class RedisSettings(BaseSettings):
    """How every pod reaches Redis. Environment: DISAGG_REDIS_URL, DISAGG_REDIS_POD_TTL_S, ..."""

    model_config = SettingsConfigDict(env_prefix="DISAGG_REDIS_", frozen=True)

    url: str = "redis://127.0.0.1:6379/0"
    # Kept out of the URL (which pods log) when given on its own, e.g. from a Kubernetes Secret;
    # a password inside the URL wins.
    password: SecretStr | None = None
    key_prefix: str = "disagg:"
    heartbeat_interval_s: float = 1.0
    pod_ttl_s: float = 3.0  # a silent pod leaves routing this long after its last heartbeat
    reservation_ttl_s: float = 30.0  # KV reservations of a crashed gateway free themselves after this
    request_ttl_s: float = 3600.0
    socket_timeout_s: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> RedisSettings:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("DISAGG_REDIS_HEARTBEAT_INTERVAL_S must be > 0")
        if self.pod_ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"DISAGG_REDIS_POD_TTL_S ({self.pod_ttl_s}) must be at least twice "
                f"DISAGG_REDIS_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s}), or one late beat "
                "drops a healthy pod from routing"
            )
        for name in ("reservation_ttl_s", "request_ttl_s", "socket_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DISAGG_REDIS_{name.upper()} must be > 0")
        if not self.key_prefix.endswith(":"):
            raise ValueError(f"DISAGG_REDIS_KEY_PREFIX must end with ':', got {self.key_prefix!r}")
        return self


def connect(settings: RedisSettings) -> redis.Redis:
    """A client that fails fast: one quick retry, short timeouts; callers own backoff."""
    password = settings.password.get_secret_value() if settings.password is not None else None
    return redis.Redis.from_url(
        settings.url,
        password=password,
        decode_responses=True,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        retry=Retry(NoBackoff(), retries=1),
        health_check_interval=10,
    )


def check_client(client: redis.Redis) -> None:
    """Everything here reads strings: refuse a client that returns bytes, naming the fix."""
    if not client.get_connection_kwargs().get("decode_responses"):
        raise ValueError("the Redis client must be created with decode_responses=True (use registry.connect)")


# With decode_responses=True (enforced by check_client) every reply is str; these tell mypy so.
def str_hash(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return cast(dict[str, str], raw)


def str_list(raw: Iterable[bytes | str]) -> list[str]:
    return cast(list[str], list(raw))


def redis_mapping(fields: dict[str, str]) -> Mapping[FieldT, EncodableT]:
    return cast(Mapping[FieldT, EncodableT], fields)


def check_id(kind: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must match {ID_PATTERN.pattern} (letters, digits, '.', '_', '-')")
    return value


@dataclass(slots=True, frozen=True)
class Keys:
    """Key names; one place, so the schema in the module docstring stays true."""

    prefix: str = "disagg:"

    def pod(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}"

    def pods(self, role: Role) -> str:
        return f"{self.prefix}pods:{role.value}"

    def kv(self, pod_id: str) -> tuple[str, str, str]:
        """(reserved counter, held hash, leases zset) of an attention pod."""
        base = f"{self.prefix}kv:{pod_id}"
        return f"{base}:reserved", f"{base}:held", f"{base}:leases"

    def reservation(self, request_id: str) -> str:
        return f"{self.prefix}resv:{request_id}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"


# ---- pod records --------------------------------------------------------------------------------
class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    ATTENTION = "attention"
    GATEWAY = "gateway"


@dataclass(slots=True, frozen=True)
class AttentionCapacity:
    total_blocks: int  # blocks in the KV pool; one block = block_size positions of one KV head
    block_size: int  # positions per block
    bytes_per_block: int  # K and V of one block across all layers


@dataclass(slots=True, frozen=True)
class DecodeCapacity:
    max_num_seqs: int  # sequences in the running batch


@dataclass(slots=True, frozen=True)
class PrefillCapacity:
    max_num_tokens: int  # prompt tokens per forward


Capacity = AttentionCapacity | DecodeCapacity | PrefillCapacity | None
_CAPACITY_OF: dict[Role, type[AttentionCapacity | DecodeCapacity | PrefillCapacity] | None] = {
    Role.ATTENTION: AttentionCapacity,
    Role.DECODE: DecodeCapacity,
    Role.PREFILL: PrefillCapacity,
    Role.GATEWAY: None,
}


@dataclass(slots=True, frozen=True)
class PodInfo:
    """What a pod tells the cluster about itself when it registers; immutable for its lifetime."""

    pod_id: str
    role: Role
    address: str  # host:port of its gRPC (or HTTP, for the gateway) server
    model: str
    capacity: Capacity  # the role's capacity type; None for the gateway
    started_at: float  # unix seconds
    metrics_address: str = ""  # host:port of its Prometheus /metrics ("" = not served)

    def __post_init__(self) -> None:
        check_id("pod_id", self.pod_id)
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"pod {self.pod_id}: address must be host:port, got {self.address!r}")
        expected = _CAPACITY_OF[self.role]
        if (expected is None and self.capacity is not None) or (
            expected is not None and not isinstance(self.capacity, expected)
        ):
            want = expected.__name__ if expected else "None"
            raise ValueError(f"pod {self.pod_id}: a {self.role} pod's capacity must be {want}")
        for name, value in _capacity_fields(self.capacity).items():
            if value < 1:
                raise ValueError(f"pod {self.pod_id}: capacity {name} must be positive, got {value}")

    def to_fields(self) -> dict[str, str]:
        fields = {
            "pod_id": self.pod_id,
            "role": self.role.value,
            "address": self.address,
            "model": self.model,
            "started_at": repr(self.started_at),
            "metrics_address": self.metrics_address,
        }
        fields.update({k: str(v) for k, v in _capacity_fields(self.capacity).items()})
        return fields

    @classmethod
    def from_fields(cls, key: str, fields: Mapping[str, str]) -> PodInfo:
        """Parse a pod hash; raises CorruptRecordError naming the key and the field."""
        with record_errors(key):
            role = Role(fields["role"])
            cap_type = _CAPACITY_OF[role]
            capacity = (
                None
                if cap_type is None
                else cap_type(**{f: int(fields[f]) for f in cap_type.__dataclass_fields__})
            )
            return cls(
                pod_id=fields["pod_id"],
                role=role,
                address=fields["address"],
                model=fields["model"],
                capacity=capacity,
                started_at=float(fields["started_at"]),
                metrics_address=fields.get("metrics_address", ""),  # absent in older records
            )


def _capacity_fields(capacity: Capacity) -> dict[str, int]:
    if capacity is None:
        return {}
    return {name: getattr(capacity, name) for name in capacity.__dataclass_fields__}


@contextmanager
def record_errors(key: str) -> Iterator[None]:
    """Turn the KeyError/ValueError/TypeError of parsing a Redis record into CorruptRecordError."""
    try:
        yield
    except (KeyError, ValueError, TypeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CorruptRecordError(
            f"malformed record at Redis key {key!r}: {what}. Delete the key (`DEL {key}`); "
            "pods re-register and requests are re-created by their owners"
        ) from exc


@dataclass(slots=True, frozen=True)
class PodStatus:
    """A live pod as routing sees it: its registration plus its last heartbeat."""

    info: PodInfo
    load: int  # decode: running + waiting requests; prefill: queued tokens; attention: free pool blocks
    heartbeat_at: float  # unix seconds of the last beat (the registration time before any beat)

    @property
    def pod_id(self) -> str:
        return self.info.pod_id

    @classmethod
    def from_fields(cls, key: str, fields: Mapping[str, str]) -> PodStatus:
        info = PodInfo.from_fields(key, fields)
        with record_errors(key):
            return cls(info=info, load=int(fields["load"]), heartbeat_at=float(fields["heartbeat_at"]))


# ---- registry -----------------------------------------------------------------------------------
_HEARTBEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'load', ARGV[1], 'heartbeat_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: the role's index set, then the pod keys of ARGV's pod ids. Removes ids whose key is gone,
# checked atomically so that a pod re-registering right now is not dropped from the index.
_PRUNE_LUA = """
local removed = 0
for i, pod_id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then removed = removed + redis.call('SREM', KEYS[1], pod_id) end
end
return removed
"""


class PodRegistry:
    """Register pods, beat their hearts, list the live ones. One instance per process is enough."""

    def __init__(self, client: redis.Redis, settings: RedisSettings) -> None:
        check_client(client)
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._ttl_ms = int(settings.pod_ttl_s * 1000)
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._prune = client.register_script(_PRUNE_LUA)

    def register(self, info: PodInfo, load: int = 0) -> None:
        """(Re)write the pod's record with a fresh TTL. Idempotent."""
        key = self.keys.pod(info.pod_id)
        fields = info.to_fields() | {"load": str(load), "heartbeat_at": repr(time.time())}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # drop fields of an older registration under the same id
            pipe.hset(key, mapping=redis_mapping(fields))
            pipe.pexpire(key, self._ttl_ms)
            pipe.sadd(self.keys.pods(info.role), info.pod_id)
            pipe.execute()

    def heartbeat(self, pod_id: str, load: int) -> bool:
        """Refresh the TTL and the load. False when the record is gone: the caller must re-register."""
        alive = self._heartbeat(keys=[self.keys.pod(pod_id)], args=[load, repr(time.time()), self._ttl_ms])
        return bool(alive)

    def deregister(self, pod_id: str, role: Role) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.pod(pod_id))
            pipe.srem(self.keys.pods(role), pod_id)
            pipe.execute()

    def get(self, pod_id: str) -> PodStatus | None:
        key = self.keys.pod(pod_id)
        fields = str_hash(self.client.hgetall(key))
        return PodStatus.from_fields(key, fields) if fields else None

    def live_pods(self, role: Role, model: str | None = None) -> list[PodStatus]:
        """Pods of `role` (serving `model`, if given) whose key has not expired, sorted by pod id.

        Ids whose key expired are pruned from the role's set. A malformed record is logged and left
        out, so one bad key cannot take routing down for every pod.
        """
        index = self.keys.pods(role)
        pod_ids = sorted(str_list(self.client.smembers(index)))
        with self.client.pipeline(transaction=False) as pipe:
            for pod_id in pod_ids:
                pipe.hgetall(self.keys.pod(pod_id))
            records = [str_hash(r) for r in pipe.execute()]
        live, dead = [], []
        for pod_id, fields in zip(pod_ids, records, strict=True):
            if not fields:
                dead.append(pod_id)
                continue
            try:
                status = PodStatus.from_fields(self.keys.pod(pod_id), fields)
            except CorruptRecordError as exc:
                log.error("skipping pod %s: %s", pod_id, exc)
                continue
            if status.info.role == role and (model is None or status.info.model == model):
                live.append(status)
        if dead:
            self._prune(keys=[index, *map(self.keys.pod, dead)], args=dead)
        return live


# ---- heartbeats on a thread ---------------------------------------------------------------------
class Heartbeater:
    """Keeps one pod registered: register, beat every interval, re-register when the key vanished.

    Lifecycle: `start()` (registers on the thread, so a pod starts even while Redis is down) ─▶
    beats ─▶ `stop()` (joins the thread, then deregisters unless told not to). Redis errors are
    logged and retried with exponential backoff capped at the pod TTL; they never reach the pod.
    """

    def __init__(
        self, registry: PodRegistry, info: PodInfo, load: Callable[[], int], *, max_backoff_s: float = 2.0
    ) -> None:
        self.registry = registry
        self.info = info
        self._load = load
        self._interval = registry.settings.heartbeat_interval_s
        self._max_backoff = max(self._interval, min(max_backoff_s, registry.settings.pod_ttl_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{info.pod_id}", daemon=True)
        self._last_load = 0
        self.registrations = 0  # how many times the pod (re)registered; tests and logs read it

    def start(self) -> Heartbeater:
        self._thread.start()
        return self

    def stop(self, deregister: bool = True, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if deregister:
            try:
                self.registry.deregister(self.info.pod_id, self.info.role)
            except redis.RedisError as exc:
                log.warning(
                    "pod %s: could not deregister (%s); its key expires by itself", self.info.pod_id, exc
                )

    def _run(self) -> None:
        registered, failures = False, 0
        while not self._stop.is_set():
            try:
                load = self._current_load()
                if not registered or not self.registry.heartbeat(self.info.pod_id, load):
                    if registered:
                        log.warning("pod %s: registration vanished; re-registering", self.info.pod_id)
                    self.registry.register(self.info, load)
                    self.registrations += 1
                    registered = True
                if failures:
                    log.info(
                        "pod %s: Redis reachable again after %d failed beats", self.info.pod_id, failures
                    )
                failures, wait = 0, self._interval
            except redis.RedisError as exc:
                failures += 1
                wait = min(self._interval * 2 ** (failures - 1), self._max_backoff)
                level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
                log.log(level, "pod %s: heartbeat failed (%r), retry in %.1f s", self.info.pod_id, exc, wait)
            self._stop.wait(wait)

    def _current_load(self) -> int:
        try:
            self._last_load = int(self._load())
        except Exception:
            # The beat is the pod's liveness: a broken load probe must not make the pod look dead.
            log.exception("pod %s: load probe failed; reporting the last load", self.info.pod_id)
        return self._last_load
