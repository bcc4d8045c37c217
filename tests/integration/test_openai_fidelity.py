"""OpenAI's fine-tuning API as a program written for it uses it, through the official client: metadata
filters, result files (the step-metrics CSV), checkpoint and event metrics, pause/resume, file
expiry, deleting a model (it stops being served and its run is removed), graders, and reinforcement
jobs graded by sandboxed python graders."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from tests.conftest import QUICKSTART_DATA
from tests.integration.test_control import FAST, MODEL, Control, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Control]:
    control = Control(tmp_path / "home").start()
    yield control
    control.stop()


def _settings(max_steps: int, **train: int) -> dict[str, object]:
    return {"kubetune": {**FAST, "train": {**FAST["train"], "max_steps": max_steps, **train}}}


def test_results_file_metrics_metadata_filters_expiry_and_deleting_a_model(
        server: Control, tiny_model: Path) -> None:
    client = server.client("unused")
    train = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
    valid = client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune",
                                expires_after={"anchor": "created_at", "seconds": 3600})
    assert valid.expires_at == valid.created_at + 3600 and train.expires_at is None
    assert client.files.retrieve(valid.id).expires_at == valid.expires_at
    for bad in ({"anchor": "created_at", "seconds": 60}, {"anchor": "last_active_at", "seconds": 3600}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune",
                                expires_after=bad)  # type: ignore[arg-type]
        assert refused.value.body["param"].startswith("expires_after.")  # type: ignore[index]

    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, validation_file=valid.id,
                                         metadata={"team": "a", "run": "1"},
                                         extra_body=_settings(20, eval_every_steps=10, save_every_steps=10))
    other = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, metadata={"team": "b"},
                                           extra_body=_settings(20))
    client.fine_tuning.jobs.cancel(other.id)
    plain = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, extra_body=_settings(20))
    client.fine_tuning.jobs.cancel(plain.id)

    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "b"})] == [other.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a", "run": "2"})] == []
    assert [j.id for j in client.fine_tuning.jobs.list(extra_query={"metadata": "null"})] == [plain.id]
    assert [j.id for j in client.fine_tuning.jobs.list()] == [plain.id, other.id, job.id]
    page = client.fine_tuning.jobs.list(metadata={"team": "a"}, limit=1)
    assert not page.has_more

    done = wait_for("the job", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                    in ("succeeded", "failed", "cancelled") and j, 300)
    assert done.status == "succeeded", done.error

    # checkpoints carry OpenAI's metrics fields; events carry the step metrics as data
    ckpts = {c.step_number: c.metrics for c in client.fine_tuning.jobs.checkpoints.list(job.id)}
    assert set(ckpts) == {10, 20}
    for step, m in ckpts.items():
        assert m.step == step and m.train_loss is not None and 0 <= (m.train_mean_token_accuracy or -1) <= 1
        assert m.valid_loss is not None and 0 <= (m.valid_mean_token_accuracy or -1) <= 1
        assert m.full_valid_loss == m.valid_loss
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    train_data = {e.data["step"]: e.data for e in events if e.type == "metrics" and "train_loss" in e.data}
    valid_data = {e.data["step"]: e.data for e in events if e.type == "metrics" and "valid_loss" in e.data}
    assert sorted(train_data) == [10, 20] and sorted(valid_data) == [10, 20]

    # the result file: a fine-tune-results file of the caller, the step metrics as CSV
    assert len(done.result_files) == 1
    result = client.files.retrieve(done.result_files[0])
    assert result.purpose == "fine-tune-results" and result.filename == "step_metrics.csv"
    assert [f.id for f in client.files.list(purpose="fine-tune-results")] == [result.id]
    rows = list(csv.DictReader(io.StringIO(client.files.content(result.id).text)))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == [10, 20]
    for r in rows:
        step = int(r["step"])
        assert float(r["train_loss"]) == pytest.approx(train_data[step]["train_loss"], rel=1e-5)
        assert float(r["train_accuracy"]) == pytest.approx(train_data[step]["train_mean_token_accuracy"], rel=1e-5)
        assert float(r["valid_loss"]) == pytest.approx(valid_data[step]["valid_loss"], rel=1e-5)
        assert float(r["valid_mean_token_accuracy"]) == pytest.approx(ckpts[step].valid_mean_token_accuracy, rel=1e-5)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=(QUICKSTART_DATA / "eval.jsonl").open("rb"), purpose="fine-tune-results")

    # a model: retrieved, served, deleted (no longer listed, retrieved or served; its run removed)
    name = done.fine_tuned_model
    assert client.models.retrieve(name).id == name
    msgs = [{"role": "user", "content": "What colour is the sky?"}]
    assert client.chat.completions.create(model=name, messages=msgs, max_tokens=4).choices
    run = server.home / "runs" / job.id
    assert (run / "events.jsonl").is_file()
    child = client.fine_tuning.jobs.create(model=name, training_file=train.id, extra_body=_settings(20))
    with pytest.raises(openai.BadRequestError) as refused:  # a job not ended starts from it
        client.models.delete(name)
    assert refused.value.body["code"] == "model_in_use" and child.id in refused.value.body["message"]  # type: ignore[index]
    client.fine_tuning.jobs.cancel(child.id)
    with pytest.raises(openai.BadRequestError) as refused:  # the result file is no training file
        client.fine_tuning.jobs.create(model=MODEL, training_file=result.id)
    assert refused.value.body["param"] == "training_file"  # type: ignore[index]
    deleted = client.models.delete(name)
    assert deleted.deleted and deleted.id == name
    assert not run.exists()
    assert [m.id for m in client.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=msgs, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    with pytest.raises(openai.BadRequestError) as refused:  # nor trained on
        client.fine_tuning.jobs.create(model=name, training_file=train.id)
    assert refused.value.body["param"] == "model"  # type: ignore[index]
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == name  # the job stays, as OpenAI's


def test_pause_stops_at_a_checkpoint_and_resume_continues_from_it(server: Control, tiny_model: Path) -> None:
    client = server.client("unused")
    train = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, extra_body=_settings(5000))
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)  # not paused
    wait_for("a checkpoint", lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id)))
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    with pytest.raises(openai.ConflictError):  # its process is still on its way to the checkpoint
        client.fine_tuning.jobs.resume(job.id)

    def said(text: str) -> list[str]:
        return [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if text in e.message]

    stopped = wait_for("the process to stop", lambda: said("Training paused at step"), 90)
    kept = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id))
    assert f"at step {kept}" in stopped[0]
    steps_then = len(said("Step "))
    time.sleep(3)  # paused holds no process: no step is logged meanwhile
    assert len(said("Step ")) == steps_then and client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_for("training to resume", lambda: said(f"Training started (resumed from checkpoint-{kept})"), 120)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_wandb_integration_reports_to_the_operators_wandb_under_the_tenants_project_and_python_graders_off(
        tmp_path: Path, tiny_model: Path) -> None:
    from tests.integration.test_trackers import wandb_records

    config = tmp_path / "server.yaml"
    config.write_text(f"models: {{root: {tiny_model.parent}}}\nintegrations: [wandb]\ngraders: {{python: false}}\n")
    server = Control(tmp_path / "home", "--config", str(config),
                     env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}).start()
    try:
        client = server.client("unused")
        train = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
        wandb = {"project": "support-bot", "name": "first try", "tags": ["exp-1", "lora"]}
        for bad, param in (({**wandb, "entity": "someone-else"}, "integrations.0.wandb.entity"),
                           ({**wandb, "project": "../../etc"}, "integrations.0.wandb.project")):
            with pytest.raises(openai.BadRequestError) as refused:
                client.fine_tuning.jobs.create(model=MODEL, training_file=train.id,
                                               integrations=[{"type": "wandb", "wandb": bad}])
            assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
        # this operator runs no tenant code: python graders are refused, for jobs and for /graders alike
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model=MODEL, training_file=train.id,
                                           method=_reinforcement(GRADER))  # type: ignore[arg-type]
        assert refused.value.body["param"] == "method.reinforcement.grader.graders.right.type"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.alpha.graders.validate(grader=GRADER["graders"]["right"])  # type: ignore[arg-type,index]
        assert refused.value.body["param"] == "grader.type"  # type: ignore[index]
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, extra_body=_settings(6),
                                             integrations=[{"type": "wandb", "wandb": wandb}])
        assert job.integrations[0].type == "wandb" and job.integrations[0].wandb.project == "support-bot"
        done = wait_for("the job", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed") and j, 300)
        assert done.status == "succeeded", done.error
    finally:
        server.stop()
    (log,) = (server.home / "runs" / job.id / "wandb").glob("offline-run-*/run-*.wandb")
    runs = [r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
    # the operator's one W&B account: each tenant's projects under its own name (no key here: the local owner)
    from kubetune.control.jobs import wandb_project

    assert runs and runs[0].project == wandb_project("key-local", "support-bot") and runs[0].display_name == "first try"
    assert runs[0].project.startswith("key-local-") and runs[0].project.endswith("--support-bot")
    assert list(runs[0].tags) == ["exp-1", "lora"]
    history = [r for r in wandb_records(log) if r.WhichOneof("record_type") == "history"]
    assert history  # the training steps went to it


def test_integrations_the_operator_did_not_enable_are_refused(server: Control, tiny_model: Path) -> None:
    client = server.client("unused")
    train = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=MODEL, training_file=train.id,
                                       integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert refused.value.body["param"] == "integrations.0.type"  # type: ignore[index]


def test_graders_run_and_validate_through_the_official_client(server: Control) -> None:
    client = server.client("unused")
    check = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    assert client.fine_tuning.alpha.graders.validate(grader=check).grader.type == "string_check"
    ran = client.fine_tuning.alpha.graders.run(grader=check, model_sample="12", item={"answer": "12"})
    assert ran.reward == 1.0 and ran.metadata.name == "exact" and not ran.metadata.errors.invalid_variable_error
    multi = {"type": "multi", "name": "both", "calculate_output": "0.5 * exact + 0.5 * rouge",
             "graders": {"exact": check, "rouge": {"type": "text_similarity", "name": "r", "evaluation_metric":
                                                   "rouge_1", "input": "{{sample.output_text}}",
                                                   "reference": "{{item.answer}}"}}}
    ran = client.fine_tuning.alpha.graders.run(grader=multi, model_sample="12 apples", item={"answer": "12"})
    assert ran.sub_rewards == {"exact": 0.0, "rouge": pytest.approx(2 / 3)}
    assert ran.reward == pytest.approx(1 / 3)
    missing = client.fine_tuning.alpha.graders.run(grader=check, model_sample="12", item={})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error
    summed = client.fine_tuning.alpha.graders.run(grader=GRADER["graders"]["right"],  # type: ignore[arg-type,index]
                                                  model_sample="It is 12.", item={"answer": "12"})
    assert summed.reward == 1.0 and not summed.metadata.errors.python_grader_runtime_error
    snoop = {"type": "python", "name": "snoop", "source": "import os\ndef grade(sample, item):\n"
                                                          "    return len(os.listdir('/'))\n"}
    snooped = client.fine_tuning.alpha.graders.run(grader=snoop, model_sample="1")  # type: ignore[arg-type]
    assert snooped.reward == 0.0 and snooped.metadata.errors.python_grader_runtime_error
    assert "Operation not permitted" in snooped.metadata.errors.python_grader_runtime_error_details
    for bad, param in (({**multi, "calculate_output": "__import__('os')"}, "grader.calculate_output"),
                       ({"type": "python", "name": "p", "source": "import socket"}, "grader.source")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.alpha.graders.validate(grader=bad)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.alpha.graders.run(grader={**check, "operation": "regex"},  # type: ignore[arg-type]
                                             model_sample="1")


# method: reinforcement — a verifiable task (sums), graded by a sandboxed python grader and a string check

SUM_GRADER = ("import re\n"
              "def grade(sample, item):\n"
              "    found = re.search(r'(\\d+)', sample['output_text'])\n"
              "    return float(bool(found) and found.group(1) == item['answer'])\n")
GRADER = {"type": "multi", "name": "arithmetic", "calculate_output": "0.8 * right + 0.2 * said",
          "graders": {"right": {"type": "python", "name": "right", "source": SUM_GRADER},
                      "said": {"type": "string_check", "name": "said", "input": "{{sample.output_text}}",
                               "reference": "{{item.answer}}", "operation": "like"}}}


def _sums(path: Path, n: int, seed: int) -> Path:
    import json
    import random

    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                                 "answer": str(a + b)}) + "\n")
    return path


def _reinforcement(grader: dict[str, object], **hp: object) -> dict[str, object]:
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}


RL_FAST = {"kubetune": {"train": {"max_steps": 4, "logging_steps": 1, "save_every_steps": 2, "learning_rate": 1e-3},
                        "data": {"max_length": 64}, "method": {"grpo": {"max_new_tokens": 6}}}}


def test_reinforcement_job_grades_with_python_and_string_check_graders(
        server: Control, tiny_model: Path, tmp_path: Path) -> None:
    client = server.client("unused")
    train = client.files.create(file=_sums(tmp_path / "train.jsonl", 24, 1).open("rb"), purpose="fine-tune")
    valid = client.files.create(file=_sums(tmp_path / "valid.jsonl", 6, 2).open("rb"), purpose="fine-tune")
    method = _reinforcement(GRADER, batch_size=2, compute_multiplier=0.5, eval_interval=2, eval_samples=2)
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, validation_file=valid.id,
                                         method=method, extra_body=RL_FAST)  # type: ignore[arg-type]
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.type == "multi"
    hp = job.method.reinforcement.hyperparameters
    assert (hp.batch_size, hp.compute_multiplier, hp.eval_interval, hp.eval_samples) == (2, 0.5, 2, 2)
    done = wait_for("the job", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                    in ("succeeded", "failed") and j, 300)
    assert done.status == "succeeded", done.error

    events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    train_steps = [e.data for e in events if "train_reward_mean" in (e.data or {})]
    assert sorted(d["step"] for d in train_steps) == [1, 2, 3, 4]
    assert {g["name"] for g in train_steps[0]["scores"]["graders"]} >= {"right", "said"}
    held = sorted((e.data["step"], e.data["before_training"], e.data["valid_reward_mean"]) for e in events
                  if "valid_reward_mean" in (e.data or {}))
    assert [(s, b) for s, b, _ in held] == [(0, True), (2, False), (4, False)], held  # before, every 2, after
    assert all(0.0 <= r <= 1.0 for _, _, r in held)
    assert any("full validation mean reward=" in e.message for e in events)
    (last, *_) = client.fine_tuning.jobs.checkpoints.list(job.id)
    metrics = last.metrics.to_dict()
    assert last.step_number == 4 and metrics["valid_reward_mean"] == held[-1][2]
    assert 0.0 <= metrics["train_reward_mean"] <= 1.0


def test_a_python_grader_that_reaches_out_fails_the_job_cleanly(
        server: Control, tiny_model: Path, tmp_path: Path) -> None:
    client = server.client("unused")
    train = client.files.create(file=_sums(tmp_path / "train.jsonl", 8, 1).open("rb"), purpose="fine-tune")
    reads_at_load = {"type": "python", "name": "snoop", "source": "SECRET = open('/etc/hostname').read()\n"
                                                                 "def grade(sample, item):\n    return 1.0\n"}
    reads_when_grading = {"type": "python", "name": "snoop",
                          "source": "import os\ndef grade(sample, item):\n"
                                    "    return float(len(os.listdir('/')))\n"}
    jobs = [client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, method=_reinforcement(g),
                                           extra_body=RL_FAST)  # type: ignore[arg-type]
            for g in (reads_at_load, reads_when_grading)]
    ended = [wait_for("the job to fail", lambda j=j: (r := client.fine_tuning.jobs.retrieve(j.id)).status
                      in ("failed", "succeeded") and r, 300) for j in jobs]
    assert [j.status for j in ended] == ["failed", "failed"]
    # at validation, nothing trained (the server names no path of its own: /etc/hostname reads as hostname)
    assert "Operation not permitted: 'hostname'" in ended[0].error.message
    assert "method.grpo.rewards.0.grader.source" in ended[0].error.message
    assert "the grader failed on every answer" in ended[1].error.message, ended[1].error
    assert "Operation not permitted" in ended[1].error.message and "Traceback" not in ended[1].error.message
    assert not list(client.fine_tuning.jobs.checkpoints.list(jobs[1].id))


def test_adapters_are_added_to_the_running_engine_and_removed_within_max_loras(
        tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"models: {{root: {tiny_model.parent}}}\nserving: {{max_loras: 2}}\n")
    server = Control(tmp_path / "home", "--config", str(config), "--concurrency", "2").start()
    try:
        client = server.client("unused")
        train = client.files.create(file=(QUICKSTART_DATA / "train.jsonl").open("rb"), purpose="fine-tune")
        jobs = [client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, suffix=name,
                                               extra_body=_settings(2)) for name in ("a", "b", "c")]
        a, b, c = [wait_for("the job", lambda j=j: (r := client.fine_tuning.jobs.retrieve(j.id)).status
                            in ("succeeded", "failed") and r, 300).fine_tuned_model for j in jobs]
        msgs = [{"role": "user", "content": "What colour is the sky?"}]

        def ask(model: str) -> str:
            answer = client.chat.completions.create(model=model, messages=msgs, max_tokens=4)  # type: ignore[arg-type]
            return answer.choices[0].message.content or ""

        def log(prefix: str) -> list[str]:
            return [line for line in server.log.read_text().splitlines() if line.startswith(prefix)]

        ask(a)
        ask(b)                   # added to a's engine: the base is not loaded again
        assert [b in line for line in log("adapter added to the running engine")] == [True]
        ask(c)                   # a third adapter: over max_loras 2, the least recently used (a) is unloaded
        assert any(a in line for line in log("adapter unloaded (max_loras 2)"))
        ask(a)                   # ... and is added again when asked for
        assert len(log("engine loaded for")) == 1 and len(log("adapter added")) == 3
        client.models.delete(c)  # removed from the running engine: it is not served, the others are
        with pytest.raises(openai.NotFoundError):
            ask(c)
        ask(a)
        ask(b)
        assert len(log("engine loaded for")) == 1, log("engine loaded for")
    finally:
        server.stop()


# model graders: the operator's judge model (an OpenAI-compatible endpoint, tests/judge.py), named by tenants
# only by the name server.yaml gives it

JUDGED = {"type": "score_model", "name": "judge", "model": "grader-7b",
          "input": [{"role": "user", "content": "Answer: {{sample.output_text}}\nReference: {{item.answer}}"}]}


def test_model_graders_and_cosine_run_through_the_official_client_and_grade_a_reinforcement_job(
        tmp_path: Path, tiny_model: Path) -> None:
    import json

    from tests.judge import Judge

    judge = Judge(key="sk-judge-secret")
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({"models": {"root": str(tiny_model.parent)}, "graders": {"models": {
        "grader-7b": {"base_url": judge.url, "model": "org/judge", "api_key_env": "JUDGE_KEY", "timeout_s": 10}},
        "embeddings": {"base_url": judge.url, "model": "org/embedder", "api_key_env": "JUDGE_KEY"}}}))
    server = Control(tmp_path / "home", "--config", str(config), env={"JUDGE_KEY": "sk-judge-secret"}).start()
    try:
        client = server.client("unused")
        ran = client.fine_tuning.alpha.graders.run(grader=JUDGED, model_sample="12",  # type: ignore[arg-type]
                                                   item={"answer": "12"})
        assert ran.reward == 1.0 and not ran.metadata.errors.model_grader_server_error
        assert ran.model_grader_token_usage_per_model == {
            "grader-7b": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
        label = {"type": "label_model", "name": "v", "model": "grader-7b", "labels": ["right", "wrong"],
                 "passing_labels": ["right"], "input": JUDGED["input"]}
        assert client.fine_tuning.alpha.graders.run(grader=label, model_sample="11",  # type: ignore[arg-type]
                                                    item={"answer": "12"}).reward == 0.0
        assert judge.requests[0]["model"] == "org/judge" and judge.requests[0]["auth"] == "Bearer sk-judge-secret"
        cosine = {"type": "text_similarity", "name": "cos", "evaluation_metric": "cosine",
                  "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
        anagram = client.fine_tuning.alpha.graders.run(grader=cosine, model_sample="listen",  # type: ignore[arg-type]
                                                       item={"answer": "silent"})
        assert anagram.reward == pytest.approx(1.0)  # the embedder counts letters
        assert judge.requests[-1]["path"] == "/v1/embeddings" and judge.requests[-1]["model"] == "org/embedder"
        judge.mode = "error"
        down = client.fine_tuning.alpha.graders.run(grader=JUDGED, model_sample="1",  # type: ignore[arg-type]
                                                    item={"answer": "1"})
        assert down.reward == 0.0 and down.metadata.errors.model_grader_server_error
        assert "answered HTTP 503" in down.metadata.errors.model_grader_server_error_details
        assert judge.url.split("//")[1] not in json.dumps(down.to_dict())
        judge.mode = "json"
        for bad, param in (({**JUDGED, "model": "gpt-4o"}, "grader.model"),
                           ({**JUDGED, "model": judge.url}, "grader.model")):
            with pytest.raises(openai.BadRequestError) as refused:
                client.fine_tuning.alpha.graders.validate(grader=bad)  # type: ignore[arg-type]
            assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
            assert "org/judge" not in refused.value.body["message"]  # type: ignore[index]  # the operator's names only

        train = client.files.create(file=_sums(tmp_path / "train.jsonl", 16, 1).open("rb"), purpose="fine-tune")
        valid = client.files.create(file=_sums(tmp_path / "valid.jsonl", 4, 2).open("rb"), purpose="fine-tune")
        graders = {"type": "multi", "name": "judged", "calculate_output": "judge", "graders": {"judge": JUDGED}}
        seen = len(judge.requests)
        job = client.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, validation_file=valid.id, extra_body=RL_FAST,
            method=_reinforcement(graders, batch_size=2, compute_multiplier=0.5))  # type: ignore[arg-type]
        done = wait_for("the job", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed") and j, 300)
        assert done.status == "succeeded", done.error
        events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    finally:
        server.stop()
        judge.close()
    asked = judge.requests[seen:]
    # the training process asked the judge about each answer with the operator's key from the server's env
    # (4 steps x 2 prompts x 2 answers, and the held-out prompts before and after)
    assert len(asked) >= 4 * 2 * 2 + 2 * 4 and {r["auth"] for r in asked} == {"Bearer sk-judge-secret"}
    assert all(r["model"] == "org/judge" and r["messages"][0]["content"].startswith("Answer: ") for r in asked)
    steps = [e.data for e in events if "train_reward_mean" in (e.data or {})]
    assert sorted(d["step"] for d in steps) == [1, 2, 3, 4]
    assert {g["name"] for g in steps[0]["scores"]["graders"]} >= {"judge"}
    assert any("valid_reward_mean" in (e.data or {}) for e in events)
    spec = (server.home / "runs" / job.id / "spec.yaml").read_text()
    assert "grader-7b" in spec and "sk-judge-secret" not in spec  # the key by its variable's name only
