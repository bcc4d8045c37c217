"""The objective interface: every objective registered once under the spec's names, each with the whole
interface, and what the rest of kubetune asks of it — the OpenAI method it trains, its costs under the
control plane's caps — answered by the objective, not by branches elsewhere."""

from __future__ import annotations

import inspect

import pytest

from kubetune.control.jobs import JobPolicy
from kubetune.control.policy import Limits, Refused
from kubetune.spec.models import OBJECTIVE_NAMES
from kubetune.train.objectives import OBJECTIVES, Objective, objective_for_openai, objective_named
from tests.unit.test_control_policy import build


def test_every_objective_is_registered_under_its_spec_name_with_the_whole_interface() -> None:
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES
    wanted = {n for n, _ in inspect.getmembers(Objective, inspect.isfunction) if not n.startswith("_")}
    assert {"prepare", "trainer", "sequences_per_row", "reference_copy", "show", "sample_json"} <= wanted
    for name in OBJECTIVES:
        objective = objective_named(name)
        assert objective.name == name
        missing = {m for m in wanted if not callable(getattr(objective, m, None))}
        assert not missing, f"{name} lacks {missing}"


def test_openai_methods_map_to_their_objectives() -> None:
    assert [objective_for_openai(m) for m in ("supervised", "dpo", "reinforcement")] == ["sft", "dpo", "grpo"]
    with pytest.raises(KeyError):
        objective_for_openai("orpo")  # not an OpenAI method: reachable through the kubetune extension only


def test_a_pair_objective_costs_two_answers_a_row_under_the_token_cap() -> None:
    policy = JobPolicy(limits=Limits(max_tokens_per_job=1_000_000))
    settings = {"train.max_steps": 50, "data.max_length": 1024}  # 50 steps x 16 rows x 1,024 tokens = 819,200
    build(settings, policy=policy)
    for objective in ("orpo", "dpo", "kto"):
        with pytest.raises(Refused, match="2,048 tokens is over this server's limit"):
            build({**settings, "method.objective": objective}, policy=policy)
    with pytest.raises(Refused, match="orpo is not offered"):
        build({**settings, "method.objective": "orpo"}, policy=JobPolicy(limits=Limits(objectives=["sft", "dpo"])))
