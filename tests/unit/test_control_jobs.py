"""OpenAI's fine-tuning request → kubetune run spec: hyperparameters, methods, the extension field,
model references and the names the caller sees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetune.control.jobs import JobRequest, Start, build_spec, job_object, model_name, resolved_hyperparameters
from kubetune.control.policy import ModelEntry, ModelsPolicy, Refused, resolve_model
from kubetune.errors import SpecError, UsageError


def spec_of(tmp_path: Path, **request: object):
    req = JobRequest(model="tiny", training_file="file-1", **request)
    return build_spec("ftjob-0123456789abcdef01234567", req, Start(str(tmp_path)), "s3://b/files/file-1/train.jsonl",
                      None, "s3://b/runs/ftjob-0123456789abcdef01234567", rows=100)


def test_openai_hyperparameters_become_spec_settings(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, seed=3, method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}}})
    assert (spec.train.epochs, spec.train.max_steps, spec.train.total_batch_size) == (2, -1, 8)
    assert spec.train.learning_rate == pytest.approx(1e-4) and spec.train.seed == 3
    assert spec.method.objective == "sft" and spec.model.base == str(tmp_path.resolve())
    assert spec.data.eval is None and spec.output == "s3://b/runs/ftjob-0123456789abcdef01234567"
    assert resolved_hyperparameters(spec) == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}


def test_the_older_top_level_hyperparameters_and_auto(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, hyperparameters={"n_epochs": "auto", "batch_size": 4})
    assert spec.train.total_batch_size == 4 and spec.train.learning_rate == 2e-4
    assert resolved_hyperparameters(spec)["learning_rate_multiplier"] == 1.0


def test_dpo_with_beta_and_full_fine_tuning_through_the_extension(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3,
                                                                                 "learning_rate_multiplier": 2}}},
                   kubetune={"method.type": "full", "train": {"max_steps": 40}})
    assert spec.method.objective == "dpo" and spec.method.dpo.beta == 0.3 and spec.method.type == "full"
    assert spec.train.learning_rate == pytest.approx(4e-5)  # full fine-tuning's base rate is 2e-5
    assert resolved_hyperparameters(spec)["beta"] == 0.3 and resolved_hyperparameters(spec)["n_epochs"] == "auto"
    with pytest.raises(UsageError, match="only DPO has beta"):
        spec_of(tmp_path, method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}})


def test_the_extension_field_is_checked_like_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as bad:
        spec_of(tmp_path, kubetune={"train": {"max_steps": "many"}, "method": {"lora": {"rank": 8}}})
    wheres = sorted(p.where for p in bad.value.problems)
    assert wheres == ["kubetune.method.lora.rank", "kubetune.train.max_steps"]
    with pytest.raises(Refused, match="is the operator's") as refused:
        spec_of(tmp_path, kubetune={"output": "s3://elsewhere"})
    assert refused.value.param == "kubetune.output"
    assert spec_of(tmp_path, kubetune={"method": {"lora": {"r": 4}}}).method.lora.r == 4


def test_model_references(tmp_path: Path) -> None:
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text("{}")
    models = ModelsPolicy(root=str(tmp_path), allow=[ModelEntry(name="Qwen/*"),
                                                      ModelEntry(name="big", uri="s3://bucket/models/big")])
    assert resolve_model("Qwen/Qwen3-0.6B", models) == ("hf://Qwen/Qwen3-0.6B", None, False)
    assert resolve_model("Qwen/Qwen3-0.6B@v1.0", models) == ("hf://Qwen/Qwen3-0.6B", "v1.0", False)
    assert resolve_model("big", models) == ("s3://bucket/models/big", None, False)
    assert resolve_model("llama", models) == (str((tmp_path / "llama").resolve()), None, False)
    kept_elsewhere = tmp_path.parent / f"{tmp_path.name}-disk" / "mistral"  # the operator's link to it is offered
    kept_elsewhere.mkdir(parents=True)
    (kept_elsewhere / "config.json").write_text("{}")
    (tmp_path / "mistral").symlink_to(kept_elsewhere)
    assert resolve_model("mistral", models) == (str(kept_elsewhere.resolve()), None, False)
    for name in ("gpt 4", "meta-llama/Llama-3-8B", "s3://bucket/models/big", str(tmp_path / "llama"), "../llama",
                 "Qwen/../../etc", "Qwen/x@../../y", "/etc/passwd", "~/llama", "file:///etc"):
        with pytest.raises(Refused) as refused:
            resolve_model(name, models)
        assert refused.value.param == "model" and str(tmp_path) not in refused.value.message.replace(name, "")
    name = model_name("hf://Qwen/Qwen3-0.6B@main", "support-bot", "ftjob-89abcdef0123456789abcdef")
    assert name == "ft:Qwen3-0.6B:support-bot:89abcdef"
    assert re.fullmatch(r"ft:llama::[0-9a-f]{8}", model_name("s3://b/models/llama", None, "ftjob-0123456789ab"))
    assert model_name("ft:Qwen3-0.6B:support-bot:89abcdef", "v2", "ftjob-0011223344") == "ft:Qwen3-0.6B:v2:00112233"


def test_job_object_has_openai_fields(tmp_path: Path) -> None:
    obj = job_object({"id": "ftjob-1", "model": "m", "created_at": 1, "status": "queued", "training_file": "file-1",
                      "seed": 42, "method": {"type": "supervised", "supervised": {"hyperparameters": {
                          "n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 1.0}}}})
    assert obj["object"] == "fine_tuning.job" and obj["hyperparameters"]["n_epochs"] == 3
    assert obj["error"] is None and obj["fine_tuned_model"] is None and obj["result_files"] == []


def test_a_failed_process_is_reported_in_the_callers_file_names() -> None:
    from kubetune.control.worker import _readable

    log = ("loading...\nerror: 2 problem(s) in the data:\n  /root/.cache/kubetune/data/ab12/mine.jsonl:3: no assistant "
           "turn\n  s3://b/ft/files/file-1/mine.jsonl:4: bad role 'bot'\nhint: fix these rows")
    said = _readable(log, {"training_uri": "s3://b/ft/files/file-1/mine.jsonl", "validation_uri": None})
    assert said.startswith("2 problem(s) in the data:") and "loading" not in said
    assert "  mine.jsonl:3: no assistant turn" in said and "  mine.jsonl:4: bad role" in said
    assert "s3://" not in said and ".cache" not in said


CHECK = {"type": "string_check", "name": "right", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}
PYTHON = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}


def _rl(grader: dict, **hp: object) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}


def test_reinforcement_is_grpo_rewarded_by_the_grader(tmp_path: Path) -> None:
    from kubetune.control.jobs import JobPolicy
    from kubetune.control.policy import GradersPolicy

    spec = spec_of(tmp_path, method=_rl(CHECK, batch_size=3, compute_multiplier=2, eval_interval=5, eval_samples=2,
                                        n_epochs=2))
    g = spec.method.grpo
    assert spec.method.objective == "grpo" and spec.data.columns.prompt == "messages"
    assert (g.num_generations, spec.train.total_batch_size, g.eval_every_steps, g.eval_generations) == (8, 24, 5, 2)
    assert g.rewards[0].function == "grader" and g.rewards[0].grader["reference"] == "{{item.answer}}"
    assert resolved_hyperparameters(spec) | {} == {
        "n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 1.0, "eval_interval": 5, "eval_samples": 2,
        "compute_multiplier": 2.0, "reasoning_effort": "default"}
    auto = spec_of(tmp_path, method=_rl(PYTHON))
    assert (auto.method.grpo.num_generations, auto.train.total_batch_size, auto.method.grpo.sandbox.seconds) == (4, 16, 5)
    policy = JobPolicy(graders=GradersPolicy(python_seconds=2, python_memory_mb=512))
    req = JobRequest(model="tiny", training_file="file-1", method=_rl(PYTHON))
    limited = build_spec("ftjob-0123456789abcdef01234567", req, Start(str(tmp_path)), "s3://b/t.jsonl", None,
                         "s3://b/runs/x", policy, rows=100)
    assert (limited.method.grpo.sandbox.seconds, limited.method.grpo.sandbox.memory_mb) == (2, 512)


@pytest.mark.parametrize(("method", "param"), [
    (_rl({**CHECK, "operation": "regex"}), "method.reinforcement.grader.operation"),
    (_rl({"type": "multi", "name": "m", "calculate_output": "a + os", "graders": {"a": CHECK}}),
     "method.reinforcement.grader.calculate_output"),
    (_rl({"type": "score_model", "name": "judge", "model": "gpt-4o", "input": [{"role": "user", "content": "x"}]}),
     "method.reinforcement.grader.model"),
    (_rl({"type": "score_model", "name": "judge", "model": "gpt-4o", "input": []}), "method.reinforcement.grader.input"),
    (_rl({**CHECK, "type": "text_similarity", "evaluation_metric": "cosine", "operation": None}),
     "method.reinforcement.grader.operation"),
    ({"type": "reinforcement", "reinforcement": {"grader": CHECK, "response_format": {"type": "json_schema"}}},
     "method.reinforcement.response_format"),
    (_rl(CHECK, compute_multiplier=100), "method.reinforcement.hyperparameters.compute_multiplier"),
    (_rl(CHECK, eval_samples=64), "method.reinforcement.hyperparameters.eval_samples"),
    ({"type": "reinforcement"}, "method.reinforcement.grader"),
])
def test_reinforcement_requests_that_cannot_run_name_their_field(tmp_path: Path, method: dict, param: str) -> None:
    with pytest.raises(Refused) as refused:
        spec_of(tmp_path, method=method)
    assert refused.value.param == param, refused.value


def test_a_model_grader_job_gets_the_judge_it_names_and_its_keys_variable_only(tmp_path: Path) -> None:
    from kubetune.control.environment import job_environment
    from kubetune.control.jobs import JobPolicy
    from kubetune.control.policy import GradersPolicy

    judge = {"base_url": "http://judge.serving.svc:8000/v1", "model": "Qwen/Qwen3-8B", "api_key_env": "JUDGE_KEY"}
    other = {"base_url": "http://other.svc/v1", "api_key_env": "OTHER_KEY"}
    policy = JobPolicy(graders=GradersPolicy(models={"grader-8b": judge, "other": other}))  # type: ignore[arg-type]
    grader = {"type": "score_model", "name": "j", "model": "grader-8b",
              "input": [{"role": "user", "content": "{{sample.output_text}} vs {{item.answer}}"}]}
    req = JobRequest(model="m", training_file="file-1", method=_rl(grader))
    spec = build_spec("ftjob-0123456789abcdef01234567", req, Start(str(tmp_path)), "s3://b/t.jsonl", None,
                      "s3://b/runs/x", policy, rows=100)
    assert {n: j.model_dump(exclude_none=True, exclude_defaults=True) for n, j in spec.method.grpo.judges.items()} \
        == {"grader-8b": judge}
    env = job_environment(spec, {"JUDGE_KEY": "k1", "OTHER_KEY": "k2", "PATH": "/bin"})
    assert env.get("JUDGE_KEY") == "k1" and "OTHER_KEY" not in env
    embedder = {"base_url": "http://embed.serving.svc/v1", "model": "bge", "api_key_env": "EMBED_KEY"}
    policy = JobPolicy(graders=GradersPolicy(models={"other": other}, embeddings=embedder))  # type: ignore[arg-type]
    cosine = {"type": "text_similarity", "name": "c", "evaluation_metric": "cosine",
              "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    spec = build_spec("ftjob-0123456789abcdef01234567", JobRequest(model="m", training_file="file-1",
                                                                   method=_rl(cosine)),
                      Start(str(tmp_path)), "s3://b/t.jsonl", None, "s3://b/runs/x", policy, rows=100)
    assert spec.method.grpo.embeddings is not None and spec.method.grpo.embeddings.model == "bge"
    assert spec.method.grpo.judges == {}
    env = job_environment(spec, {"EMBED_KEY": "k3", "OTHER_KEY": "k2"})
    assert env == {"EMBED_KEY": "k3"}
    # a tenant cannot name an endpoint through the spec extension either
    for settings in ({"method.grpo.judges": {"x": {"base_url": "http://evil/v1"}}},
                     {"method": {"grpo": {"judges": {"x": {"base_url": "http://evil/v1"}}}}},
                     {"method": {"grpo": {"embeddings": {"base_url": "http://evil/v1"}}}}):
        with pytest.raises(Refused, match="is the operator's"):
            spec_of(tmp_path, method=_rl(CHECK), kubetune=settings)


def test_python_graders_are_refused_where_the_operator_turned_them_off(tmp_path: Path) -> None:
    from kubetune.control.jobs import JobPolicy
    from kubetune.control.policy import GradersPolicy

    req = JobRequest(model="tiny", training_file="file-1",
                     method=_rl({"type": "multi", "name": "m", "calculate_output": "p", "graders": {"p": PYTHON}}))
    with pytest.raises(Refused) as refused:
        build_spec("ftjob-0123456789abcdef01234567", req, Start(str(tmp_path)), "s3://b/t.jsonl", None,
                   "s3://b/runs/x", JobPolicy(graders=GradersPolicy(python=False)), rows=100)
    assert refused.value.param == "method.reinforcement.grader.graders.p.type"
    assert "graders.python" in str(refused.value.hint)


def test_each_tenants_wandb_projects_are_its_own_in_the_operators_account(tmp_path: Path) -> None:
    from kubetune.control.jobs import JobPolicy, wandb_project

    def project(tenant: str, operator: tuple[dict, ...] = ()) -> str | None:
        req = JobRequest(model="m", training_file="file-1",
                         integrations=[{"type": "wandb", "wandb": {"project": "support-bot"}}])
        spec = build_spec("ftjob-0123456789abcdef01234567", req, Start(str(tmp_path)), "s3://b/t.jsonl", None,
                          "s3://b/runs/x", JobPolicy(operator, integrations=("wandb",), tenant=tenant), rows=100)
        return spec.tracking.wandb_project

    nlp, vision, alice = project("team-nlp"), project("team-vision"), project("key-alice")
    assert re.fullmatch(r"team-nlp-[0-9a-f]{8}--support-bot", nlp) and vision.startswith("team-vision-") and \
        alice.startswith("key-alice-") and len({nlp, vision, alice}) == 3
    assert project("team-nlp", ({"tracking": {"wandb_project": "ops-runs"}},)) == "ops-runs"  # the operator's wins
    # names that read alike, or share a long prefix, stay apart; no tenant can spell another's prefix
    assert wandb_project("key-alice smith", "p") != wandb_project("key-alice-smith", "p")
    assert wandb_project("t" * 300 + "a", "p") != wandb_project("t" * 300 + "b", "p")
    assert len(wandb_project("t" * 300, "p" * 128)) == 128 and "--" not in wandb_project("key-a--b", "p")[:-3]
    with pytest.raises(Exception, match="may not contain '--'"):
        JobRequest(model="m", training_file="file-1", integrations=[{"type": "wandb", "wandb": {"project": "x--y"}}])


def test_reasoning_effort_is_refused_at_create_for_a_template_that_does_not_read_it(tmp_path: Path,
                                                                                   tiny_model: Path) -> None:
    """A job whose model cannot take reasoning_effort is a 400 on that field when it is created, not a
    job that fails later as if its training file were wrong."""
    req = JobRequest(model="tiny-llama", training_file="file-1", method=_rl(CHECK, reasoning_effort="low"))
    with pytest.raises(Refused) as refused:
        build_spec("ftjob-0123456789abcdef01234567", req, Start(str(tiny_model)), "s3://b/t.jsonl", None,
                   "s3://b/runs/x", rows=100)
    assert refused.value.param == "method.reinforcement.hyperparameters.reasoning_effort"
    reasoning = tmp_path / "reasoning-model"
    reasoning.mkdir()
    (reasoning / "chat_template.jinja").write_text("{{ reasoning_effort }}{% for m in messages %}{{ m.content }}"
                                                   "{% endfor %}")
    spec = build_spec("ftjob-0123456789abcdef01234567", req, Start(str(reasoning)), "s3://b/t.jsonl", None,
                      "s3://b/runs/x", rows=100)
    assert spec.method.grpo.reasoning_effort == "low"
    remote = build_spec("ftjob-0123456789abcdef01234567", req, Start("hf://org/model"), "s3://b/t.jsonl", None,
                        "s3://b/runs/x", rows=100)  # checked when the job validates, with the model's tokenizer
    assert remote.method.grpo.reasoning_effort == "low"


def test_hyperparameters_given_twice_are_refused(tmp_path: Path) -> None:
    """The deprecated top-level form and method.supervised.hyperparameters together: one would silently win."""
    with pytest.raises(Refused) as refused:
        spec_of(tmp_path, hyperparameters={"n_epochs": 1},
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert refused.value.param == "hyperparameters"
    spec = spec_of(tmp_path, hyperparameters={"n_epochs": 2}, method={"type": "supervised"})
    assert spec.train.epochs == 2


def test_a_checkpoint_at_the_end_of_each_epoch_the_last_three_kept(tmp_path: Path) -> None:
    """OpenAI's cadence for a job that trains by epochs; a cadence the caller sets wins."""
    by_epochs = spec_of(tmp_path, method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": 8}}})  # 100 rows: 13 steps an epoch
    assert (by_epochs.train.save_every_steps, by_epochs.train.keep_checkpoints) == (13, 3)
    rl = spec_of(tmp_path, method=_rl(CHECK, batch_size=5, compute_multiplier=1, n_epochs=2))
    assert rl.train.save_every_steps == 20  # 100 prompts, 5 a step
    chosen = spec_of(tmp_path, hyperparameters={"n_epochs": 2},
                     kubetune={"train": {"save_every_steps": 5, "keep_checkpoints": 1}})
    assert (chosen.train.save_every_steps, chosen.train.keep_checkpoints) == (5, 1)
    by_steps = spec_of(tmp_path, kubetune={"train": {"max_steps": 50}})
    assert by_steps.train.save_every_steps == 100  # by steps: the spec's own cadence
