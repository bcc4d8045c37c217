"""method.objective: grpo — from an SFT run's adapter, rewards from built-ins, OpenAI graders (a
sandboxed python grader in a multi grader) and an import path, generation with transformers on CPU; the policy's mean reward on held-out prompts rises above the
SFT starting point; SIGKILL and resume; bad prompts and reward paths are exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from tests.conftest import ROOT, assert_resumes, kill_after_first_checkpoint, run_kubetune

pytestmark = pytest.mark.integration

# The right sum, checked by a python grader (sandboxed) and a string check: OpenAI's graders as a reward
SUM = ("import re\n"
       "def grade(sample, item):\n"
       "    found = re.search(r'is (\\d+)\\.', sample['output_text'])\n"
       "    return float(bool(found) and found.group(1) == item['answer'])\n")
GRADER = {"type": "multi", "name": "arithmetic", "calculate_output": "0.5 * right + 0.5 * shape",
          "graders": {"right": {"type": "python", "name": "right", "source": SUM},
                      "shape": {"type": "string_check", "name": "shape", "input": "{{sample.output_text}}",
                                "reference": " plus ", "operation": "like"}}}
EXACT = {"function": "exact_match", "column": "answer", "pattern": r"is (\d+)\."}
REWARDS = [EXACT, {"function": "grader", "grader": GRADER, "weight": 0.5},
           {"function": "regex", "pattern": r"\d+ plus \d+ is \d+\.", "weight": 0.5},
           {"function": "tests.rewards:ends_with_period", "weight": 0.1}]


def _arithmetic(path: Path, n: int, seed: int, sft: bool = False) -> Path:
    """Sums of numbers up to 20, answered 'A plus B is C.': SFT chats, or prompts with the answer column."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            question = f"What is {a} plus {b}?"
            row = ({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} if sft
                   else {"prompt": question, "answer": str(a + b)})
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def sft_run(write_spec, tmp_path: Path) -> Path:
    """A short SFT run: the answer format half learned, the sums mostly not."""
    spec = write_spec(name="sft", method={"type": "lora", "lora": {"r": 16, "dropout": 0.0}},
                      data={"train": str(_arithmetic(tmp_path / "sft.jsonl", 600, 1, sft=True)), "eval": None},
                      train={"max_steps": 250, "total_batch_size": 16, "max_per_device_batch_size": 16,
                             "save_every_steps": 250, "logging_steps": 50, "learning_rate": 3e-3})
    res = run_kubetune("train", str(spec), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp_path / "runs" / "sft"


def _grpo_spec(write_spec, tmp_path: Path, sft: Path, name: str, **train: object) -> Path:
    return write_spec(name=name, model={"base": str(ROOT / "examples/assets/tiny-llama"), "adapter": str(sft)},
                      method={"type": "lora", "objective": "grpo",
                              "grpo": {"num_generations": 4, "max_new_tokens": 16, "temperature": 0.7,
                                       "rewards": REWARDS}},
                      data={"train": str(_arithmetic(tmp_path / "prompts.jsonl", 300, 2)),
                            "eval": str(_arithmetic(tmp_path / "held.jsonl", 40, 3)), "max_length": 128},
                      train={"max_steps": 60, "total_batch_size": 16, "max_per_device_batch_size": 16,
                             "save_every_steps": 60, "logging_steps": 5, "learning_rate": 5e-4, **train})


def test_grpo_raises_the_held_out_reward_above_the_sft_start(write_spec, tmp_path: Path, sft_run: Path) -> None:
    res = run_kubetune("train", str(_grpo_spec(write_spec, tmp_path, sft_run, "grpo")), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "grpo"
    events = read_events(run / "events.jsonl")
    evals = [e.metrics for e in events if e.event == "eval"]
    start = next(m for m in evals if "reward_start" in m)
    tuned = next(m for m in reversed(evals) if "reward" in m)
    assert tuned["reward"] >= start["reward_start"] + 0.15, (start, tuned)
    for name in ("exact_match_answer", "grader_arithmetic", "regex", "ends_with_period"):  # per function
        assert f"reward/{name}_start" in start and f"reward/{name}" in tuned
    # the graders' own held-out scores rise too: the python grader agrees with exact_match
    assert tuned["grader/right/mean"] == pytest.approx(tuned["reward/exact_match_answer"])
    # (+0.094 in one clean-clone run on a loaded machine, +0.1 and more elsewhere: thread counts change the
    # sampled answers; the combined reward above carries the strict margin)
    assert tuned["reward/grader_arithmetic"] >= start["reward/grader_arithmetic_start"] + 0.05, (start, tuned)
    steps = [e for e in events if e.event == "step"]
    assert steps[-1].step == 60 and "rewards/regex/mean" in steps[-1].metrics and steps[-1].tokens_per_s
    assert "grader/right/mean" in steps[-1].metrics and steps[-1].metrics["grader/python_error_mean"] == 0.0
    assert "| reward |" in (run / "eval" / "report.md").read_text()
    assert "eval at step 0: reward_start" in res.stdout


def test_grpo_resumes_after_sigkill(write_spec, tmp_path: Path, sft_run: Path) -> None:
    spec = _grpo_spec(write_spec, tmp_path, sft_run, "grpokill", max_steps=30, save_every_steps=5)
    out = tmp_path / "runs" / "grpokill"
    saved, _ = kill_after_first_checkpoint(spec, out)
    assert_resumes(spec, out, saved, last=30, logging=5)
    assert (out / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_grpo_inputs_are_checked(write_spec, tmp_path: Path, cli) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 plus 1?", "answer": "2"}) + "\n"
                       + json.dumps({"prompt": "What is 2 plus 2?"}) + "\n")
    grpo = {"type": "lora", "objective": "grpo", "grpo": {"rewards": [EXACT]}}
    code, _, err = cli("validate", str(write_spec(name="g1", method=grpo, data={"train": str(prompts), "eval": None})))
    assert code == 2 and f"{prompts}:2" in err and "missing column 'answer'" in err and f"{prompts}:1" not in err
    bad = {**grpo, "grpo": {"rewards": [{"function": "tests.nowhere:reward"}]}}
    code, _, err = cli("validate", str(write_spec(name="g2", method=bad, data={"train": str(prompts), "eval": None})))
    assert code == 2 and "method.grpo.rewards.0.function" in err and "cannot import tests.nowhere:reward" in err
    code, _, err = cli("validate", str(write_spec(name="g3", method={"type": "lora", "objective": "grpo"},
                                                  train={"total_batch_size": 6},
                                                  data={"train": str(prompts), "eval": None})))
    assert code == 2 and "method.grpo.rewards" in err and "multiple of method.grpo.num_generations" in err
    assert "Traceback" not in err


def test_the_steps_of_an_epoch_count_every_answer_to_a_prompt(write_spec, tmp_path: Path, sft_run: Path) -> None:
    """The batch counts answers (num_generations per prompt): 300 prompts x 4 answers in batches of 16 are
    75 steps an epoch, as the trainer runs them, in the plan (and the start event) — not 300 / 16."""
    spec = _grpo_spec(write_spec, tmp_path, sft_run, "grpoplan", max_steps=-1, epochs=1)
    res = run_kubetune("plan", str(spec), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "optimizer steps: 75" in res.stdout, res.stdout
