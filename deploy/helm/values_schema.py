"""Generate deploy/helm/disagg/values.schema.json: the chart's shape, plus each pod's settings taken
from its pydantic settings class, so the Helm values cannot drift from what `disagg serve` accepts.

    python deploy/helm/values_schema.py           # rewrite the schema
    python deploy/helm/values_schema.py --check   # exit 1 when the committed file is stale

A pool's `settings` map holds the fields of the role's settings class that the chart does not
manage itself (CHART_MANAGED: the chart sets those from its own values, e.g. the port, the model,
the price). Each becomes a `--field-name` flag, so the schema carries pydantic's own types and
bounds for it. tests/unit/test_helm_chart.py fails when the committed schema differs from this output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

# The settings of this checkout (not of whichever disagg the interpreter has installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.attention.server import AttentionSettings
from services.decode.server import DecodeSettings
from services.gateway.cluster import ClusterSettings
from services.gateway.settings import GatewaySettings
from services.prefill.server import PrefillSettings

SCHEMA_PATH = Path(__file__).parent / "disagg" / "values.schema.json"
ROLE_SETTINGS: dict[str, type[BaseSettings]] = {
    "prefill": PrefillSettings,
    "decode": DecodeSettings,
    "attention": AttentionSettings,
}
# Fields the chart sets from its own values (or passes as env vars, for fields other work adds).
CHART_MANAGED = {
    "host": "0.0.0.0, so the pod is reachable on its pod IP",
    "port": "<role>.port, the same in every pool of a role (probes and Services use it)",
    "pod_id": "the pod's name (downward API)",
    "redis_url": "the release's Redis or redis.external",
    "model": "model.*",
    "dtype": "model.dtype, one for the release",
    "device": "the pool's device",
    "transport": "the pool's transport (else the release's)",
    "cost_usd_per_hour": "the pool's costUsdPerHour",
    "torch_threads": "the pool's torchThreads",
    "shutdown_grace_s": "the pool's shutdownGraceSeconds (it also sets terminationGracePeriodSeconds)",
    "step_port": "attention.stepPort, like the gRPC port the same in every attention pool",
    "metrics_port": "the pool's metrics.port (env DISAGG_<ROLE>_METRICS_PORT)",
    "default_policy": "the attention pool's attentionPolicy.name",
    "default_budget": "the attention pool's attentionPolicy.budget",
}
GATEWAY_MANAGED = {
    "host",
    "port",
    "served_model_names",
    "shutdown_grace_seconds",
    "cost_usd_per_hour",
    "api_keys_file",
}
CLUSTER_MANAGED = {"redis_url"}
POOL_KEYS_FROM_SETTINGS = {
    "costUsdPerHour": "cost_usd_per_hour",
    "torchThreads": "torch_threads",
    "shutdownGraceSeconds": "shutdown_grace_s",
}
POLICIES = ["dense", "sink_window", "heavy_hitter", "sparq", "quest"]


# ---- small builders ----------------------------------------------------------------------------
def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A closed object: unknown keys are an error (typos fail at install, not silently)."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return {**schema, **extra}


def s(description: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {}), **kw}


def i(minimum: int | None = 0, maximum: int | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", **kw}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def num(minimum: float = 0, **kw: Any) -> dict[str, Any]:
    return {"type": "number", "minimum": minimum, **kw}


BOOL = {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
K8S_OBJECT = {"type": "object", "description": "passed to Kubernetes as is"}
K8S_LIST = {"type": "array", "items": {"type": "object"}, "description": "passed to Kubernetes as is"}
QUANTITY = {"type": ["string", "number"]}
RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    },
    required=["requests"],  # every container requests resources
)
ENV_LIST = {
    "type": "array",
    "items": {"type": "object", "required": ["name"], "properties": {"name": s()}},
}
DNS_LABEL = s(pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=16)
NULLABLE_SECONDS = {"type": ["integer", "null"], "minimum": 1}
SCHEDULING = {
    "nodeSelector": STRING_MAP,
    "affinity": K8S_OBJECT,
    "tolerations": K8S_LIST,
    "topologySpreadConstraints": K8S_LIST,
    "priorityClassName": s(),
}
PDB = obj({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}})


def autoscaling() -> dict[str, Any]:
    return obj(
        {
            "enabled": BOOL,
            "minReplicas": i(1),
            "maxReplicas": i(1),
            "targetCPUUtilizationPercentage": i(1, 100),
        }
    )


# ---- settings from the code --------------------------------------------------------------------
def field_schemas(settings: type[BaseSettings], managed: set[str]) -> dict[str, Any]:
    """pydantic's JSON schema of each unmanaged field, with $refs inlined and titles dropped."""
    full = settings.model_json_schema()
    defs = full.get("$defs", {})
    return {
        name: _clean(prop, defs)
        for name, prop in full["properties"].items()
        if name not in managed and name in settings.model_fields
    }


