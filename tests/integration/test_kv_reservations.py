"""Atomic KV-block reservations (Lua) against a real valkey-server."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from services.core.redis_server import RedisServer
from services.core.registry import AttentionCapacity, PodInfo, PodRegistry, RedisSettings, Role, connect
from services.core.reservations import (
    Granted,
    KvReservations,
    RefusalReason,
    Refused,
    ReservationExistsError,
)

pytestmark = pytest.mark.timeout(60)


def attention_pods(client: redis.Redis, settings: RedisSettings, totals: dict[str, int]) -> PodRegistry:
    registry = PodRegistry(client, settings)
    for i, (pod_id, total) in enumerate(totals.items()):
        capacity = AttentionCapacity(total_blocks=total, block_size=16, bytes_per_block=1024)
        registry.register(PodInfo(pod_id, Role.ATTENTION, f"127.0.0.1:{7000 + i}", "m", capacity, 0.0))
    return registry


def reserved(resv: KvReservations, *pod_ids: str) -> list[int]:
    return [u.reserved for u in resv.usage(list(pod_ids))]


def test_all_or_nothing_across_two_pods(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    attention_pods(redis_client, redis_settings, {"a": 10, "b": 2})
    resv = KvReservations(redis_client, redis_settings)
    assert resv.reserve("r1", {"a": 5, "b": 5}) == Refused("b", RefusalReason.INSUFFICIENT, free=2)
    assert resv.reserve("r1", {"a": 5, "ghost": 1}) == Refused("ghost", RefusalReason.NOT_REGISTERED, free=0)
    assert reserved(resv, "a", "b") == [0, 0] and resv.held("r1") == {}
    assert resv.reserve("r1", {"a": 10, "b": 2}) == Granted({"a": 10, "b": 2})
    assert [u.free for u in resv.usage(["a", "b"])] == [0, 0]
    assert isinstance(resv.reserve("r2", {"a": 1}), Refused)


def test_release_is_idempotent_and_never_negative(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    attention_pods(redis_client, redis_settings, {"a": 10, "b": 10})
    resv = KvReservations(redis_client, redis_settings)
    assert isinstance(resv.reserve("r1", {"a": 4, "b": 3}), Granted)
    with pytest.raises(ReservationExistsError, match="release it first"):
        resv.reserve("r1", {"a": 1})
    assert resv.release("r1") == 7
    assert resv.release("r1") == 0
    assert resv.release("never-reserved") == 0
    assert reserved(resv, "a", "b") == [0, 0]
    # The pod's kv keys are deleted once it holds nothing: dead pods leave no garbage.
    assert not redis_client.keys(f"{redis_settings.key_prefix}kv:*")


def test_contended_reservations_never_overcommit(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    """16 threads race for 7-block pieces of two 100-block pods: exactly 14 requests win."""
    attention_pods(redis_client, redis_settings, {"a": 100, "b": 100})
    resv = KvReservations(redis_client, redis_settings)
    granted: list[str] = []
    lock, start = threading.Lock(), threading.Barrier(16)

    def worker(t: int) -> None:
        start.wait()
        for i in range(10):
            request = f"t{t}-{i}"
            if isinstance(resv.reserve(request, {"a": 7, "b": 7}), Granted):
                with lock:
                    granted.append(request)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 14 and reserved(resv, "a", "b") == [98, 98]
    # Now release and reserve concurrently: the counters stay exact.
    released = threading.Thread(target=lambda: [resv.release(r) for r in granted])
    released.start()
    late = [resv.reserve(f"late-{i}", {"a": 7, "b": 7}) for i in range(20)]
    released.join()
    late_blocks = 7 * sum(isinstance(r, Granted) for r in late)
    assert reserved(resv, "a", "b") == [late_blocks, late_blocks] and late_blocks <= 98


def test_leases_expire_unless_refreshed(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    """A crashed gateway stops refreshing: its blocks come back after one lease."""
    attention_pods(redis_client, redis_settings, {"a": 10})
    resv = KvReservations(redis_client, redis_settings, lease_s=0.3)
    assert isinstance(resv.reserve("alive", {"a": 4}), Granted)
    assert isinstance(resv.reserve("crashed", {"a": 5}), Granted)
    for _ in range(5):
        time.sleep(0.1)
        assert resv.refresh("alive")
    assert reserved(resv, "a") == [4]  # "crashed" expired, "alive" kept its blocks
    assert not resv.refresh("crashed") and resv.release("crashed") == 0
    time.sleep(0.4)
    assert reserved(resv, "a") == [0] and not resv.refresh("alive")


def test_dead_pod_keeps_its_reservations_until_released(
    redis_client: redis.Redis, redis_settings: RedisSettings
) -> None:
    registry = attention_pods(redis_client, redis_settings, {"a": 10})
    resv = KvReservations(redis_client, redis_settings)
    assert isinstance(resv.reserve("r1", {"a": 4}), Granted)
    registry.deregister("a", Role.ATTENTION)
    [usage] = resv.usage(["a"])
    assert usage.total is None and usage.reserved == 4 and usage.free == 0
    assert resv.reserve("r2", {"a": 1}) == Refused("a", RefusalReason.NOT_REGISTERED, free=0)
    assert resv.release("r1") == 4


class ReservationMachine(RuleBasedStateMachine):
    """Random reserve/release/refresh sequences; the Redis counters always match a Python model."""

    server_url = ""
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.settings = RedisSettings(url=self.server_url, key_prefix=f"hyp-{uuid.uuid4().hex[:12]}:")
        self.client = connect(self.settings)
        self.totals = {"a": 20, "b": 13, "c": 7}
        attention_pods(self.client, self.settings, self.totals)
        self.resv = KvReservations(self.client, self.settings)
        self.model: dict[str, dict[str, int]] = {}  # request -> pod -> blocks
        self.counter = 0

    def _used(self, pod_id: str) -> int:
        return sum(blocks.get(pod_id, 0) for blocks in self.model.values())

    @rule(target=requests, pods=st.dictionaries(st.sampled_from("abc"), st.integers(1, 12), min_size=1))
    def reserve(self, pods: dict[str, int]) -> str:
        self.counter += 1
        request = f"r{self.counter}"
        fits = all(n <= self.totals[p] - self._used(p) for p, n in pods.items())
        result = self.resv.reserve(request, pods)
        assert isinstance(result, Granted) == fits
        if fits:
            self.model[request] = pods
        return request

    @rule(request=consumes(requests))
    def release(self, request: str) -> None:
        expected = sum(self.model.pop(request, {}).values())
        assert self.resv.release(request) == expected
        assert self.resv.release(request) == 0

    @rule(request=requests)
    def refresh(self, request: str) -> None:
        assert self.resv.refresh(request) == (request in self.model)

    @invariant()
    def counters_match(self) -> None:
        for usage in self.resv.usage(list(self.totals)):
            held = self.client.hvals(self.resv.keys.kv(usage.pod_id)[1])
            assert usage.reserved == self._used(usage.pod_id) == sum(int(h) for h in held)
            assert 0 <= usage.free == self.totals[usage.pod_id] - usage.reserved

    def teardown(self) -> None:
        self.client.close()


def test_reserve_release_sequences_stay_consistent(redis_server: RedisServer) -> None:
    ReservationMachine.server_url = redis_server.url
    run_state_machine_as_test(
        ReservationMachine,
        settings=hypothesis_settings(max_examples=40, stateful_step_count=25, deadline=None),
    )
