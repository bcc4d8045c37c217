"""`kubetune server` driven by the official openai client: upload, create, poll, events, checkpoints,
chat with the result; the server killed mid-job and started again; keys that cannot see each other;
the same on a real PostgreSQL server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import QUICKSTART_DATA, TINY, kubetune_cmd, quiet_env
from tests.integration.conftest import BUCKET
from tests.k8s_server import FakeKubernetes
from tests.servers import S3Server, free_port, start_postgres

pytestmark = pytest.mark.integration

KEY1, KEY2 = "kt-test-first-key-0123456789abcdef", "kt-test-second-key-0123456789abcdef"
MODEL = "tiny-llama"  # the folder's name under --models-root
FAST = {"train": {"learning_rate": 3e-3, "max_per_device_batch_size": 16, "logging_steps": 10,
                  "save_every_steps": 20, "keep_checkpoints": 2},
        "data": {"max_length": 128}}


class Control:
    """A `kubetune server` process with its home folder and log, restartable with the same flags."""

    def __init__(self, home: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        # The tiny model is offered by name (`model="tiny-llama"`), as an operator offers a models folder.
        offered = () if "--config" in flags else ("--models-root", str(TINY.parent))
        self.home, self.flags, self.port, self.env = home, (*flags, *offered), free_port(), env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"{home.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Control:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(kubetune_cmd("server", "--home", str(self.home), "--port", str(self.port),
                                                  *self.flags), env=quiet_env(**self.env), stdout=out, stderr=out)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not start in 60 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 240) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    if request.param == "sqlite":
        yield []
        return
    pg = start_postgres()
    yield ["--database", pg.url]
    pg.stop()


def test_the_whole_loop_survives_a_server_kill_and_keys_see_only_their_own(
        tmp_path: Path, tiny_model: Path, database: list[str]) -> None:
    server = Control(tmp_path / "home", "--api-key", KEY1, "--api-key", KEY2, *database).start()
    try:
        c1, c2 = server.client(KEY1), server.client(KEY2)
        train = c1.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
        valid = c1.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
        assert train.filename == "train.jsonl" and train.bytes == (QUICKSTART_DATA / "train.jsonl").stat().st_size
        assert c1.files.content(train.id).read() == (QUICKSTART_DATA / "train.jsonl").read_bytes()
        job = c1.fine_tuning.jobs.create(model=MODEL, training_file=train.id, validation_file=valid.id,
                                         suffix="qs", seed=7, extra_body={"kubetune": {**FAST, "train": {
                                             **FAST["train"], "max_steps": 160}}})
        assert job.status == "validating_files" and job.seed == 7
        assert job.fine_tuned_model is None  # OpenAI's: set once the job succeeded
        assert job.hyperparameters.batch_size == 16
        # the second job is created once the first is past validation: two validations run at once and
        # either may finish first, and this test needs the first job to be the one training
        wait_for("the first job's validation", lambda: c1.fine_tuning.jobs.retrieve(job.id).status != "validating_files")
        waiting = c1.fine_tuning.jobs.create(model=MODEL, training_file=train.id, suffix="second",
                                             extra_body={"kubetune": {**FAST, "train": {**FAST["train"],
                                                                                        "max_steps": 20}}})
        assert {f.id for f in c1.files.list()} == {train.id, valid.id}

        def checkpointed() -> bool:
            return any("Checkpoint saved" in e.message for e in c1.fine_tuning.jobs.list_events(job.id, limit=100))

        wait_for("the first checkpoint", checkpointed)
        assert c1.fine_tuning.jobs.retrieve(job.id).status == "running"
        assert c1.fine_tuning.jobs.retrieve(waiting.id).status == "queued"  # --concurrency 1
        server.kill()  # no goodbye: its training process gets SIGTERM (PDEATHSIG), checkpoints and stops
        server.start()

        done = wait_for("the job to finish", lambda: (j := c1.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed", "cancelled") and j)
        assert done.status == "succeeded", done.error
        assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at
        assert re.fullmatch(r"ft:tiny-llama:qs:[0-9a-f]{8}", done.fine_tuned_model or "")

        events = list(c1.fine_tuning.jobs.list_events(job.id, limit=100))
        messages = [e.message for e in events]
        assert messages[0] == "The job has successfully completed"       # newest first
        assert "Resuming after a server restart" in messages
        assert any(re.search(r"Training started \(resumed from checkpoint-\d+\)", m) for m in messages), messages
        steps = [e.data["step"] for e in reversed(events) if e.type == "metrics" and "train_loss" in (e.data or {})]
        assert steps[-1] == 160
        page = c1.fine_tuning.jobs.list_events(job.id, limit=3)
        assert [e.id for e in page.data] == [e.id for e in events[:3]] and page.has_more
        after = c1.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
        assert [e.id for e in after.data] == [e.id for e in events[3:6]]

        ckpts = list(c1.fine_tuning.jobs.checkpoints.list(job.id))
        assert [c.step_number for c in ckpts][0] == 160 and len(ckpts) == 2  # keep_checkpoints: 2
        assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-160"
        assert ckpts[0].metrics.train_loss is not None

        second = wait_for("the queued job", lambda: (j := c1.fine_tuning.jobs.retrieve(waiting.id)).status
                          in ("succeeded", "failed") and j)
        assert second.status == "succeeded", second.error  # it stayed queued through the kill, then ran
        assert sorted(m.id for m in c1.models.list()) == sorted([done.fine_tuned_model, second.fine_tuned_model])
        msgs = [{"role": "user", "content": "What colour is the sky?"}]
        answer = c1.chat.completions.create(model=done.fine_tuned_model, messages=msgs, temperature=0,
                                            max_tokens=24)
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c1.chat.completions.create(
            model=done.fine_tuned_model, messages=msgs, temperature=0, max_tokens=24, stream=True) if chunk.choices)
        assert streamed == answer.choices[0].message.content
        assert c1.chat.completions.create(model=second.fine_tuned_model, messages=msgs, max_tokens=4).choices
        lines = server.log.read_text().splitlines()
        loaded = [line for line in lines if line.startswith("engine loaded for")]
        added = [line for line in lines if line.startswith("adapter added to the running engine")]
        assert len(loaded) == 1 and "LoRA" in loaded[0] and done.fine_tuned_model in loaded[0]
        assert len(added) == 1 and second.fine_tuned_model in added[0]  # one engine: the base loaded once

        # the second key: nothing of the first's exists for it
        assert list(c2.fine_tuning.jobs.list()) == [] and list(c2.files.list()) == []
        assert list(c2.models.list()) == []
        with pytest.raises(openai.NotFoundError):
            c2.fine_tuning.jobs.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            c2.files.retrieve(train.id)
        with pytest.raises(openai.NotFoundError):
            c2.chat.completions.create(model=done.fine_tuned_model, messages=msgs, max_tokens=4)
        with pytest.raises(openai.BadRequestError) as others:  # another key's file is no file of this one
            c2.fine_tuning.jobs.create(model=MODEL, training_file=train.id)
        assert others.value.body["param"] == "training_file"
        with pytest.raises(openai.AuthenticationError):
            server.client("kt-not-a-key").models.list()
        assert httpx.get(f"{server.url}/v1/fine_tuning/jobs").status_code == 401
    except BaseException:
        print(server.log.read_text()[-4000:])  # shown when the test fails
        raise
    finally:
        server.stop()
    # no key in the clear anywhere the server writes: its log, its database, the job's run and logs
    written = [server.log, *[p for p in (tmp_path / "home").rglob("*") if p.is_file()]]
    for path in written:
        data = path.read_bytes()
        assert KEY1.encode() not in data and KEY2.encode() not in data, path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Control]:
    control = Control(tmp_path / "home", "--max-upload-mb", "1").start()
    yield control
    control.stop()


def test_bad_rows_fail_the_job_with_file_and_line(server: Control, tiny_model: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:20]]
    rows[2] = {"messages": [{"role": "user", "content": "no answer here"}]}
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    client = server.client("unused")
    upload = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id,
                                         extra_body={"kubetune": FAST})
    failed = wait_for("validation", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status != "validating_files"
                      and j, 120)
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert "mine.jsonl:3" in failed.error.message and "assistant" in failed.error.message
    assert str(server.home) not in failed.error.message  # the caller's file name, not the storage path
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []


def test_cancel_stops_training_at_a_checkpoint_and_keeps_it(server: Control, tiny_model: Path) -> None:
    client = server.client("unused")
    upload = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id, extra_body={
        "kubetune": {**FAST, "train": {**FAST["train"], "max_steps": 5000}}})
    queued = client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id,
                                            extra_body={"kubetune": FAST})
    wait_for("a checkpoint", lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id)))
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # one job at a time (--concurrency 1)
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    wait_for("the process to stop", lambda: any(e.message.startswith("Training stopped")
                                                for e in client.fine_tuning.jobs.list_events(job.id, limit=50)), 90)
    kept = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert kept and kept[0].step_number < 5000
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [queued.id] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5, after=queued.id).data] == [job.id]


def test_requests_the_server_refuses(server: Control, tiny_model: Path, tmp_path: Path) -> None:
    client = server.client("unused")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * 1000}) + "\n" * 1 + (json.dumps({"text": "y" * 1000}) + "\n") * 1100)
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=big.open("rb"), purpose="fine-tune")
    assert too_large.value.status_code == 413 and "upload limit" in too_large.value.message
    just_over = tmp_path / "just_over.jsonl"  # past the limit by less than the form's slack: counted while stored
    just_over.write_text((json.dumps({"text": "z" * 1000}) + "\n") * 1060)
    with pytest.raises(openai.APIStatusError) as counted:
        client.files.create(file=just_over.open("rb"), purpose="fine-tune")
    assert counted.value.status_code == 413 and "1,048,576 bytes" in counted.value.message
    chunked = httpx.post(f"{server.url}/v1/files", content=iter([b"--x\r\n"]),
                         headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and chunked.json()["error"]["code"] == "length_required"
    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(openai.BadRequestError, match="binary"):
        client.files.create(file=binary.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="assistants")
    upload = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as bad_setting:
        client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id,
                                       extra_body={"kubetune": {"train": {"max_stepz": 3}}})
    assert bad_setting.value.body["param"] == "kubetune.train.max_stepz"
    assert "max_steps" in bad_setting.value.message  # the allowed keys are listed
    with pytest.raises(openai.BadRequestError) as no_file:  # OpenAI's 400 on the field, as any bad field
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-nope")
    assert no_file.value.body["param"] == "training_file" and "file-nope" in no_file.value.message
    with pytest.raises(openai.BadRequestError) as no_file:
        client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id, validation_file="file-nope")
    assert no_file.value.body["param"] == "validation_file"
    with pytest.raises(openai.BadRequestError, match="not a model this server offers") as unknown:
        client.fine_tuning.jobs.create(model="no such model!", training_file=upload.id)
    assert unknown.value.body["param"] == "model" and "tiny-llama" in unknown.value.message
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)


def test_no_network_listening_without_a_key_and_keys_are_stored_hashed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    refused = subprocess.run(kubetune_cmd("server", "--home", str(home), "--host", "0.0.0.0", "--port",
                                          str(free_port())), capture_output=True, text=True, env=quiet_env(),
                             timeout=60)
    assert refused.returncode == 2 and "no API key" in refused.stderr and "Traceback" not in refused.stderr
    made = subprocess.run(kubetune_cmd("server", "key", "create", "--name", "ci", "--home", str(home)),
                          capture_output=True, text=True, env=quiet_env(), timeout=60)
    key = made.stdout.strip()
    assert made.returncode == 0 and key.startswith("kt-") and len(key) > 40
    assert key.encode() not in (home / "control.db").read_bytes()
    server = Control(home, "--host", "0.0.0.0").start()  # a key exists now: the network is allowed
    try:
        assert list(server.client(key).fine_tuning.jobs.list()) == []
        with pytest.raises(openai.AuthenticationError):
            server.client("kt-someone-else").fine_tuning.jobs.list()
    finally:
        server.stop()


@pytest.mark.long
def test_kubernetes_backend_submits_jobs_follows_them_and_cancel_deletes(
        tmp_path: Path, s3: S3Server, staged: dict[str, str]) -> None:
    fake = FakeKubernetes()
    env = {**s3.env(), "KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig"))}
    config = tmp_path / "server.yaml"  # the operator's: the model offered, the queue, CPU pods
    config.write_text(f"models: {{allow: [{{name: tiny-llama, uri: '{staged['model']}'}}]}}\n"
                      "spec: {kubernetes: {queue: team-queue}, resources: {accelerator: cpu}}\n"
                      # the operator's vLLM Deployment of the base (serve.runtime_adapters): its adapter list
                      "serving: {max_loras: 2, kubernetes: {tiny-llama: serving/tiny-serve-adapters}}\n")
    fake.namespaces.add("serving")
    fake.put("configmaps", "serving", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "tiny-serve-adapters"}, "data": {"adapters.json": json.dumps({"adapters": [
            {"name": "older-1", "uri": "s3://b/1"}, {"name": "older-2", "uri": "s3://b/2"}]})}})
    server = Control(tmp_path / "home", "--backend", "kubernetes", "--storage", f"s3://{BUCKET}/ft",
                     "--namespace", "ml", "--config", str(config), env=env).start()
    try:
        client = server.client("unused")
        upload = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
        assert f"ft/files/{upload.id}/train.jsonl" in s3.keys(BUCKET, "ft/files/")
        settings = {**FAST, "train": {**FAST["train"], "max_steps": 30}}

        def create() -> Any:
            job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id,
                                                 extra_body={"kubetune": settings})
            wait_for("the submission", lambda: any(e.message.startswith("Submitted to Kubernetes")
                                                   for e in client.fine_tuning.jobs.list_events(job.id)), 120)
            return job

        job = create()
        submitted = fake.get("jobs", "ml", job.id)
        assert submitted is not None and submitted["spec"]["suspend"] is True  # Kueue admits it
        assert submitted["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
        assert s3.secret not in json.dumps(list(fake.objects.values()))  # credentials go by reference
        spec_text = fake.get("configmaps", "ml", f"{job.id}-spec")["data"]["spec.yaml"]
        assert [k for k in fake.objects if k[0] == "configmaps" and k[2].startswith(f"{job.id}-kubetune-")]  # its wheel
        assert f"output: s3://{BUCKET}/ft/runs/{job.id}" in spec_text
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
        fake.put("pods", "ml", {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{job.id}-0-abcde", "labels": {"batch.kubernetes.io/job-name": job.id}},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "train", "image": "bad:image", "ready": False,
                                                                  "restartCount": 0, "imageID": "", "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image bad:image"}}}]}})

        def said(text: str) -> bool:
            return any(text in e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100))

        wait_for("the cluster's word", lambda: said("Queued by Kueue in LocalQueue team-queue") and said(
            "image pull failed (ImagePullBackOff): Back-off pulling image bad:image"), 30)

        # Kueue admits it and the pod trains: the real trainer on the rendered spec, writing to the bucket
        submitted["spec"]["suspend"], submitted["status"] = False, {"active": 1}
        wait_for("running", lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 30)
        spec_file = tmp_path / "pod-spec.yaml"
        spec_file.write_text(spec_text)
        pod = subprocess.run(kubetune_cmd("train", str(spec_file)), capture_output=True, text=True, timeout=300,
                             env=quiet_env(**s3.env(), KUBETUNE_WORKDIR=str(tmp_path / "pod")))
        assert pod.returncode == 0, pod.stderr
        submitted["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        done = wait_for("success", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed") and j, 60)
        assert done.status == "succeeded" and done.trained_tokens and done.trained_tokens > 0
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert steps and steps[0] == 30  # read from the bucket
        (results,) = done.result_files  # the step metrics, stored in the bucket as the caller's file
        assert client.files.content(results).text.startswith("step,train_loss,train_accuracy,valid_loss,")
        assert any(k.endswith(f"{results}/step_metrics.csv") for k in s3.keys(BUCKET, "ft/files/"))
        answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Spell ship."}])
        assert answer.choices[0].message.content

        def listed() -> list[dict[str, str]]:
            return json.loads(fake.get("configmaps", "serving", "tiny-serve-adapters")["data"]["adapters.json"])[
                "adapters"]

        # added to the base's vLLM Deployment (its sidecar loads it): the newest max_loras 2 are listed
        assert listed() == [{"name": "older-2", "uri": "s3://b/2"},
                            {"name": done.fine_tuned_model, "uri": f"s3://{BUCKET}/ft/runs/{job.id}/final/adapter"}]
        fake.forbidden.add(("GET", "configmaps"))  # the cluster refuses: the model is not deleted
        with pytest.raises(openai.InternalServerError):
            client.models.delete(done.fine_tuned_model)
        assert client.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
        fake.forbidden.discard(("GET", "configmaps"))
        client.models.delete(done.fine_tuned_model)
        assert listed() == [{"name": "older-2", "uri": "s3://b/2"}]  # taken off before its run was removed

        second = create()
        assert fake.get("jobs", "ml", second.id) is not None
        assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
        assert fake.get("jobs", "ml", second.id) is None and fake.get("configmaps", "ml", f"{second.id}-spec") is None
        assert not [k for k in fake.objects if k[0] == "configmaps" and k[2].startswith(f"{second.id}-kubetune")]
        assert any(f"job/{second.id} deleted" in e.message for e in client.fine_tuning.jobs.list_events(second.id))

        paused = create()  # pause frees the cluster (the Job and its pods go); resume submits it again
        assert client.fine_tuning.jobs.pause(paused.id).status == "paused"
        assert fake.get("jobs", "ml", paused.id) is None
        time.sleep(2)  # paused: nothing is submitted meanwhile
        assert fake.get("jobs", "ml", paused.id) is None and client.fine_tuning.jobs.retrieve(paused.id).status == "paused"
        assert client.fine_tuning.jobs.resume(paused.id).status == "queued"
        wait_for("the resubmission", lambda: fake.get("jobs", "ml", paused.id) is not None, 30)
        assert sum(e.message.startswith("Submitted to Kubernetes")
                   for e in client.fine_tuning.jobs.list_events(paused.id, limit=100)) == 2
        client.fine_tuning.jobs.cancel(paused.id)

        third = create()
        fake.get("jobs", "ml", third.id)["status"] = {"failed": 7, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"}]}
        failed = wait_for("failure", lambda: (j := client.fine_tuning.jobs.retrieve(third.id)).status == "failed"
                          and j, 60)
        assert failed.error.code == "training_failed" and "BackoffLimitExceeded" in failed.error.message
    finally:
        server.stop()
        fake.stop()


def test_kubernetes_backend_needs_shared_storage(tmp_path: Path) -> None:
    refused = subprocess.run(kubetune_cmd("server", "--home", str(tmp_path), "--backend", "kubernetes",
                                          "--port", str(free_port())), capture_output=True, text=True,
                             env=quiet_env(), timeout=60)
    assert refused.returncode == 2 and "pods cannot read" in refused.stderr
    # a judge's key that pods could not get is found at start, not at a tenant's first job
    config = tmp_path / "server.yaml"
    config.write_text("graders: {models: {judge: {base_url: 'http://judge.svc/v1', api_key_env: JUDGE_KEY}}}\n")
    refused = subprocess.run(kubetune_cmd("server", "--home", str(tmp_path), "--backend", "kubernetes", "--storage",
                                          "s3://bucket/ft", "--config", str(config), "--port", str(free_port())),
                             capture_output=True, text=True, env=quiet_env(), timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "graders.models.judge.api_key_secret" in refused.stderr and "Traceback" not in refused.stderr


def test_two_replicas_on_one_postgresql_share_the_work_and_never_run_a_job_twice(
        tmp_path: Path, tiny_model: Path) -> None:
    pg = start_postgres()
    shared = ["--database", pg.url, "--storage", str(tmp_path / "storage"), "--api-key", KEY1]
    a = Control(tmp_path / "a", *shared, "--worker-id", "replica-a").start()
    b = Control(tmp_path / "b", *shared, "--worker-id", "replica-b").start()
    try:
        client = a.client(KEY1)
        upload = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
        settings = {**FAST, "train": {**FAST["train"], "max_steps": 60}}
        jobs = [client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id,
                                               extra_body={"kubetune": settings}) for _ in range(2)]
        for job in jobs:
            done = wait_for(job.id, lambda: (j := b.client(KEY1).fine_tuning.jobs.retrieve(job.id)).status
                            in ("succeeded", "failed") and j)
            assert done.status == "succeeded", done.error
        workers = []
        for job in jobs:
            started = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
                       if e.message.startswith("Fine-tuning job started")]
            assert len(started) == 1, started  # claimed once
            workers.append(started[0])
        assert sorted(workers) == ["Fine-tuning job started (worker replica-a)",
                                   "Fine-tuning job started (worker replica-b)"]  # --concurrency 1 each
        model = b.client(KEY1).fine_tuning.jobs.retrieve(jobs[0].id).fine_tuned_model
        answer = b.client(KEY1).chat.completions.create(model=model, max_tokens=8,
                                                        messages=[{"role": "user", "content": "Spell ship."}])
        assert answer.choices[0].message.content is not None
    except BaseException:
        print(a.log.read_text()[-4000:], b.log.read_text()[-4000:], sep="\n")  # shown when the test fails
        raise
    finally:
        a.stop()
        b.stop()
        pg.stop()


def test_a_dpo_job_on_openai_preference_data(server: Control, tiny_model: Path, tmp_path: Path) -> None:
    from tests.preferences import write_pairs

    client = server.client("unused")
    pairs = client.files.create(file=write_pairs(tmp_path / "pairs.jsonl", 64, 1, "openai").open("rb"),
                                purpose="fine-tune")
    held_out = client.files.create(file=write_pairs(tmp_path / "held_out.jsonl", 16, 2, "openai").open("rb"),
                                   purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=pairs.id, validation_file=held_out.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 8}}},
        extra_body={"kubetune": {"train": {"max_steps": 10, "max_per_device_batch_size": 8, "logging_steps": 5,
                                           "save_every_steps": 10, "learning_rate": 5e-4}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for("the DPO job", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                    in ("succeeded", "failed") and j)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any(e.type == "metrics" and e.data.get("step") == 10 for e in events)
    held = [e.data for e in events if e.type == "metrics" and "preference_accuracy" in (e.data or {})]
    assert held and 0 <= held[0]["preference_accuracy"] <= 1 and "preference_accuracy_base" in held[0]
    answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8,
                                            messages=[{"role": "user", "content": "What colour is the fox?"}])
    assert answer.choices[0].message.content is not None


def test_a_transient_failure_is_tried_again_with_a_longer_wait_then_fails(tmp_path: Path) -> None:
    """Exit 75 (storage that does not answer) is retried after KUBETUNE_JOB_RETRY_SECONDS × attempt,
    three attempts in all; then the job fails with the reason."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused, a transient error
    config = tmp_path / "server.yaml"
    config.write_text("models: {allow: [{name: tiny-in-s3, uri: 's3://models/tiny-llama'}]}\n")
    server = Control(tmp_path / "home", "--config", str(config),
                     env={"KUBETUNE_JOB_RETRY_SECONDS": "1", "AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "x",
                          "AWS_SECRET_ACCESS_KEY": "y", "KUBETUNE_PREFLIGHT_RETRIES": "1"}).start()
    try:
        client = server.client("unused")
        upload = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny-in-s3", training_file=upload.id)
        failed = wait_for("the last attempt", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                          not in ("validating_files",) and j, 180)
        assert failed.status == "failed" and failed.error.code == "validation_failed"
        assert "tiny-llama" in failed.error.message and "s3://" not in failed.error.message  # no server URI
        retries = [e for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=50)))
                   if "trying again" in e.message]
        assert [r.message.split("trying again in ")[1] for r in retries] == ["1 s (attempt 2 of 3)",
                                                                            "2 s (attempt 3 of 3)"]
        assert all(r.level == "warn" and r.message.startswith("Exit 75") for r in retries)
    finally:
        server.stop()
