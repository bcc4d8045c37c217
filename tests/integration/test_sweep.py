"""`kubetune sweep`: deterministic names and outputs, local runs two at a time, ranking by an eval
metric, and N Jobs with the sweep label on Kubernetes (HTTP server speaking the API)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_kubetune
from tests.k8s_server import FakeKubernetes

pytestmark = pytest.mark.integration


def test_local_sweep_runs_every_combination_and_ranks_them(write_spec, tmp_path: Path) -> None:
    spec = write_spec("sw", train={"max_steps": 12, "save_every_steps": 12},
                      eval={"metrics": ["loss"], "num_samples": 4, "max_new_tokens": 8},
                      output=str(tmp_path / "runs" / "sw"))
    res = run_kubetune("sweep", str(spec), "--grid", "train.learning_rate=1e-5,3e-3", "--parallel", "2", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 finished, 0 failed" in res.stdout
    losses = {}
    for name in ("sw-lr1e-5", "sw-lr3e-3"):
        run = tmp_path / "runs" / name
        assert (run / "final" / "COMPLETE").exists()
        losses[name] = json.loads((run / "eval" / "metrics.json").read_text())["tuned"]["loss"]
    res = run_kubetune("sweep", "status", str(spec), "--grid", "train.learning_rate=1e-5,3e-3", "--metric", "loss")
    assert res.returncode == 0, res.stderr
    ranked = [line.split()[1] for line in res.stdout.splitlines()[2:]]
    assert ranked == sorted(losses, key=losses.get)  # lower loss first
    assert "ranked by loss (lower is better)" in res.stdout


def test_sweep_names_are_deterministic_and_valid(cli, write_spec) -> None:
    code, out, err = cli("sweep", str(write_spec("base")), "--grid", "method.lora.r=4,16",
                         "--grid", "train.learning_rate=1e-4,2.5e-4", "--dry-run")
    assert code == 0, err
    assert "base-r4-lr1e-4, base-r4-lr2p5e-4, base-r16-lr1e-4, base-r16-lr2p5e-4" in out
    code, _, err = cli("sweep", str(write_spec("base")), "--grid", "method.lora.r=4,nope", "--dry-run")
    assert code == 2 and "method.lora.r" in err  # every combination is checked before anything starts


def test_k8s_sweep_submits_one_labelled_job_per_run(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKubernetes()
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
    try:
        spec = Path(__file__).resolve().parents[2] / "examples" / "d-minio-lora-sweep.yaml"
        code, out, err = cli("sweep", str(spec), "--grid", "method.lora.r=4,8,16", "--target", "k8s")
        assert code == 0, err
        jobs = {k[2]: o for k, o in fake.objects.items() if k[0] == "jobs"}
        assert set(jobs) == {"tinyllama-chat-r4", "tinyllama-chat-r8", "tinyllama-chat-r16"}
        for name, job in jobs.items():
            labels = job["metadata"]["labels"]
            assert labels["kubetune.dev/sweep"] == "tinyllama-chat" and labels["kueue.x-k8s.io/queue-name"] == "team-a-queue"
            cm = fake.get("configmaps", "team-a", f"{name}-spec")
            assert f"output: s3://experiments/{name}" in cm["data"]["spec.yaml"]
    finally:
        fake.stop()
