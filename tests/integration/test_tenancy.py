"""`kubetune server` against a hostile tenant: a real server on 127.0.0.1, two keys, the official
`openai` client. Key A attacks with every field and class of request the README's threat model
names; key B is the victim, with a canary string in its data. Each attack is refused with a 4xx that
names the field (or fails before reading anything), B's canary never reaches A, no marker file is
written, loopback listeners see no connection, and the server's memory stays bounded."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.conftest import QUICKSTART_DATA, kubetune_cmd, quiet_env
from tests.integration.test_control import FAST, Control, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.integration

ATTACKER, VICTIM = "kt-attacker-key-0123456789abcdef0123", "kt-victim-key-0123456789abcdef012345"
CANARY = "CANARY-7f3a9c-victim-rows"
SERVER_SECRETS = {"PGPASSWORD": "canary-pgpassword", "OPENAI_API_KEY": "sk-canary-openai",
                  "MLFLOW_TRACKING_TOKEN": "canary-mlflow-token", "WANDB_API_KEY": "canary-wandb",
                  "AWS_SECRET_ACCESS_KEY": "canary-aws-secret", "HF_TOKEN": "hf_canary"}


class Listener:
    """A TCP listener on loopback that counts who connects (a tracker or storage endpoint an attacker
    would point the server at)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port, self.connections = self.sock.getsockname()[1], 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The operator's models folder: the tiny model, and one whose repository code writes a marker."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_model, root / "tiny-llama")
    evil = root / "evil-llama"
    shutil.copytree(tiny_model, evil)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    marker = root.parent / "REMOTE-CODE-RAN"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Control]:
    home = tmp_path_factory.mktemp("tenancy") / "home"
    config = home.parent / "server.yaml"
    config.write_text(f"models: {{root: '{models}', allow: []}}\n"
                      "budgets: {max_queued_jobs: 3, max_running_jobs: 1, max_upload_bytes: 40000000}\n"
                      "limits: {max_steps: 3000}\n")
    control = Control(home, "--api-key", ATTACKER, "--api-key", VICTIM, "--config", str(config),
                      "--concurrency", "2", "--max-upload-mb", "32", env=SERVER_SECRETS).start()
    yield control
    control.stop()


