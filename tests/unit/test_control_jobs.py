"""OpenAI's fine-tuning request → kubetune run spec: hyperparameters, methods, the extension field,
model references and the names the caller sees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetune.control.jobs import JobRequest, build_spec, job_object, model_name, model_uri, resolved_hyperparameters
from kubetune.errors import SpecError, UsageError


def spec_of(tmp_path: Path, **request: object):
    req = JobRequest(model=str(tmp_path), training_file="file-1", **request)
    return build_spec("ftjob-0123456789abcdef01234567", req, "s3://b/files/file-1/train.jsonl", None,
                      "s3://b/runs/ftjob-0123456789abcdef01234567")


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
    with pytest.raises(UsageError, match="set by the server"):
        spec_of(tmp_path, kubetune={"output": "s3://elsewhere"})
    assert spec_of(tmp_path, kubetune={"method": {"lora": {"r": 4}}}).method.lora.r == 4


def test_model_references() -> None:
    assert model_uri("Qwen/Qwen3-0.6B") == "hf://Qwen/Qwen3-0.6B"
    assert model_uri("s3://bucket/models/llama") == "s3://bucket/models/llama"
    with pytest.raises(UsageError, match="not a Hub id"):
        model_uri("gpt 4")
    name = model_name("hf://Qwen/Qwen3-0.6B@main", "support-bot", "ftjob-89abcdef0123456789abcdef")
    assert name == "ft:Qwen3-0.6B:support-bot:89abcdef"
    assert re.fullmatch(r"ft:llama::[0-9a-f]{8}", model_name("s3://b/models/llama", None, "ftjob-0123456789ab"))


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
