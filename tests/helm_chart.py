"""Rendering deploy/helm/disagg with the real Helm engine, for the chart tests.

    docs = render(VARIANTS["gpu-rdma"])                    # every rendered object (NOTES.txt aside)
    for workload, pod in pod_templates(docs): ...          # Deployments, StatefulSets, hook Pods
    argv, env = command_line(container, resolver)          # what the kubelet would exec

The variants are the chart's own ci/*-values.yaml (also the examples docs/kubernetes.md points to),
plus the defaults. `Resolver` plays the kubelet's part for `valueFrom` (downward API, Secrets the
release renders or the test supplies) and for `$(VAR)` references in env values and args.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "disagg"
RELEASE, NAMESPACE = "disagg", "llm"
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    **{
        path.name.removesuffix("-values.yaml"): yaml.safe_load(path.read_text())
        for path in sorted((CHART / "ci").glob("*-values.yaml"))
    },
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
POD_ROLES = ("prefill", "decode", "attention")


def render_files(values: Mapping[str, Any], *, name: str = RELEASE) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(dict(values))
        return chart.render(dict(values), name=name, namespace=NAMESPACE)


def render(values: Mapping[str, Any], *, name: str = RELEASE) -> list[dict[str, Any]]:
    """Every object the release renders (hooks included), parsed."""
    docs: list[dict[str, Any]] = []
    for path, text in render_files(values, name=name).items():
        if path.endswith(".txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} {kind} objects named {name}")
    return matches[0]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod template-like {metadata, spec}) for every workload and bare Pod."""
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield doc, doc["spec"]["template"]
        elif doc["kind"] == "Pod":
            yield doc, doc


def is_hook(doc: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def workload(docs: list[dict[str, Any]], role: str, pool: str = "main") -> dict[str, Any]:
    name = f"{RELEASE}-{role}" + (f"-{pool}" if role in POD_ROLES else "")
    kind = "StatefulSet" if role in ("attention", "redis") else "Deployment"
    return named(docs, kind, name)


def container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    if len(containers) != 1:
        raise LookupError(f"{doc['metadata']['name']} runs {len(containers)} containers")
    return containers[0]


def flags(argv: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a map (the chart writes every flag in that form)."""
    return dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)


def secret_data(docs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(Secret name, key) -> value of every Secret the release renders."""
    out = {}
    for doc in of_kind(docs, "Secret"):
        for key, value in (doc.get("stringData") or {}).items():
            out[(doc["metadata"]["name"], key)] = value
    return out


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(slots=True)
class Resolver:
    """The kubelet's part: downward API fields, Secret keys and `$(VAR)` expansion."""

    fields: dict[str, str]  # fieldPath -> value, e.g. {"status.podIP": "127.0.0.1"}
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)

    def value(self, var: dict[str, Any], env: dict[str, str]) -> str:
        if "value" in var:
            return self.expand(str(var["value"]), env)
        source = var["valueFrom"]
        if "fieldRef" in source:
            return self.fields[source["fieldRef"]["fieldPath"]]
        ref = source["secretKeyRef"]
        return self.secrets[(ref["name"], ref["key"])]

    @staticmethod
    def expand(text: str, env: dict[str, str]) -> str:
        """$(NAME) of a variable defined earlier is replaced; unknown references stay, as in Kubernetes."""
        return _REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def command_line(spec: dict[str, Any], resolver: Resolver) -> tuple[list[str], dict[str, str]]:
    """The argv and environment a container of this spec starts with."""
    env: dict[str, str] = {}
    for var in spec.get("env", []):
        env[var["name"]] = resolver.value(var, env)
    argv = [Resolver.expand(arg, env) for arg in [*spec.get("command", []), *spec.get("args", [])]]
    return argv, env
