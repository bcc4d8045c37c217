"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): it lists a job's run
with its loss curve, shows the eval report base vs tuned, ranks a sweep with overlaid curves, and the
playground gets the model's answer. The screenshot is kept in test-artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import QUICKSTART_DATA, ROOT
from tests.integration.test_control import FAST, MODEL, Control, wait_for

pytestmark = pytest.mark.integration

KEY = "kt-dashboard-test-key-0123456789abcdef"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is not installed: `make test` installs it (scripts/system-deps.sh), or apt-get install chromium"
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Control, dict[str, str]]]:
    """A server with three succeeded jobs: one evaluated (base vs tuned), two of a learning-rate sweep."""
    server = Control(tmp_path_factory.mktemp("dash") / "home", "--api-key", KEY).start()
    client = server.client(KEY)
    train = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
    valid = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
    steps = {**FAST["train"], "max_steps": 60}
    jobs = {"evaluated": client.fine_tuning.jobs.create(
        model=MODEL, training_file=train.id, validation_file=valid.id, suffix="eval",
        extra_body={"kubetune": {**FAST, "train": {**steps, "max_steps": 200}, "eval": {"metrics": ["loss", "rouge"], "num_samples": 4,
                                                                   "max_new_tokens": 16}}})}
    for lr in (1.0, 0.05):
        jobs[f"lr{lr}"] = client.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, suffix=f"lr{str(lr).replace('.', '')}",
            hyperparameters={"learning_rate_multiplier": lr * 15}, metadata={"sweep": "lr-sweep"},
            extra_body={"kubetune": {**FAST, "train": {k: v for k, v in steps.items() if k != "learning_rate"}}})
    for job in jobs.values():
        done = wait_for(job.id, lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed") and j, 300)
        assert done.status == "succeeded", done.error
    yield server, {k: client.fine_tuning.jobs.retrieve(j.id).fine_tuned_model or "" for k, j in jobs.items()} | {
        f"id:{k}": j.id for k, j in jobs.items()}
    server.stop()


def test_dashboard_in_chromium(trained: tuple[Control, dict[str, str]]) -> None:
    from playwright.sync_api import sync_playwright

    server, jobs = trained
    question = "Spell ship."  # a form the quickstart data teaches
    expected = server.client(KEY).chat.completions.create(
        model=jobs["evaluated"], messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=256).choices[0].message.content
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(server.url + "/")
            page.wait_for_selector("#status:has-text('API key')")  # the data needs the key
            page.fill("#key", KEY)
            page.click("#key-form button")
            job_id = jobs["id:evaluated"]
            page.click(f"#runs tbody tr[data-id='{job_id}']")
            page.wait_for_selector(f"#detail[data-id='{job_id}']")
            curve = page.wait_for_selector("#loss-chart path.series[data-name='train loss']")
            # logging every 10 of 200 steps (a slow answer for the run shown first — a 60-step sweep run, 6
            # points — once landed after this one and drew its curve here: a stale answer is dropped now)
            assert int(curve.get_attribute("data-points") or 0) == 20
            assert page.locator("#runs tbody tr[data-id='%s'] .badge" % job_id).inner_text() == "succeeded"
            page.wait_for_selector("#eval-samples tbody tr")
            samples = page.locator("#eval-samples tbody tr")
            assert samples.count() == 4
            assert all(samples.nth(i).locator("td").nth(2).inner_text().strip() != "–" for i in range(4))  # base
            assert page.locator("#eval-metrics thead th").all_text_contents() == ["metric", "base", "tuned"]
            page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)

            page.click("nav button[data-tab='sweeps']")
            sweep = page.wait_for_selector(".sweep[data-sweep='lr-sweep']")
            assert sweep is not None
            ranked = page.locator(".sweep[data-sweep='lr-sweep'] tbody tr")
            assert ranked.count() == 2
            assert jobs["lr1.0"] in ranked.nth(0).inner_text()  # the higher learning rate reaches the lower loss
            page.wait_for_function("document.querySelectorAll(\".sweep[data-sweep='lr-sweep'] path.series\").length == 2")
            page.screenshot(path=str(ARTIFACTS / "dashboard-sweep.png"), full_page=True)

            page.click("nav button[data-tab='playground']")
            page.wait_for_selector(f"#model option[value='{jobs['evaluated']}']", state="attached")
            page.select_option("#model", jobs["evaluated"])
            page.fill("#message", question)
            page.click("#send")
            answer = page.wait_for_selector("#playground-answer[data-done='true']", timeout=60_000)
            assert "error" not in (answer.get_attribute("class") or "")
            assert answer.inner_text() == expected.strip() or answer.inner_text() == expected
            page.screenshot(path=str(ARTIFACTS / "dashboard-playground.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard-run.png").stat().st_size > 10_000


def test_dashboard_data_is_per_key(trained: tuple[Control, dict[str, str]]) -> None:
    import httpx

    server, jobs = trained
    assert httpx.get(f"{server.url}/api/runs").status_code == 401
    runs = httpx.get(f"{server.url}/api/runs", headers={"Authorization": f"Bearer {KEY}"}).json()["runs"]
    assert {r["id"] for r in runs} == {jobs["id:evaluated"], jobs["id:lr1.0"], jobs["id:lr0.05"]}
    assert all(r["status"] == "succeeded" and r["step"] == r["total_steps"] > 0 for r in runs)
    refused = httpx.get(f"{server.url}/api/run", params={"id": "/etc"}, headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 404  # only runs the caller can see, never a path
    assert httpx.get(f"{server.url}/static/..%2Fstore.py").status_code == 404
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "dashboard.js" in page.text


def test_dashboard_shows_run_folders_and_cluster_jobs(trained: tuple[Control, dict[str, str]], tmp_path: Path) -> None:
    """--runs DIR and --cluster NAMESPACE: runs made without the API (kubetune train, kubetune submit)."""
    import httpx

    from tests.k8s_server import FakeKubernetes

    server, jobs = trained
    runs = tmp_path / "runs"
    shutil.copytree(server.home / "runs" / jobs["id:lr0.05"], runs / "by-hand")
    fake = FakeKubernetes()
    labels = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/component": "train"}
    for name, output in (("submitted", server.home / "runs" / jobs["id:lr1.0"]), (jobs["id:evaluated"], None)):
        fake.put("jobs", "ml", {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
                                "spec": {"template": {}}, "status": {"active": 1}})
        fake.put("configmaps", "ml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-spec"},
                                      "data": {"spec.yaml": f"name: {name}\noutput: {output}\n"}})
    # a second replica on the same database (so it knows the jobs), showing what else there is
    # --runs also names the server's own runs folder: its jobs' runs stay their owners' (never `runs2:ftjob-...`)
    other = Control(tmp_path / "home", "--runs", str(runs), "--runs", str(server.home / "runs"), "--cluster", "ml",
                    "--database",
                    f"sqlite:///{server.home / 'control.db'}", "--worker-id", "replica-2",
                    env={"KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig"))}).start()
    try:
        found = {r["id"]: r for r in httpx.get(f"{other.url}/api/runs", headers={"Authorization": f"Bearer {KEY}"},
                                               timeout=30).json()["runs"] if r["source"] != "job"}
    finally:
        other.stop()
        fake.stop()
    assert set(found) == {"runs:by-hand", "k8s:ml/submitted"}  # a control-plane job stays its owner's
    assert found["runs:by-hand"]["status"] == "succeeded" and found["runs:by-hand"]["step"] == 60
    assert str(tmp_path) not in json.dumps(found) and str(server.home) not in json.dumps(found)  # no paths
    cluster = found["k8s:ml/submitted"]
    assert cluster["source"] == "cluster/ml" and cluster["status"] == "running" and cluster["step"] == 60
