"""The chart's rendered release, run as local processes: each container's command, arguments and
environment taken from the rendered objects, as a kubelet would start them. The first test runs only
the rendered Redis (fast); the second, marked slow, the whole release with the real model.

    rendered Redis StatefulSet  ─▶ the bundled valkey-server with its args (password from the Secret)
    rendered attention / prefill / decode / gateway ─▶ `disagg serve ROLE ...` ─▶ register in Redis
    kubelet probes ─▶ gRPC health SERVING on every pod, the gateway's GET /health 200
    rendered `helm test` pod ─▶ its script sends one chat completion: PASS ("Paris")
    SIGTERM ─▶ every process exits 0 within its rendered terminationGracePeriodSeconds

What a cluster would provide is substituted, and only that: the pod IP (127.0.0.1) and name, free
local ports for the fixed container ports (the processes share one host), 127.0.0.1 for the Redis
Service's DNS name, temporary folders for the mounted Secret and for /tmp, and the image's own
environment (DISAGG_CACHE_DIR, the model converted at build time: here the test session's cache).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.redis_server import free_port, valkey_binary
from services.core.registry import RedisSettings, connect
from services.core.runtime import die_with_parent
from tests.helm_chart import RELEASE, Resolver, command_line, container, render, secret_data, workload

pytestmark = pytest.mark.timeout(300)
READY_TIMEOUT_S = 200.0


class Process:
    """One container as a local process; output to a log file, shown when something fails."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def tail(self) -> str:
        return f"--- {self.name} (exit {self.proc.poll()}):\n" + "\n".join(
            self.log.read_text().splitlines()[-25:]
        )

    def stop_within(self, seconds: float) -> float:
        """SIGTERM as the kubelet sends it; the seconds it took to exit 0."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=seconds)
        took = time.monotonic() - start
        assert code == 0, self.tail()
        return took


class LocalKubelet:
    """Starts rendered containers with the substitutions listed in the module docstring."""

    def __init__(self, docs: list[dict[str, Any]], tmp: Path, cache_dir: Path) -> None:
        self.docs, self.tmp = docs, tmp
        self.secrets = secret_data(docs)
        self.processes: list[Process] = []
        self.image_env = {
            "PATH": os.environ["PATH"],
            "DISAGG_CACHE_DIR": str(cache_dir),
            "PYTHONPATH": os.getcwd(),  # the worktree's services package
        }
        self.redis_url = ""

    def environment(self, spec: dict[str, Any], pod: str, mounts: dict[str, Path]) -> tuple[list[str], dict]:
        argv, env = command_line(
            spec, Resolver({"status.podIP": "127.0.0.1", "metadata.name": pod}, self.secrets)
        )
        for name, value in env.items():
            for mount, local in mounts.items():
                value = value.replace(mount, str(local))
            if name.endswith("_METRICS_PORT"):
                value = str(free_port())
            elif name.endswith("REDIS_URL") and self.redis_url:
                value = self.redis_url  # the Service DNS name, resolved
            env[name] = value
        home = self.tmp / pod / "tmp"  # the /tmp emptyDir (HOME points there)
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
        return argv, {**self.image_env, **env}

    def secret_mounts(self, doc: dict[str, Any]) -> dict[str, Path]:
        """Each mounted Secret volume as a local folder holding its keys as files."""
        spec = doc["spec"]["template"]["spec"] if "template" in doc["spec"] else doc["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        out = {}
        for mount in spec["containers"][0].get("volumeMounts", []):
            if mount["name"] in secrets:
                folder = self.tmp / "secrets" / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
                for (name, key), value in self.secrets.items():
                    if name == secrets[mount["name"]]:
                        (folder / key).write_text(value)
                out[mount["mountPath"]] = folder
        return out

    def start(self, doc: dict[str, Any], port_flag: str, port: int) -> Process:
        name = f"{doc['metadata']['name']}-0"
        argv, env = self.environment(container(doc), name, self.secret_mounts(doc))
        argv = [f"--{port_flag}={port}" if a.startswith(f"--{port_flag}=") else a for a in argv]
        # Every other fixed container port (the attention pods' Step socket) gets a free one too.
        argv = [f"--step-port={free_port()}" if a.startswith("--step-port=") else a for a in argv]
        assert argv[0] == "disagg"
        process = Process(name, [sys.executable, "-m", "services.cli", *argv[1:]], env, self.tmp)
        self.processes.append(process)
        return process

    def start_redis(self) -> Process:
        """The rendered valkey-server command line on the bundled binary, bound to loopback."""
        doc = workload(self.docs, "redis")
        argv, _env = command_line(container(doc), Resolver({}, self.secrets))
        port, data = free_port(), self.tmp / "redis-data"
        data.mkdir()
        local = {"--port": str(port), "--bind": "127.0.0.1", "--dir": str(data)}
        for i, arg in enumerate(argv[:-1]):
            if arg in local:
                argv[i + 1] = local[arg]
        assert argv[0] == "valkey-server" and "--requirepass" in argv
        process = Process("redis", [str(valkey_binary()), *argv[1:]], {"PATH": os.environ["PATH"]}, self.tmp)
        self.processes.append(process)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return process

    def fail(self, why: str) -> None:
        pytest.fail(why + "\n" + "\n".join(p.tail() for p in self.processes))

    def cleanup(self) -> None:
        for p in self.processes:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


@pytest.fixture
def kubelet(tmp_path: Path, model_folder: Path) -> Iterator[LocalKubelet]:
    k = LocalKubelet(render({}), tmp_path, model_folder.parent)
    try:
        yield k
    finally:
        k.cleanup()


def _grpc_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_rendered_redis_requires_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered valkey-server arguments start the bundled server, which then refuses clients
    without the release's password and serves those given it as DISAGG_REDIS_PASSWORD."""
    kubelet = LocalKubelet(render({}), tmp_path, tmp_path)
    try:
        kubelet.start_redis()
        password = kubelet.secrets[(f"{RELEASE}-redis", "password")]
        deadline = time.monotonic() + 10
        monkeypatch.setenv("DISAGG_REDIS_PASSWORD", password)
        while True:
            try:
                assert connect(RedisSettings(url=kubelet.redis_url)).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    kubelet.fail("the rendered Redis did not answer")
                time.sleep(0.1)
        monkeypatch.delenv("DISAGG_REDIS_PASSWORD")
        with pytest.raises(redis.AuthenticationError):
            connect(RedisSettings(url=kubelet.redis_url)).ping()
    finally:
        kubelet.cleanup()


