"""Custom resources kubetune renders, against their project's own schema where a registry ships it:
the ServiceMonitor against prometheus-operator's CRD schema (npm's @kubernetes-models/prometheus-operator,
generated from the CRDs, validated by its own validator under node). The check must be able to fail:
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
SCRIPT = """
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { readFileSync } from "node:fs";
for (const path of process.argv.slice(2)) {
  try { new ServiceMonitor(JSON.parse(readFileSync(path, "utf8"))).validate(); console.log("valid"); }
  catch (e) { console.log("invalid: " + e.message.split("\\n")[0]); }
}
"""


def validator() -> Path:
    folder = cache_dir() / f"kubernetes-models-prometheus-operator-{VERSION}"
    if not (folder / "node_modules" / PACKAGE / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder),
                        f"{PACKAGE}@{VERSION}"], check=True, capture_output=True, timeout=600)
    (folder / "check.mjs").write_text(SCRIPT)
    return folder


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
