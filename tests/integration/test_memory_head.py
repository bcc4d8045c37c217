"""The memory plan against a measured peak where the output head dominates: a Qwen3-vocabulary (152k)
tiny model trained on a tool-calling conversation whose hermes tool schemas (masked) are most of its
tokens. The trainer computes logits on trained positions only, and the plan counts just those."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from kubetune.spec.load import load_spec
from kubetune.train.memory import plan_for_run, plan_memory
from kubetune.train.objectives import objective_for
from tests.integration.test_family_serving import MESSAGES, TOOLS, train

pytestmark = pytest.mark.integration


def test_plan_matches_the_peak_of_a_chat_run_with_a_large_vocabulary(tmp_path: Path) -> None:
    spec_path, run = train("qwen3", tmp_path, {"tools": TOOLS, "messages": MESSAGES}, steps=4)
    measured = [e for e in read_events(run / "events.jsonl") if e.event == "end"][-1].peak_memory_bytes

    spec = load_spec(spec_path)
    plan = plan_for_run(spec, objective_for(spec).prepare(spec), local=True)
    every = plan_memory(spec, dataclasses.replace(plan._inputs, trained=()), micro_batch=plan.micro_batch)  # type: ignore[attr-defined]
    assert 0.8 <= plan.peak / measured <= 1.2, (plan.lines(), measured)
    # the head on every position would plan far more than the run holds
    assert every.peak / measured > 1.4, (every.lines(), measured)
