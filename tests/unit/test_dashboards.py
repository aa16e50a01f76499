"""The shipped Grafana dashboards and recording rules: the committed JSON is what the generator builds,
every panel query uses the template variables and `$__rate_interval`, and names only metrics that
exist (docs/metrics.md) or series the shipped rules record. Whether each query returns data is checked
against a real Prometheus in tests/integration/test_prometheus.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from services.core.metrics import ALL_METRICS
from services.dashboards import DASHBOARDS, FOLDER, render

RULES = FOLDER.parent / "rules"
SERIES = re.compile(r"\b(disagg(?:_|:)[a-z0-9_:]+)")


def recorded_names() -> set[str]:
    return set(
        re.findall(r"^\s*- record: (\S+)$", "".join(p.read_text() for p in RULES.glob("*.yaml")), re.M)
    )


def exported_names(with_label: str = "") -> set[str]:
    """Series names the processes export (histograms: their _bucket, _sum, _count), optionally only
    those of metrics carrying a label."""
    names = set()
    for spec in ALL_METRICS:
        if with_label and with_label not in spec.labels:
            continue
        names.add(spec.name)
        if spec.kind == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
    return names


@pytest.mark.parametrize("key", list(DASHBOARDS))
def test_committed_json_is_what_the_generator_builds(key: str) -> None:
    assert (FOLDER / f"{key}.json").read_text() == render(key), "run: python -m services.dashboards --write"


@pytest.mark.parametrize("key", list(DASHBOARDS))
def test_panels_use_template_variables_and_known_series(key: str) -> None:
    board = json.loads((FOLDER / f"{key}.json").read_text())
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "model", "tenant"} <= variables
    known = exported_names() | recorded_names()
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert '"$model"' in expr, (panel["title"], expr)
            assert re.findall(r"\[(.*?)\]", expr) == ["$__rate_interval"] * expr.count("["), expr
            for name in SERIES.findall(expr):
                assert name in known, f"{panel['title']}: {name} is neither exported nor recorded"
            if set(SERIES.findall(expr)) & exported_names(with_label="tenant"):
                assert '"$tenant"' in expr, (panel["title"], expr)


def test_recording_rules_pass_promtool_and_read_exported_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed; make setup installs it")
    files = sorted(str(p) for p in RULES.glob("*.yaml"))
    assert files
    result = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = "".join(Path(f).read_text() for f in files)
    exprs = " ".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "- record:")))
    for name in SERIES.findall(exprs):
        assert name in exported_names() | recorded_names(), name