def _clean(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:  # the definition, plus the field's own description and default
            siblings = {k: v for k, v in node.items() if k not in ("$ref", "title")}
            return {**_clean(defs[node["$ref"].rsplit("/", 1)[1]], defs), **siblings}
        return {k: _clean(v, defs) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_clean(v, defs) for v in node]
    return node


def settings_map(settings: type[BaseSettings], managed: set[str], what: str) -> dict[str, Any]:
    return obj(field_schemas(settings, managed), description=what)


# ---- the chart -----------------------------------------------------------------------------------
def pool_properties(role: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "name": DNS_LABEL,
        "replicas": i(0),
        "device": s("torch device", pattern="^(cpu|cuda(:[0-9]+)?)$"),
        "image": obj({"repository": s(), "tag": s()}),
        "costUsdPerHour": num(),
        "torchThreads": i(0, 1024),
        "shutdownGraceSeconds": num(),
        "terminationGracePeriodSeconds": NULLABLE_SECONDS,
        "gpus": i(0),
        "gpuResourceName": s(),
        "rdma": obj({"resourceName": s(), "count": i(1)}),
        "resources": RESOURCES,
        "shmSizeLimit": QUANTITY,
        "runtimeClassName": s(),
        **SCHEDULING,
        "podAnnotations": STRING_MAP,
        "podLabels": STRING_MAP,
        "extraEnv": ENV_LIST,
        "metrics": obj({"port": i(1, 65535)}),
        "startupProbe": obj({"periodSeconds": i(1), "failureThreshold": i(1)}),
        "pdb": PDB,
        "autoscaling": autoscaling(),
    }
    if role != "decode":  # decode pods receive no bulk K/V
        props["transport"] = s(enum=["grpc", "nixl"])
    if role in ("attention", ""):
        props["attentionPolicy"] = obj({"name": s(enum=POLICIES), "budget": num(exclusiveMinimum=0)})
    if role:
        settings = ROLE_SETTINGS[role]
        # Pool keys that are settings under another name carry the setting's own bounds.
        fields = field_schemas(settings, set())
        for key, name in POOL_KEYS_FROM_SETTINGS.items():
            props[key] = {k: v for k, v in fields[name].items() if k != "default"}
        props["settings"] = settings_map(
            settings, set(CHART_MANAGED), f"{settings.__name__} fields, as flags --field-name"
        )
    return props


def role_schema(role: str) -> dict[str, Any]:
    pool = obj(pool_properties(role), required=["name"])
    defaults = obj({k: v for k, v in pool_properties(role).items() if k != "name"})
    ports = {"port": i(1, 65535), **({"stepPort": i(1, 65535)} if role == "attention" else {})}
    return obj(
        {
            **ports,
            "defaults": defaults,
            "pools": {"type": "array", "minItems": 0 if role == "prefill" else 1, "items": pool},
        },
        required=[*ports, "pools"],
    )


def gateway_schema() -> dict[str, Any]:
    return obj(
        {
            "replicas": i(1),
            "port": i(1, 65535),
            "costUsdPerHour": num(),
            "preStopSleepSeconds": i(0),
            "shutdownGraceSeconds": num(),
            "terminationGracePeriodSeconds": NULLABLE_SECONDS,
            "settings": settings_map(GatewaySettings, GATEWAY_MANAGED, "DISAGG_GATEWAY_<FIELD>"),
            "cluster": settings_map(ClusterSettings, CLUSTER_MANAGED, "DISAGG_CLUSTER_<FIELD>"),
            "resources": RESOURCES,
            **SCHEDULING,
            "podAnnotations": STRING_MAP,
            "podLabels": STRING_MAP,
            "extraEnv": ENV_LIST,
            "service": obj(
                {
                    "type": s(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                    "port": i(1, 65535),
                    "annotations": STRING_MAP,
                }
            ),
            "ingress": obj(
                {
                    "enabled": BOOL,
                    "className": s(),
                    "annotations": STRING_MAP,
                    "hosts": {
                        "type": "array",
                        "items": obj(
                            {
                                "host": s(),
                                "paths": {
                                    "type": "array",
                                    "items": obj(
                                        {
                                            "path": s(),
                                            "pathType": s(enum=["Prefix", "Exact", "ImplementationSpecific"]),
                                        },
                                        required=["path", "pathType"],
                                    ),
                                },
                            },
                            required=["host", "paths"],
                        ),
                    },
                    "tls": K8S_LIST,
                }
            ),
            "autoscaling": autoscaling(),
            "pdb": PDB,
        }
    )


def redis_schema() -> dict[str, Any]:
    return obj(
        {
            "external": obj(
                {
                    "url": s(pattern="^(|rediss?://.+)$"),
                    "existingSecret": s(),
                    "existingSecretKey": s(),
                    "passwordSecret": s(),
                    "passwordSecretKey": s(),
                }
            ),
            "image": obj({"repository": s(), "tag": s(), "pullPolicy": s()}),
            "port": i(1, 65535),
            "auth": obj({"enabled": BOOL, "existingSecret": s(), "existingSecretKey": s()}),
            "persistence": obj(
                {
                    "enabled": BOOL,
                    "size": QUANTITY,
                    "storageClassName": s(),
                    "accessModes": {"type": "array", "items": s()},
                }
            ),
            "maxmemory": s(pattern="^[0-9]+(b|kb|mb|gb)?$"),
            "resources": RESOURCES,
            "podSecurityContext": K8S_OBJECT,
            "nodeSelector": STRING_MAP,
            "affinity": K8S_OBJECT,
            "tolerations": K8S_LIST,
        }
    )


def monitoring_schema() -> dict[str, Any]:
    return obj(
        {
            "serviceMonitor": obj(
                {"enabled": BOOL, "interval": s(), "scrapeTimeout": s(), "labels": STRING_MAP}
            ),
            "prometheusRule": obj({"enabled": BOOL, "labels": STRING_MAP}),
            "dashboards": obj(
                {"enabled": BOOL, "namespace": s(), "labels": STRING_MAP, "annotations": STRING_MAP}
            ),
        }
    )


def build_schema() -> dict[str, Any]:
    model = obj(
        {
            "source": s(enum=["bundled", "pvc", "hostPath"]),
            "name": s(enum=["smollm2-135m"]),
            "pvc": obj({"claimName": s()}),
            "hostPath": obj({"path": s()}),
            "path": s(),
            "servedModelNames": {"type": "array", "items": s(minLength=1)},
            "dtype": s(enum=["float32", "bfloat16", "float16"]),
        }
    )
    schema = obj(
        {
            "nameOverride": s(),
            "fullnameOverride": s(),
            "clusterDomain": s(),
            "image": obj(
                {
                    "repository": s(minLength=1),
                    "tag": s(),
                    "cudaTagSuffix": s(),
                    "pullPolicy": s(enum=["Always", "IfNotPresent", "Never"]),
                }
            ),
            "imagePullSecrets": K8S_LIST,
            "serviceAccount": obj({"create": BOOL, "name": s(), "annotations": STRING_MAP}),
            "model": model,
            "transport": s(enum=["grpc", "nixl"]),
            "podSecurityContext": K8S_OBJECT,
            "securityContext": K8S_OBJECT,
            "gateway": gateway_schema(),
            "apiKeys": obj(
                {
                    "enabled": BOOL,
                    "existingSecret": s(),
                    "keys": {
                        "type": "array",
                        "items": obj(
                            {"tenant": s(minLength=1), "key": s(minLength=8)}, required=["tenant", "key"]
                        ),
                    },
                }
            ),
            "poolDefaults": obj({k: v for k, v in pool_properties("").items() if k != "name"}),
            **{role: role_schema(role) for role in ROLE_SETTINGS},
            "redis": redis_schema(),
            "monitoring": monitoring_schema(),
            "networkPolicy": obj({"enabled": BOOL, "gatewayFrom": K8S_LIST, "metricsFrom": K8S_LIST}),
            "tests": obj({"prompt": s(minLength=1), "expectContains": s(), "resources": RESOURCES}),
        },
    )
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "disagg chart values", **schema}


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed file")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python deploy/helm/values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
