"""The run spec: located errors (file:line + field path), all at once, did-you-mean, --set, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.errors import SpecError, UsageError
from kubetune.spec import load_spec

BROKEN = """\
name: demo
model:
  base: some/model
  dtyp: float32
data:
  train:
    - path: a.jsonl
      weigth: 2
    - b.jsonl
  eval: {split_ratio: 1.5}
  max_lenght: 10
method:
  lora: {r: 0, target_modules: []}
train:
  learning_rate: -1
  too_long: drop
"""


def _problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides or [])
    return [str(p) for p in info.value.problems]


def test_every_error_at_once_with_line_path_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BROKEN)
    problems = _problems(path)
    expected = [
        f"{path}:4: model.dtyp: unknown key 'dtyp'; did you mean 'dtype'?",
        f"{path}:8: data.train[0].weigth: unknown key 'weigth'; did you mean 'weight'?",
        f"{path}:11: data.max_lenght: unknown key 'max_lenght'; did you mean 'max_length'?",
    ]
    for line in expected:
        assert line in problems
    assert any(p.startswith(f"{path}:10: data.eval.split_ratio:") and "less than 1" in p for p in problems)
    assert any(p.startswith(f"{path}:13: method.lora.r:") for p in problems)
    assert any("method.lora.target_modules" in p and "at least one" in p for p in problems)
    assert any(p.startswith(f"{path}:15: train.learning_rate:") for p in problems)
    # A key put in the wrong section says where it belongs.
    assert f"{path}:16: train.too_long: unknown key 'too_long'; it belongs in data.too_long" in problems
    assert len(problems) == 8


def test_set_overrides_are_yaml_typed(write_spec) -> None:
    path = write_spec()
    spec = load_spec(path, ["train.learning_rate=1e-4", "method.lora.r=8", "data.train.0.weight=0.5",
                            "method.lora.target_modules=[q_proj, v_proj]", "train.gradient_checkpointing=true"])
    assert spec.train.learning_rate == pytest.approx(1e-4)
    assert spec.method.lora.r == 8
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.train.gradient_checkpointing is True
    assert spec.data.sources()[0].weight == 0.5


def test_set_unknown_key_is_named_as_the_flag(write_spec) -> None:
    problems = _problems(write_spec(), ["train.total_batch_sise=3"])
    assert problems == ["--set train.total_batch_sise=3: train.total_batch_sise: unknown key "
                        "'total_batch_sise'; did you mean 'total_batch_size'?"]


def test_set_without_equals_is_a_usage_error(write_spec) -> None:
    with pytest.raises(UsageError, match="expected key.path=value"):
        load_spec(write_spec(), ["train.learning_rate"])


def test_cross_field_rules(write_spec) -> None:
    path = write_spec(method={"type": "qlora"}, train={"total_batch_size": 9},
                      resources={"accelerator": "cpu", "devices_per_node": 2})
    problems = _problems(path)
    assert any("method.type" in p and "qlora needs NVIDIA GPUs" in p for p in problems)
    assert any("train.total_batch_size" in p and "not divisible by the 2 processes" in p for p in problems)


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nmodel:\n  base: [unclosed\n")
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:") and "not valid YAML" in problems[0]


def test_name_must_be_dns_safe(write_spec) -> None:
    problems = _problems(write_spec(name="My_Run"))
    assert any(p.endswith("(got 'My_Run')") and "name" in p for p in problems)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_schema_has_descriptions(cli) -> None:
    code, out, _ = cli("schema")
    schema = json.loads(out)
    assert code == 0
    assert set(schema["properties"]) >= {"name", "model", "data", "method", "train", "output", "resume", "tracking",
                                         "eval", "resources"}
    lora = schema["$defs"]["LoraSpec"]["properties"]
    assert "matching no module" in lora["target_modules"]["description"]
    assert schema["$defs"]["DataSpec"]["additionalProperties"] is False


def test_field_and_cross_field_problems_come_in_one_report(tmp_path: Path) -> None:
    spec = tmp_path / "both.yaml"
    spec.write_text("name: Bad_Name\nmodel: {base: x}\ndata: {train: x.jsonl, max_length: 3}\nmethod: {type: qlora}\n"
                    "train: {total_batch_size: 7, learning_rate: -1}\nresources: {accelerator: gaudi, devices_per_node: 2}\n"
                    "serve: {autoscaling: {min: 5, max: 2}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    found = {str(p).split(": ", 2)[1]: str(p) for p in info.value.problems}
    # field problems ...
    assert {"name", "data.max_length", "train.learning_rate"} <= set(found)
    # ... and, in the same report, every cross-field rule the rest of the spec breaks
    assert "qlora needs NVIDIA GPUs" in found["method.type"] and f"{spec}:4" in found["method.type"]
    assert "7 is not divisible by the 2 processes" in found["train.total_batch_size"]
    assert "must not be above serve.autoscaling.max" in found["serve.autoscaling.min"]


def test_a_cross_field_rule_on_a_broken_field_is_not_judged_by_its_default(tmp_path: Path) -> None:
    spec = tmp_path / "b.yaml"
    spec.write_text("name: ok\nmodel: {base: x}\ndata: {train: x.jsonl}\ntrain: {total_batch_size: many}\n"
                    "resources: {devices_per_node: 3}\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    text = "\n".join(map(str, info.value.problems))
    assert "train.total_batch_size: Input should be a valid integer" in text
    assert "not divisible" not in text  # the default 16 was not what the user wrote


def test_a_spec_that_is_not_text_or_not_a_file_is_a_usage_error(tmp_path: Path, cli) -> None:
    binary = tmp_path / "model.safetensors.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 10)
    for path, expected in ((binary, "is not UTF-8 text"), (tmp_path, "cannot read spec")):
        code, out, err = cli("validate", str(path))
        assert code == 2 and expected in err and "Traceback" not in err