def read_all(server: Control, client: openai.OpenAI, key: str) -> str:
    """Everything the key can read: files, jobs, events, checkpoints, models, the dashboard's data."""
    out = [f.model_dump_json() for f in client.files.list()]
    for job in client.fine_tuning.jobs.list(limit=100):
        out.append(job.model_dump_json())
        out += [e.model_dump_json() for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        out += [c.model_dump_json() for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    out += [m.model_dump_json() for m in client.models.list()]
    headers = {"Authorization": f"Bearer {key}"}
    runs = httpx.get(f"{server.url}/api/runs", headers=headers, timeout=30).json()
    out.append(json.dumps(runs))
    for run in runs["runs"]:
        out.append(httpx.get(f"{server.url}/api/run", params={"id": run["id"]}, headers=headers, timeout=30).text)
    return "\n".join(out)


def victim_rows(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:64]]
    for row in rows:
        row["messages"][-1]["content"] += f" {CANARY}"
    path = tmp_path / "victim.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finished(client: openai.OpenAI, job_id: str, timeout: float = 240) -> Any:
    return wait_for(job_id, lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status
                    in ("succeeded", "failed", "cancelled") and j, timeout)


@pytest.mark.long
def test_a_tenant_reaches_only_its_own_data_models_and_nothing_of_the_server(
        server: Control, models: Path, tmp_path: Path) -> None:
    attacker, victim = server.client(ATTACKER), server.client(VICTIM)
    listener = Listener()
    try:
        # the victim trains on rows carrying the canary; its model and files exist on the server
        v_file = victim.files.create(file=victim_rows(tmp_path).open("rb"), purpose="fine-tune")
        v_job = victim.fine_tuning.jobs.create(model="tiny-llama", training_file=v_file.id, suffix="victim",
                                               extra_body={"kubetune": {**FAST, "train": {**FAST["train"],
                                                                                          "max_steps": 10}}})
        a_file = attacker.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
        v_done = finished(victim, v_job.id)
        assert v_done.status == "succeeded", v_done.error
        v_run = server.home / "runs" / v_job.id
        assert (v_run / "final").is_dir()

        marker = tmp_path / "MARKER.db"
        attacks: list[tuple[dict[str, Any], str]] = [
            ({"data.train": "../../files"}, "kubetune.data.train"),
            ({"data": {"train": [str(server.home / "files" / v_file.id / "victim.jsonl")]}}, "kubetune.data.train"),
            ({"data.eval": "../../files", "eval.metrics": ["rouge"]}, "kubetune.data.eval"),
            ({"data": {"eval": {"path": f"s3://bucket/files/{v_file.id}/victim.jsonl"}}}, "kubetune.data.eval.path"),
            ({"model.adapter": str(v_run)}, "kubetune.model.adapter"),
            ({"model": {"adapter": f"../runs/{v_job.id}"}}, "kubetune.model.adapter"),
            ({"resume": str(v_run / "checkpoints" / "checkpoint-10")}, "kubetune.resume"),
            ({"model.base": str(v_run / "final")}, "kubetune.model.base"),
            ({"model.trust_remote_code": True}, "kubetune.model.trust_remote_code"),
            ({"model.chat_template": str(v_run / "final" / "adapter" / "chat_template.jinja")},
             "kubetune.model.chat_template"),
            ({"tracking.mlflow_uri": f"sqlite:///{marker}", "tracking.report_to": ["mlflow"]},
             "kubetune.tracking.mlflow_uri"),
            ({"tracking": {"mlflow_uri": f"http://127.0.0.1:{listener.port}"}}, "kubetune.tracking.mlflow_uri"),
            ({"storage.endpoint_url": f"http://127.0.0.1:{listener.port}"}, "kubetune.storage.endpoint_url"),
            ({"output": str(tmp_path / "elsewhere")}, "kubetune.output"),
            ({"stage": {"data": [{"script": "evil.py"}]}}, "kubetune.stage.data"),
            ({"kubernetes": {"namespace": "kube-system"}}, "kubetune.kubernetes.namespace"),
            ({"kubernetes.image": "evil/image:latest"}, "kubetune.kubernetes.image"),
            ({"kubernetes.tolerations": [{"operator": "Exists"}]}, "kubetune.kubernetes.tolerations"),
            ({"kubernetes.queue": None}, "kubetune.kubernetes.queue"),
            ({"resources": {"cpu": "64", "memory": "1Ti"}}, "kubetune.resources.cpu"),
            ({"method.grpo.rewards": [{"function": "os:system"}]}, "kubetune.method.grpo.rewards.0.function"),
            ({"method.grpo.rewards.0.function": "os:system"}, "kubetune.method.grpo.rewards.0.function"),
            ({"train.max_steps": 10**12}, "kubetune.train.max_steps"),
        ]
        for settings, param in attacks:
            with pytest.raises(openai.BadRequestError) as refused:
                attacker.fine_tuning.jobs.create(model="tiny-llama", training_file=a_file.id,
                                                 extra_body={"kubetune": settings})
            assert refused.value.body["param"] == param, (settings, refused.value.body)
            assert str(server.home) not in refused.value.message and CANARY not in refused.value.message

        models_attacks = [str(v_run), f"../runs/{v_job.id}", str(models / "tiny-llama"), "/etc",
                          f"s3://bucket/runs/{v_job.id}", v_done.fine_tuned_model,
                          f"{v_done.fine_tuned_model}:ckpt-step-10", "meta-llama/Llama-3.2-1B", "tiny-llama/../x"]
        for model in models_attacks:
            with pytest.raises(openai.BadRequestError) as refused:
                attacker.fine_tuning.jobs.create(model=model, training_file=a_file.id)
            assert refused.value.body["param"] == "model", model
        for file_id in (v_file.id,):
            with pytest.raises(openai.BadRequestError) as taken:  # the same answer as for no such file at all
                attacker.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id)
            assert taken.value.body["param"] == "training_file"
            with pytest.raises(openai.BadRequestError) as missing:
                attacker.fine_tuning.jobs.create(model="tiny-llama", training_file="file-" + "0" * 24)
            assert taken.value.message.replace(file_id, "ID") == missing.value.message.replace("file-" + "0" * 24, "ID")
            with pytest.raises(openai.NotFoundError):
                attacker.files.content(file_id)
        with pytest.raises(openai.NotFoundError):
            attacker.chat.completions.create(model=v_done.fine_tuned_model, max_tokens=4,
                                             messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as big:
            attacker.fine_tuning.jobs.create(model="tiny-llama", training_file=a_file.id,
                                             hyperparameters={"n_epochs": 1e9})
        assert big.value.body["param"] == "hyperparameters.n_epochs"

        # A model whose folder carries code: trained without running it (remote code is per model, the operator's)
        a_job = attacker.fine_tuning.jobs.create(model="evil-llama", training_file=a_file.id, suffix="mine",
                                                 extra_body={"kubetune": {**FAST, "train": {
                                                     **FAST["train"], "max_steps": 10, "save_every_steps": 5}}})
        a_done = finished(attacker, a_job.id)
        assert a_done.status == "succeeded", a_done.error
        assert not (models.parent / "REMOTE-CODE-RAN").exists()

        # its own checkpoint and its own model continue (the server resolves them to its runs)
        steps = [c.step_number for c in attacker.fine_tuning.jobs.checkpoints.list(a_job.id)]
        assert 5 in steps
        again = [attacker.fine_tuning.jobs.create(model=model, training_file=a_file.id,
                                                  extra_body={"kubetune": {**FAST, "train": {**FAST["train"],
                                                                                             "max_steps": 5}}})
                 for model in (f"{a_done.fine_tuned_model}:ckpt-step-5", a_done.fine_tuned_model)]
        dones = [finished(attacker, job.id) for job in again]
        for job, done in zip(again, dones):
            assert done.status == "succeeded", done.error
            assert done.fine_tuned_model.startswith("ft:tiny-llama:") or done.fine_tuned_model.startswith(
                "ft:evil-llama:")
            spec = (server.home / "runs" / job.id / "spec.yaml").read_text()
            assert f"runs/{a_job.id}" in spec  # started from the attacker's own run
        answer = attacker.chat.completions.create(model=dones[1].fine_tuned_model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "Spell moon."}])
        assert answer.choices[0].message.content is not None

        seen = read_all(server, attacker, ATTACKER)
        assert CANARY not in seen and v_file.id not in seen and v_job.id not in seen
        assert str(server.home) not in seen and str(models) not in seen
        assert not marker.exists() and listener.connections == 0
    finally:
        listener.close()


