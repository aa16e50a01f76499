"""The Helm chart, rendered by the real Helm engine for its defaults and every ci/*-values.yaml variant:
strict lint for Kubernetes 1.30, every object against the official 1.30 schemas (strict) or
prometheus-operator's CRD models, and the properties an operator relies on (probes, requests,
non-root, selectors that match, what the NetworkPolicies admit, the dashboards and rules shipped).

How the rendered commands start real processes: tests/integration/test_helm_serve.py. The values
schema, the template's own errors and the image: tests/unit/test_helm_values.py.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from pydantic import BaseModel

from tests.helm_chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    VARIANTS,
    component,
    container,
    flags,
    is_hook,
    named,
    of_kind,
    pod_templates,
    render,
    workload,
)

KUBE_VERSION = "1.30.0"
COMPONENTS = {"gateway", "prefill", "decode", "attention", "redis", "test"}
CRDS: dict[str, type[BaseModel]] = {
    "ServiceMonitor": prometheus_operator.ServiceMonitor,
    "PrometheusRule": prometheus_operator.PrometheusRule,
}


class _Rendered(dict[str, list[dict[str, Any]]]):
    """Each variant rendered once, when a test first asks for it (so that a variant that cannot
    render fails its own tests only)."""

    def __missing__(self, variant: str) -> list[dict[str, Any]]:
        self[variant] = render(VARIANTS[variant])
        return self[variant]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return _Rendered()


def test_variants_cover_the_acceptance_list() -> None:
    assert set(VARIANTS) >= {
        "default",
        "gpu-rdma",
        "two-attention-pools",
        "external-redis",
        "monitoring",
        "autoscaling",
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lint_strict_for_kubernetes_1_30(variant: str) -> None:
    # Helm lints templates with `fail` made non-fatal (it only logs); the template's own errors
    # are caught by rendering, in every other test here.
    report = helm.lint(str(CHART), VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings count: strict
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_validates_strictly(variant: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    for doc in rendered[variant]:
        where = f"{variant}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in CRDS:
            model = CRDS[doc["kind"]].model_validate(doc)
            # The models ignore unknown keys; a round trip that loses one is a typo in the template.
            assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc, where
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
                pytest.fail(f"{where}: {exc.message}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pods_are_probed_requested_and_unprivileged(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for obj, pod in pod_templates(rendered[variant]):
        spec, where = pod["spec"], f"{variant}: {obj['kind']} {obj['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where  # else DISAGG_GATEWAY_PORT=tcp://... leaks in
        for c in spec["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            if not is_hook(obj):  # the helm test pod runs to completion: nothing to probe
                assert "readinessProbe" in c and "livenessProbe" in c, where
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        if component(obj) != "redis":
            assert "/tmp" in mounts or is_hook(obj), where


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_labels_and_selectors_match(variant: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[variant]
    pods = list(pod_templates(docs))
    for obj, pod in pods:
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "disagg"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/component"] in COMPONENTS
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in of_kind(docs, "Service"):
        selected = [
            pod for _, pod in pods if svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ]
        assert selected, f"{variant}: Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for pod in selected:
                names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, f"{svc['metadata']['name']}: {port}"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= pod["metadata"]["labels"].items() for _, pod in pods)
    for sts in of_kind(docs, "StatefulSet"):
        governing = named(docs, "Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_the_gateway_is_reachable_from_outside(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Every pod is selected by a policy admitting release pods; other peers reach only the
    gateway, or the metrics ports when metricsFrom names them."""
    docs = rendered[variant]
    release = {"app.kubernetes.io/name": "disagg", "app.kubernetes.io/instance": RELEASE}
    policies = of_kind(docs, "NetworkPolicy")
    for _, pod in pod_templates(docs):
        labels = pod["metadata"]["labels"]
        assert any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for p in policies)
    for policy in policies:
        selects_gateway_only = policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for rule in policy["spec"]["ingress"]:
            peers = rule.get("from")
            if peers == [{"podSelector": {"matchLabels": release}}]:
                continue  # the release itself
            ports = {p["port"] for p in rule.get("ports", [])}
            assert selects_gateway_only == "gateway" or ports <= {"metrics", "http"}, policy
            if selects_gateway_only != "gateway":
                assert peers == VARIANTS[variant]["networkPolicy"]["metricsFrom"], policy


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grace_periods_cover_shutdown(variant: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A pod's stop waits its shutdown grace + 5 s; the gateway's adds its preStop pause and a 5 s margin."""
    docs = rendered[variant]
    for doc in [*of_kind(docs, "Deployment"), *of_kind(docs, "StatefulSet")]:
        role, spec = component(doc), doc["spec"]["template"]["spec"]
        if role == "redis":
            continue
        f = flags(container(doc)["args"])
        if role == "gateway":
            pause = int(container(doc)["lifecycle"]["preStop"]["exec"]["command"][1])
            needed = pause + float(f["shutdown-grace"]) + 5
        else:
            needed = float(f["shutdown-grace-s"]) + 5
        assert spec["terminationGracePeriodSeconds"] > needed, doc["metadata"]["name"]


def test_default_install(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    kinds = {doc["kind"] for doc in docs}
    assert kinds >= {"ServiceAccount", "Secret", "Service", "Deployment", "StatefulSet", "NetworkPolicy"}
    assert kinds.isdisjoint({"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "Ingress"})
    assert workload(docs, "attention")["spec"]["replicas"] == 2
    redis_url = f"redis://{RELEASE}-redis.{NAMESPACE}.svc.cluster.local:6379/0"  # Service DNS
    for role in ("prefill", "decode", "attention"):
        env = {v["name"]: v for v in container(workload(docs, role))["env"]}
        assert env[f"DISAGG_{role.upper()}_REDIS_URL"]["value"] == redis_url
        assert env["DISAGG_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["DISAGG_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-redis"
    hooks = [doc for doc in docs if is_hook(doc)]
    assert [doc["metadata"]["annotations"]["helm.sh/hook"] for doc in hooks] == ["test"]
    notes = next(text for path, text in _files({}).items() if path.endswith("NOTES.txt"))
    assert f"port-forward svc/{RELEASE}-gateway" in notes and '"model": "smollm2-135m"' in notes


def test_gpu_pools_request_accelerators_and_rdma(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu-rdma"]
    for role, pool in (("prefill", "h100"), ("decode", "h100"), ("attention", "l40s")):
        c = container(workload(docs, role, pool))
        for kind in ("requests", "limits"):
            assert c["resources"][kind]["nvidia.com/gpu"] == 1
            assert c["resources"][kind]["rdma/rdma_shared_device_a"] == 1
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        assert c["image"].endswith(":0.1.0-cuda")
        f = flags(c["args"])
        assert (f["device"], f["dtype"]) == ("cuda", "bfloat16")
        if role != "decode":
            assert f["transport"] == "nixl"
    decode = workload(docs, "decode", "h100")["spec"]["template"]["spec"]
    assert decode["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert decode["runtimeClassName"] == "nvidia"
    shm = next(v for v in decode["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_two_attention_pools_of_different_hardware(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["two-attention-pools"]
    gpu, dram = workload(docs, "attention", "gpu"), workload(docs, "attention", "dram")
    assert gpu["spec"]["template"]["spec"]["nodeSelector"] != dram["spec"]["template"]["spec"]["nodeSelector"]
    gf, df = flags(container(gpu)["args"]), flags(container(dram)["args"])
    assert (gf["cost-usd-per-hour"], df["cost-usd-per-hour"]) == ("1.1", "0.35")
    assert (gf["kv-budget-bytes"], df["kv-budget-bytes"]) == ("21474836480", "53687091200")
    denv = {v["name"]: v.get("value") for v in container(dram)["env"]}
    assert (denv["DISAGG_ATTENTION_DEFAULT_POLICY"], denv["DISAGG_ATTENTION_DEFAULT_BUDGET"]) == (
        "sparq",
        "0.125",
    )
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(dram)["resources"]["limits"]
    # Stable identities: each pool a StatefulSet with its own headless Service.
    for sts in (gpu, dram):
        assert named(docs, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_external_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["external-redis"]
    assert not [doc for doc in docs if doc["metadata"]["name"].startswith(f"{RELEASE}-redis")]
    gateway = container(workload(docs, "gateway"))
    for c, var in [(gateway, "DISAGG_CLUSTER_REDIS_URL")] + [
        (container(workload(docs, role)), f"DISAGG_{role.upper()}_REDIS_URL")
        for role in ("prefill", "decode")
    ]:
        env = {v["name"]: v for v in c["env"]}
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "disagg-redis-url", "key": "url"}
        password = env["DISAGG_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": "disagg-redis-password", "key": "password"}
    volumes = workload(docs, "gateway")["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "api-keys",
        "secret": {"secretName": "disagg-bootstrap-keys", "defaultMode": 0o440},
    } in volumes
    assert not of_kind(docs, "Secret")  # both Secrets are the operator's


def test_monitoring_ships_every_dashboard_and_rule(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    rule_files = sorted((CHART / "rules").glob("*.yaml"))
    assert dashboards, "no dashboards in deploy/helm/disagg/dashboards/ (the observability work ships them)"
    assert rule_files, "no recording rules in deploy/helm/disagg/rules/ (the observability work ships them)"
    docs = rendered["monitoring"]
    maps = [
        doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert sorted(key for doc in maps for key in doc["data"]) == [path.name for path in dashboards]
    for doc in maps:
        ((name, text),) = doc["data"].items()
        assert text.strip() == (CHART / "dashboards" / name).read_text().strip()
    (rule,) = of_kind(docs, "PrometheusRule")
    expected = [group for path in rule_files for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected and all(group["rules"] for group in expected)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (monitor,) = of_kind(docs, "ServiceMonitor")
    scraped = [
        svc
        for svc in of_kind(docs, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ]
    assert {component(svc) for svc in scraped} == {"gateway", "prefill", "decode", "attention"}
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(ports & {p["name"] for p in svc["spec"]["ports"]} for svc in scraped)
    # Pods label their own series (pod, role, model): the rules and dashboards group by those.
    assert all(e["honorLabels"] is True for e in monitor["spec"]["endpoints"])


def test_autoscaling(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["autoscaling"]
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {f"{RELEASE}-gateway", f"{RELEASE}-prefill-main", f"{RELEASE}-decode-main"}
    for target, hpa in hpas.items():
        assert "replicas" not in named(docs, "Deployment", target)["spec"]  # the HPA owns it
        assert hpa["spec"]["minReplicas"] >= 1
    assert hpas[f"{RELEASE}-decode-main"]["spec"]["minReplicas"] == 2
    (ingress,) = of_kind(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-gateway", "port": {"name": "http"}}
    assert "replicas" in workload(docs, "attention")["spec"]


def test_model_on_a_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["model-pvc"]
    for role in ("gateway", "prefill", "decode", "attention"):
        doc = workload(docs, role)
        spec, c = doc["spec"]["template"]["spec"], container(doc)
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in spec[
            "volumes"
        ]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
        assert flags(c["args"])["model"] == "/models/qwen2.5-0.5b-instruct"
    served = [a for a in container(workload(docs, "gateway"))["args"] if a.startswith("--served-model-name")]
    assert served == ["--served-model-name=qwen2.5-0.5b-instruct", "--served-model-name=default"]


def _files(values: dict[str, Any]) -> dict[str, str]:
    from tests.helm_chart import render_files

    return render_files(values)


def test_gguf_on_a_host_path(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["model-hostpath"]
    decode = workload(docs, "decode")
    spec, c = decode["spec"]["template"]["spec"], container(decode)
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model["hostPath"] == {"path": "/mnt/models", "type": "Directory"}
    assert flags(c["args"])["model"] == "/models/SmolLM2-360M-Instruct.Q8_0.gguf"
    env = {v["name"]: v.get("value") for v in c["env"]}
    assert env["DISAGG_CACHE_DIR"] == "/var/cache/disagg"  # the conversion's writable emptyDir
    assert {"name": "model-cache", "mountPath": "/var/cache/disagg"} in c["volumeMounts"]
    served = [a for a in container(workload(docs, "gateway"))["args"] if a.startswith("--served-model-name")]
    assert served == ["--served-model-name=SmolLM2-360M-Instruct.Q8_0"]
    redis = container(workload(docs, "redis"))
    assert "--requirepass" not in redis["args"] and "--protected-mode" in redis["args"]
    assert "DISAGG_REDIS_PASSWORD" not in env and "DISAGG_GATEWAY_API_KEYS_FILE" not in {
        v["name"] for v in container(workload(docs, "gateway"))["env"]
    }
