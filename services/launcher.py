"""`disagg up`: the whole cluster as local processes — Redis, attention, prefill and decode pods, and
the gateway — the same processes a Kubernetes install runs, on one machine.

    cluster = LocalCluster(ClusterPlan(attention=2, placement="head", port=8000))
    url = cluster.start()      # returns once every pod is registered and the gateway answers /health
    ...                        # serve
    cluster.stop()             # SIGTERM every child, SIGKILL what is left after `stop_timeout_s`

Start order: the model is converted once here (children would otherwise wait on its file lock) ─▶
valkey-server (unless `redis_url` is given) ─▶ attention pods ─▶ prefill pods ─▶ decode pods (port 0
each: they register their address in Redis) ─▶ the gateway ─▶ wait until Redis lists every pod as
live and GET /health is 200 ─▶ ready ─▶ with `prometheus`: a real Prometheus scraping the gateway
and every pod's registered metrics address, recording rules loaded (local_prometheus.py).

Prices: `prices` maps a role to its USD/hour, given to each of its pods as `--cost-usd-per-hour`.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only this process, which
then stops them in reverse order (gateway first: it stops taking requests before the pods behind it
go). Each child also gets PR_SET_PDEATHSIG, so even a SIGKILLed launcher leaves nothing behind.
Child output is copied to stderr with a `[role-i]` prefix; stdout carries only the `ready:` line.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO

from services.core.errors import DisaggError
from services.core.metrics import ATTENTION, DECODE, GATEWAY, PREFILL
from services.core.model.sources import DEFAULT_MODEL, resolve_model
from services.core.policy import DEFAULT_BUDGET
from services.core.redis_server import RedisServer
from services.core.registry import PodRegistry, RedisSettings, Role, connect
from services.core.router import PlacementMode
from services.core.runtime import die_with_parent
from services.local_prometheus import LocalPrometheus

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ClusterPlan:
    port: int = 8000  # the gateway's; 0 = any free port (the ready line says which)
    host: str = "127.0.0.1"
    prefill: int = 1
    decode: int = 1
    attention: int = 2
    placement: PlacementMode = PlacementMode.REQUEST
    redis_url: str | None = None  # None: start a private valkey-server
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    attention_kv_gb: float = 1.0  # KV pool of each attention pod
    max_num_seqs: int = 64  # running batch of each decode pod
    micro_batches: int = 2  # ping-pong micro-batches of each decode pod
    micro_batch_min_context: int = 512  # ... for forwards whose rows attend over this many positions
    remote_prefill_min_tokens: int = 512  # shorter prompts are prefilled by their decode pod
    prompt_attention: str = "decode"  # ... attending their first chunk there (decode) or on the pods
    transport: str = "grpc"  # bulk KV from prefill to attention pods: grpc (ImportKV) or nixl
    attention_policy: str = "dense"  # the attention pods' default policy (requests may name their own)
    attention_budget: float = DEFAULT_BUDGET  # their default budget
    step_transport: str = "tcp"  # per-layer Step frames, decode to attention pods: tcp or grpc
    extra_env: dict[str, str] = field(default_factory=dict)  # for every child (tests, tuning)
    prices: Mapping[str, float] = field(default_factory=dict)  # role -> USD/hour (docs/cost.md)
    prometheus: bool = False  # also start a real Prometheus scraping everything
    scrape_interval_s: float = 2.0  # of that Prometheus
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 8.0

    def __post_init__(self) -> None:
        for role in ("decode", "attention"):
            if getattr(self, role) < 1:
                raise DisaggError(f"--{role} must be at least 1")
        if self.prefill < 0:
            raise DisaggError("--prefill must be 0 (decode pods prefill themselves) or more")
        if self.transport not in ("grpc", "nixl"):
            raise DisaggError(f"--transport must be grpc or nixl, got {self.transport!r}")
        if self.prompt_attention not in ("decode", "pods"):
            raise DisaggError(f"--prompt-attention must be decode or pods, got {self.prompt_attention!r}")
        if self.step_transport not in ("tcp", "grpc"):
            raise DisaggError(f"--step-transport must be tcp or grpc, got {self.step_transport!r}")
        if self.attention_kv_gb <= 0:
            raise DisaggError("--attention-kv-gb must be > 0")
        if self.remote_prefill_min_tokens < 2:
            raise DisaggError("--remote-prefill-min-tokens must be at least 2")
        roles = (GATEWAY, PREFILL, DECODE, ATTENTION)
        for role, price in self.prices.items():
            if role not in roles or price < 0:
                raise DisaggError(
                    f"a price is ROLE=USD_PER_HOUR with ROLE in {', '.join(roles)}, got {role}={price}"
                )


class Child:
    """One pod process; its merged output is copied to stderr, and the last lines kept for errors."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.ready_url: str | None = None  # the gateway's `ready: URL` line
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the children
            preexec_fn=die_with_parent,  # prctl only: safe between fork and exec
        )
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _copy(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if line.startswith("ready: "):
                self.ready_url = line.removeprefix("ready: ").strip()
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def exited(self) -> int | None:
        return self.proc.poll()

    def describe_exit(self) -> str:
        tail = "\n".join(f"    {line}" for line in list(self.tail)[-15:])
        return f"{self.name} exited with code {self.proc.returncode}; its last output:\n{tail}"


class LocalCluster:
    def __init__(self, plan: ClusterPlan) -> None:
        self.plan = plan
        self.children: list[Child] = []
        self.redis: RedisServer | None = None
        self.redis_url = plan.redis_url or ""
        self.url: str | None = None
        self.prometheus: LocalPrometheus | None = None
        self.abort = threading.Event()  # set from another thread: `start` gives up and cleans up

    # ---- start ---------------------------------------------------------------------------------
    def start(self) -> str:
        """Start everything; returns the gateway URL once requests are served. Cleans up on failure."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> str:
        plan = self.plan
        resolve_model(plan.model, show_progress=True)  # convert once, before the children race for it
        if plan.redis_url is None:
            self.redis = RedisServer(port=0).start()
            self.redis_url = self.redis.url
        log.info("Redis at %s", self.redis_url)
        common = ["--model", plan.model, "--redis-url", self.redis_url]
        pod_flags = [*common, "--dtype", plan.dtype, "--device", plan.device, "--port", "0"]
        kv_bytes = str(int(plan.attention_kv_gb * (1 << 30)))
        # One torch thread per attention pod: a frame's attention is a few small ops, and local pods
        # share the decode pod's cores, where a second OpenMP thread mostly waits for a busy core
        # (seen in one-off profiles on the 2-core build machine; no bench reproduces it yet).
        attention_flags = [*pod_flags, "--kv-budget-bytes", kv_bytes, "--torch-threads", "1"]
        attention_flags += ["--transport", plan.transport]
        attention_flags += ["--default-policy", plan.attention_policy]
        attention_flags += ["--default-budget", str(plan.attention_budget)]
        for i in range(plan.attention):
            self._spawn(f"attention-{i}", "attention", attention_flags)
        for i in range(plan.prefill):
            self._spawn(f"prefill-{i}", "prefill", [*pod_flags, "--transport", plan.transport])
        for i in range(plan.decode):
            batching = ["--max-num-seqs", str(plan.max_num_seqs), "--micro-batches", str(plan.micro_batches)]
            batching += ["--micro-batch-min-context", str(plan.micro_batch_min_context)]
            step = ["--step-transport", plan.step_transport, "--prompt-attention", plan.prompt_attention]
            self._spawn(f"decode-{i}", "decode", [*pod_flags, *batching, *step])
        gateway_flags = [*common, "--placement", plan.placement.value, "--host", plan.host]
        gateway_flags += ["--remote-prefill-min-tokens", str(plan.remote_prefill_min_tokens)]
        gateway = self._spawn("gateway", "gateway", [*gateway_flags, "--port", str(plan.port)])
        self.url = self._wait_ready(gateway)
        if plan.prometheus:
            self.prometheus = LocalPrometheus(
                self.metrics_targets(), scrape_interval_s=plan.scrape_interval_s
            )
            self.prometheus.start()
        return self.url

    def metrics_targets(self) -> list[str]:
        """host:port of every /metrics: the gateway's HTTP port, each live pod's registered address."""
        assert self.url is not None  # the cluster is up
        settings = RedisSettings(url=self.redis_url)
        registry = PodRegistry(connect(settings), settings)
        pods = [
            pod for role in (Role.ATTENTION, Role.PREFILL, Role.DECODE) for pod in registry.live_pods(role)
        ]
        return [
            self.url.removeprefix("http://"),
            *(p.info.metrics_address for p in pods if p.info.metrics_address),
        ]

    def _spawn(self, name: str, role: str, flags: list[str]) -> Child:
        if self.abort.is_set():
            raise DisaggError("interrupted while starting")
        if role in self.plan.prices:
            flags = [*flags, "--cost-usd-per-hour", repr(self.plan.prices[role])]
        argv = [sys.executable, "-m", "services.cli", "serve", role, *flags]
        env = {**os.environ, **self.plan.extra_env, "PYTHONUNBUFFERED": "1"}
        child = Child(name, argv, env)
        self.children.append(child)
        return child

    def _wait_ready(self, gateway: Child) -> str:
        """Every pod live in Redis and the gateway's /health 200, or DisaggError naming what is not."""
        plan = self.plan
        want = {Role.ATTENTION: plan.attention, Role.PREFILL: plan.prefill, Role.DECODE: plan.decode}
        settings = RedisSettings(url=self.redis_url)
        registry = PodRegistry(connect(settings), settings)
        deadline = time.monotonic() + self.plan.ready_timeout_s
        missing = "the gateway"
        while time.monotonic() < deadline:
            if self.abort.is_set():
                raise DisaggError("interrupted while starting")
            for child in self.children:
                if child.exited() is not None:
                    raise DisaggError(f"cluster failed to start: {child.describe_exit()}")
            live = {role: len(registry.live_pods(role, self.plan.model)) for role in want}
            short = [f"{role.value} ({live[role]}/{n})" for role, n in want.items() if live[role] < n]
            if short:
                missing = "pods registering in Redis: " + ", ".join(short)
            elif gateway.ready_url is None:
                missing = "the gateway to listen"
            elif _health_ok(gateway.ready_url):
                return gateway.ready_url
            else:
                missing = "the gateway's /health"
            time.sleep(0.2)
        raise DisaggError(f"cluster not ready after {self.plan.ready_timeout_s:.0f} s: waiting for {missing}")

    # ---- run and stop --------------------------------------------------------------------------
    def watch(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Until `stop` is set: report children that die (no restart: locally, that is the operator's
        call; in Kubernetes the kubelet restarts pods)."""
        reported: set[str] = set()
        while not stop.wait(poll_s):
            for child in self.children:
                if child.name not in reported and child.exited() is not None:
                    reported.add(child.name)
                    log.error("%s", child.describe_exit())

    def stop(self) -> None:
        """SIGTERM the children, gateway first; SIGKILL whatever is left after `stop_timeout_s`."""
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        for child in reversed(self.children):
            if child.exited() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.plan.stop_timeout_s
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, self.plan.stop_timeout_s)
                child.proc.kill()
                child.proc.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run(plan: ClusterPlan) -> int:
    """Start the cluster, print `ready: URL`, serve until SIGINT/SIGTERM, stop everything.

    Everything runs on the main thread: PR_SET_PDEATHSIG fires when the *thread* that spawned a
    child exits, so children spawned from a helper thread would die with it.
    """
    cluster = LocalCluster(plan)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        cluster.abort.set()  # while starting: start() gives up at its next check and cleans up

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        cluster.start()
    except DisaggError:
        if stop.is_set():
            return 130
        raise
    print(f"ready: {cluster.url}", flush=True)
    if cluster.prometheus is not None:
        print(f"prometheus: {cluster.prometheus.url}", flush=True)
    try:
        cluster.watch(stop)
    finally:
        log.info("stopping the cluster")
        cluster.stop()
    return 0
