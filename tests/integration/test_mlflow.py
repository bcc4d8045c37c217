"""tracking.report_to: [mlflow] against a real MLflow server on 127.0.0.1 started by the test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import run_kubetune

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("mlflow") or str(Path(os.sys.executable).parent / "mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # own group: kill it whole
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_params_loss_and_eval_reach_mlflow(write_spec, mlflow_server: str, tmp_path: Path) -> None:
    import json

    from mlflow.tracking import MlflowClient

    spec = write_spec(name="mlf", train={"max_steps": 10, "logging_steps": 2},
                      tracking={"report_to": ["mlflow"], "mlflow_uri": mlflow_server, "experiment": "kubetune-tests"},
                      eval={"metrics": ["loss", "rouge"], "num_samples": 4, "max_new_tokens": 8})
    res = run_kubetune("train", str(spec), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("kubetune-tests")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'mlf'")
    assert len(runs) == 1
    run = runs[0]
    assert float(run.data.params["learning_rate"]) == pytest.approx(3e-3)
    assert run.data.params["gradient_accumulation_steps"] == "1"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10]
    assert all(m.value > 0 for m in history)
    # the final evaluation (base and tuned) and its report reach the same run
    metrics = json.loads((tmp_path / "runs" / "mlf" / "eval" / "metrics.json").read_text())
    for model in ("base", "tuned"):
        for key in ("loss", "rougeL"):
            (point,) = client.get_metric_history(run.info.run_id, f"eval/{model}/{key}")
            assert point.step == 10 and point.value == pytest.approx(metrics[model][key], rel=1e-5)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/report.md"]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