@pytest.mark.slow
def test_rendered_release_serves_and_stops(kubelet: LocalKubelet) -> None:
    docs = kubelet.docs
    kubelet.start_redis()
    pods = {role: workload(docs, role) for role in ("attention", "prefill", "decode")}
    ports = {role: free_port() for role in pods}
    started = {role: kubelet.start(doc, "port", ports[role]) for role, doc in pods.items()}
    gateway_doc = workload(docs, "gateway")
    gateway_port = free_port()
    started["gateway"] = kubelet.start(gateway_doc, "port", gateway_port)
    url = f"http://127.0.0.1:{gateway_port}"

    # The kubelet's probes: gRPC health on each pod, GET /health on the gateway.
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = [*ports, "gateway"]
    while waiting and time.monotonic() < deadline:
        for p in kubelet.processes:
            if p.proc.poll() is not None:
                kubelet.fail(f"{p.name} exited")
        waiting = [r for r in ports if not _grpc_serving(ports[r])]
        waiting += [] if _http_ok(f"{url}/health") else ["gateway"]
        time.sleep(0.5)
    if waiting:
        kubelet.fail(f"not ready after {READY_TIMEOUT_S:.0f} s: {waiting}")

    # `helm test`: the rendered test pod's own command, pointed at the local gateway.
    (test_pod,) = [d for d in docs if d["kind"] == "Pod"]
    argv, env = kubelet.environment(
        test_pod["spec"]["containers"][0], "test", kubelet.secret_mounts(test_pod)
    )
    env["DISAGG_TEST_URL"] = url
    result = subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0 or "PASS" not in result.stdout:
        kubelet.fail(f"helm test pod failed:\n{result.stdout}\n{result.stderr}")
    assert "Paris" in result.stdout

    # SIGTERM, gateway first (as a rollout or `helm uninstall` would reach it): each exits 0 within
    # its grace period (the gateway's preStop pause comes out of the same budget).
    for role in ("gateway", "decode", "prefill", "attention"):
        doc = gateway_doc if role == "gateway" else pods[role]
        budget = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        if role == "gateway":
            budget -= int(container(doc)["lifecycle"]["preStop"]["exec"]["command"][1])
        took = started[role].stop_within(budget)
        assert took < budget, f"{role} took {took:.1f} s"
