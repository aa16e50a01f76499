"""Pods dying under load in a real `disagg up` cluster: SIGKILL one, and the requests it served end
promptly with an error that names it, while new requests route around it once its heartbeat expires.

One cluster (request placement, 2 attention pods, 1 prefill, 1 decode) for the module; the tests run
in order, each killing one more pod.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.test_gateway_e2e import MODEL, Gateway, alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# KV is reserved for prompt + max_tokens: 1000 tokens × 3 KV heads = 189 blocks, so the test cluster's
# attention pods (0.25 GiB, 1092 blocks each) hold several of these at once.
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": True}
SHORT = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Every prompt goes to the prefill pod, so killing it is felt by in-flight prompts.
    server = Gateway(
        model_folder.parent, tmp_path_factory.mktemp("cluster"), mode="request", remote_prefill_min_tokens=2
    )
    try:
        yield server
    finally:
        server.stop()


def pod_pid(cluster: Gateway, role: str, index: int = 0) -> int:
    """The pid of the launcher's child running `serve ROLE` (the index-th of them, in start order)."""
    pids = []
    for pid in sorted(cluster.children):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:  # killed by an earlier test
            continue
        if "serve" in argv and argv[argv.index("serve") + 1] == role and alive(pid):
            pids.append(pid)
    return pids[index]


class Stream:
    """One long streaming request on a thread; counts its events and keeps the last one."""

    def __init__(self, pool: ThreadPoolExecutor, url: str) -> None:
        self.events = 0
        self.last = ""
        self.ended_at: float | None = None
        self.stop = threading.Event()
        self.future = pool.submit(self._run, url)

    def _run(self, url: str) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events += 1
                    self.last = line
                if self.stop.is_set():
                    return  # closing the connection cancels the request
        self.ended_at = time.monotonic()

    @property
    def error(self) -> dict[str, str] | None:
        if self.ended_at is None or '"error"' not in self.last:
            return None
        error: dict[str, str] = json.loads(self.last.removeprefix("data: "))["error"]
        return error


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def completes(url: str) -> bool:
    response = httpx.post(f"{url}/v1/completions", json=SHORT, timeout=60)
    return response.status_code == 200


def test_requests_beyond_the_kv_pools_wait_for_room_instead_of_failing(cluster: Gateway) -> None:
    """16 requests reserving 189 blocks each need 3024 blocks; the two pods hold 2184. The gateway's
    admission queue holds the rest until earlier requests finish and free theirs: none gets a 503."""
    queued = {**LONG, "stream": False, "stop": [" "]}  # reserves for 1000 tokens, ends in a few

    def post(_: int) -> tuple[int, str]:
        response = httpx.post(f"{cluster.url}/v1/completions", json=queued, timeout=120)
        return response.status_code, response.text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, range(16)))
    assert [code for code, _ in results] == [200] * 16, [text for code, text in results if code != 200]
    cluster.wait_idle(timeout=30)


def test_killed_attention_pod_fails_its_requests_promptly_and_is_routed_around(cluster: Gateway) -> None:
    assert len(cluster.attention_pods()) == 2
    victim = pod_pid(cluster, "attention", 0)
    with ThreadPoolExecutor(4) as pool:
        streams = [Stream(pool, cluster.url) for _ in range(4)]
        wait_for(lambda: all(s.events >= 5 for s in streams), "the streams did not start")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        seen = [s.events for s in streams]
        # Every stream either ends with an error or keeps streaming (it was on the other pod).
        wait_for(
            lambda: all(
                s.ended_at is not None or s.events >= n + 20 for s, n in zip(streams, seen, strict=True)
            ),
            "a stream neither failed nor made progress after the kill",
            timeout=30,
        )
        for s in streams:
            s.stop.set()
    failed = [s for s in streams if s.error is not None]
    # Request placement spreads requests over both pods by free blocks: some were on the victim.
    assert failed and len(failed) < len(streams), [s.last for s in streams]
    for s in failed:
        assert s.error is not None and s.ended_at is not None
        assert s.error["code"] == "backend_unavailable" and "attention pod" in s.error["message"], s.error
        assert s.ended_at - killed_at < 10  # promptly, not after some long timeout
    # Within the pod TTL (3 s) the victim leaves routing; then every new request succeeds.
    wait_for(lambda: len(cluster.attention_pods()) == 1, "the killed pod is still listed", timeout=10)
    assert all(completes(cluster.url) for _ in range(4))
    cluster.wait_idle(timeout=30)


def test_killed_prefill_pod_costs_no_request(cluster: Gateway) -> None:
    """A decode pod whose Prefill call fails with UNAVAILABLE prefills the prompt itself, and once
    the dead pod leaves routing decode pods prefill every prompt: no request fails, even during the
    heartbeat TTL."""
    os.kill(pod_pid(cluster, "prefill"), signal.SIGKILL)
    deadline = time.monotonic() + 8
    outcomes = []
    while time.monotonic() < deadline:
        outcomes.append(completes(cluster.url))
    assert all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} requests failed"
    cluster.wait_idle(timeout=30)


def test_killed_decode_pod_ends_its_streams_and_then_no_capacity(cluster: Gateway) -> None:
    with ThreadPoolExecutor(2) as pool:
        streams = [Stream(pool, cluster.url) for _ in range(2)]
        try:
            wait_for(lambda: all(s.events >= 5 for s in streams), "the streams did not start")
            os.kill(pod_pid(cluster, "decode"), signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: all(s.ended_at is not None for s in streams), "streams hang", timeout=15)
        finally:
            for s in streams:
                s.stop.set()
    for s in streams:
        assert s.error is not None and s.error["code"] == "backend_unavailable", s.last
        assert "decode pod" in s.error["message"]
        assert s.ended_at is not None and s.ended_at - killed_at < 5
    # The dead decode pod cannot free what it opened on the attention pod; the pod's orphan reaper
    # frees it once the decode pod has been missing from the registry for two TTLs.
    assert cluster.kv_blocks_used() > 0
    wait_for(lambda: cluster.kv_blocks_used() == 0, "the orphaned KV was not freed", timeout=15)
    response = httpx.post(f"{cluster.url}/v1/completions", json=SHORT, timeout=60)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_capacity"
    assert "decode" in response.json()["error"]["message"]
