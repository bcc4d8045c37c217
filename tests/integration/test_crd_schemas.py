"""Custom resources kubetune renders, against their project's own schema where a registry ships it:
the ServiceMonitor against prometheus-operator's CRD schema (npm's @kubernetes-models/prometheus-operator,
generated from the CRDs, validated by its own validator under node), the ScaledObject against KEDA's
(@kubernetes-models/keda). The check must be able to fail:
a deliberately broken copy is rejected."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.families import cache_dir
from tests.unit.test_render import by_kind, rendered

pytestmark = pytest.mark.integration
PACKAGE, VERSION = "@kubernetes-models/prometheus-operator", "6.0.0"
KEDA, KEDA_VERSION = "@kubernetes-models/keda", "2.0.0"
SCRIPT = """
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { readFileSync } from "node:fs";
for (const path of process.argv.slice(2)) {
  try { new ServiceMonitor(JSON.parse(readFileSync(path, "utf8"))).validate(); console.log("valid"); }
  catch (e) { console.log("invalid: " + e.message.split("\\n")[0]); }
}
"""
KEDA_SCRIPT = SCRIPT.replace("ServiceMonitor", "ScaledObject").replace(
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/", "@kubernetes-models/keda/keda.sh/v1alpha1/")


def validator(package: str = PACKAGE, version: str = VERSION, script: str = SCRIPT) -> Path:
    folder = cache_dir() / f"kubernetes-models-{package.rsplit('/', 1)[1]}-{version}"
    if not (folder / "node_modules" / package / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder),
                        f"{package}@{version}"], check=True, capture_output=True, timeout=600)
    (folder / "check.mjs").write_text(script)
    return folder


def test_the_scaled_object_is_valid_for_keda(tmp_path: Path) -> None:
    scaled = by_kind(rendered("b-summarise-qlora-serve.yaml", "serve", "serve.autoscaling.monitoring=keda"),
                     "ScaledObject")[0]
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicaCount"] = "one"  # a string where the CRD says an integer
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(scaled))
    bad.write_text(json.dumps(broken))
    folder = validator(KEDA, KEDA_VERSION, KEDA_SCRIPT)
    res = subprocess.run(["node", str(folder / "check.mjs"), str(good), str(bad)], cwd=folder, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert first == "valid" and second.startswith("invalid: data/spec/minReplicaCount must be integer"), res.stdout


def test_the_service_monitor_is_valid_for_prometheus_operator(tmp_path: Path) -> None:
    monitor = by_kind(rendered("b-summarise-qlora-serve.yaml", "serve", "serve.autoscaling.monitoring=servicemonitor"),
                      "ServiceMonitor")[0]
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["interval"] = 15  # a number where the CRD says a duration string
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(monitor))
    bad.write_text(json.dumps(broken))
    folder = validator()
    res = subprocess.run(["node", str(folder / "check.mjs"), str(good), str(bad)], cwd=folder, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert first == "valid" and second.startswith("invalid: data/spec/endpoints/0/interval must be string"), res.stdout
