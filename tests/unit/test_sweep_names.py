"""A sweep's run names are valid Kubernetes names whatever is swept: workflow B sweeps model.base over
two Hub models, whose ids made a name too long (and the URI parts invalid)."""

from __future__ import annotations

from kubetune.spec.models import NAME_RE
from kubetune.sweep import parse_grid, plan_sweep, run_name
from tests.conftest import ROOT


def test_a_sweep_over_base_models_has_short_valid_distinct_names() -> None:
    grids = parse_grid(["model.base=hf://mistralai/Mistral-7B-Instruct-v0.3,hf://meta-llama/Llama-3.2-3B-Instruct",
                        "method.lora.r=8,16"])
    spec, runs = plan_sweep(str(ROOT / "examples" / "b-summarise-qlora-serve.yaml"), grids)
    names = [r.name for r in runs]
    assert len(set(names)) == 4 and all(NAME_RE.match(n) and len(n) <= 52 for n in names), names
    assert any("llama-3p2-3b-instruct" in n for n in names)


def test_long_names_are_cut_with_a_hash_and_short_ones_stay_readable() -> None:
    assert run_name("qs", [("method.lora.r", "4"), ("train.learning_rate", "1e-4")]) == "qs-r4-lr1e-4"
    long = [("model.base", "s3://bucket/models/" + "a-very-long-model-name-" * 3), ("method.lora.r", "64")]
    other = [long[0], ("method.lora.r", "32")]
    first, second = run_name("summarise-dialogues", long), run_name("summarise-dialogues", other)
    assert first != second and len(first) <= 52 and NAME_RE.match(first) and NAME_RE.match(second)