def test_job_processes_get_a_minimal_environment(server: Control) -> None:
    client = server.client(ATTACKER)
    upload = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id,
                                         extra_body={"kubetune": {**FAST, "train": {**FAST["train"],
                                                                                    "max_steps": 2000}}})

    def training_process() -> dict[str, str] | None:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if b"train" in cmd and any(job.id.encode() in part for part in cmd):
                    raw = (proc / "environ").read_bytes().split(b"\0")
                    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)
            except OSError:
                continue
        return None

    try:
        env = wait_for("the training process", training_process, 120)
    finally:
        client.fine_tuning.jobs.cancel(job.id)
    assert not set(SERVER_SECRETS) & set(env), sorted(env)
    assert not any(value in SERVER_SECRETS.values() for value in env.values())
    assert "PATH" in env and "KUBETUNE_API_KEY" not in env


def test_budgets_and_floods_are_refused_with_4xx(server: Control, tmp_path: Path) -> None:
    client = server.client(VICTIM)
    upload = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
    created, refusal = [], None
    for _ in range(6):  # max_queued_jobs: 3 (validating or queued)
        try:
            created.append(client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=upload.id,
                extra_body={"kubetune": {**FAST, "train": {**FAST["train"], "max_steps": 2000}}}))
        except openai.RateLimitError as exc:
            refusal = exc
            break
    assert refusal is not None and refusal.body["code"] == "too_many_jobs" and len(created) <= 3
    for job in created:
        client.fine_tuning.jobs.cancel(job.id)

    deep = b'{"model": "tiny-llama", "training_file": "x", "kubetune": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    headers = {"Authorization": f"Bearer {VICTIM}", "Content-Type": "application/json"}
    answer = httpx.post(f"{server.url}/v1/fine_tuning/jobs", content=deep, headers=headers, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "nested_too_deeply"
    answer = httpx.post(f"{server.url}/v1/chat/completions", content=b"[" * 100_000, headers=headers, timeout=30)
    assert answer.status_code == 400
    huge = httpx.post(f"{server.url}/v1/fine_tuning/jobs", content=b" " * (17 << 20), headers=headers, timeout=60)
    assert huge.status_code == 413
    # strings that never close: scanned in linear time, and a stranger's body is not read at all
    quotes = b'"' + b'\\"' * 2_000_000
    for given, status in (({"Content-Type": "application/json"}, 401), (headers, 422)):
        started = time.monotonic()
        answer = httpx.post(f"{server.url}/v1/fine_tuning/jobs", content=quotes, headers=given, timeout=60)
        assert answer.status_code in (status, 400) and time.monotonic() - started < 10, answer.text[:200]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # 30 MB announced, none sent
        raw.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: {30 << 20}\r\n"
                    "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
        assert raw.recv(200).startswith(b"HTTP/1.1 401")  # refused before a byte of the form is read

    # a 20 MB upload of tiny rows: checked a line at a time, the server's memory barely moves
    rows = tmp_path / "tiny-rows.jsonl"
    with rows.open("w") as out:
        line = json.dumps({"text": "a"}) + "\n"
        out.write(line * (20_000_000 // len(line)))
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status")
    before = _kb(status, "VmRSS")
    made = client.files.create(file=rows.open("rb"), purpose="fine-tune")
    grown = (_kb(status, "VmHWM") - before) / 1024
    assert made.bytes == rows.stat().st_size and grown < 400, f"grew {grown:.0f} MB"
    with pytest.raises(openai.RateLimitError) as quota:  # 40 MB stored per key at most
        client.files.create(file=rows.open("rb"), purpose="fine-tune")
    assert quota.value.body["code"] == "storage_quota_exceeded"
    client.files.delete(made.id)


def _kb(status: Path, field: str) -> int:
    line = next(line for line in status.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def test_kubernetes_jobs_run_where_the_operator_says_per_team(tmp_path: Path, s3: Any, staged: dict[str, str]) -> None:
    """Team A's and team B's keys land in their own namespace and Kueue LocalQueue with the operator's
    image and service account; no tenant field reaches a rendered object."""
    from tests.integration.conftest import BUCKET
    from tests.k8s_server import FakeKubernetes

    fake = FakeKubernetes()
    fake.namespaces.add("team-b")  # the operator made both teams' namespaces (kubetune setup)
    config = tmp_path / "server.yaml"
    config.write_text(f"models: {{allow: [{{name: tiny-llama, uri: '{staged['model']}'}}]}}\n"
                      "spec: {resources: {accelerator: cpu}, kubernetes: {image: 'registry.local/kubetune:1', "
                      "service_account: trainer, priority_class: batch-low}}\n"
                      "teams:\n"
                      "  a: {keys: ['--api-key 1'], spec: {kubernetes: {namespace: team-a, queue: team-a-queue}}}\n"
                      "  b: {keys: ['--api-key 2'], spec: {kubernetes: {namespace: team-b, queue: team-b-queue}}}\n")
    env = {**s3.env(), "KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig"))}
    server = Control(tmp_path / "home", "--backend", "kubernetes", "--storage", f"s3://{BUCKET}/tenancy",
                     "--api-key", ATTACKER, "--api-key", VICTIM, "--config", str(config), env=env).start()
    try:
        for key, team in ((ATTACKER, "team-a"), (VICTIM, "team-b")):
            client = server.client(key)
            upload = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
            for escalation in ({"kubernetes": {"namespace": "kube-system"}}, {"kubernetes.service_account": "admin"},
                               {"kubernetes.secrets.storage": "prod"}, {"kubernetes.priority_class": "system-node-critical"}):
                with pytest.raises(openai.BadRequestError):
                    client.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id,
                                                   extra_body={"kubetune": escalation})
            job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id,
                                                 extra_body={"kubetune": {"train": {"max_steps": 5}}})
            submitted = wait_for("the submission", lambda: fake.get("jobs", team, job.id), 120)
            assert submitted["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == f"{team}-queue"
            pod = submitted["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] == "trainer" and pod["priorityClassName"] == "batch-low"
            assert {c["image"] for c in pod["containers"]} == {"registry.local/kubetune:1"}
            assert not pod.get("tolerations") and all(not c.get("securityContext", {}).get("privileged")
                                                      for c in pod["containers"])
        assert not [k for k in fake.objects if "kube-system" in str(k)]
        assert s3.secret not in json.dumps(list(fake.objects.values()))
    finally:
        server.stop()
        fake.stop()


def test_serve_counts_routes_after_the_key_and_refuses_the_network_without_one(tiny_model: Path) -> None:
    refused = subprocess.run(kubetune_cmd("serve", str(tiny_model), "--host", "0.0.0.0", "--port", str(free_port())),
                             capture_output=True, text=True, env=quiet_env(), timeout=120)
    assert refused.returncode == 2 and "no API key" in refused.stderr and "Traceback" not in refused.stderr
    port, key = free_port(), "kt-serve-key-0123456789"
    proc = subprocess.Popen(kubetune_cmd("serve", str(tiny_model), "--port", str(port), "--api-key", key,
                                         "--metrics-auth", "key"),
                            env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("serve", lambda: _up(url), 120)
        assert httpx.get(f"{url}/metrics").status_code == 401  # --metrics-auth key
        auth = {"Authorization": f"Bearer {key}"}
        size = len(httpx.get(f"{url}/metrics", headers=auth).text)
        for i in range(300):  # strangers on made-up paths
            assert httpx.get(f"{url}/v1/probe-{i}-{os.urandom(4).hex()}").status_code == 401
        metrics = httpx.get(f"{url}/metrics", headers=auth).text
        assert "probe-" not in metrics and len(metrics) < size + 2000
        assert 'endpoint="unmatched",status="401"} 300.0' in metrics
        deep = httpx.post(f"{url}/v1/chat/completions", content=b"[" * 50_000, headers=auth, timeout=30)
        assert deep.status_code == 400
    finally:
        proc.terminate()
        proc.wait(30)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.5)
        return False
