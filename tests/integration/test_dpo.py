"""method.objective: dpo, kto and orpo — preference pairs through the run's chat template, TRL's DPOTrainer with
kubetune's batch plan, events and checkpoints; held-out preference accuracy base vs tuned; resume
after SIGKILL; a start from an SFT run's adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from tests.conftest import ROOT, assert_resumes, kill_after_first_checkpoint, kubetune_argv, run_kubetune
from tests.preferences import write_labeled, write_pairs

pytestmark = pytest.mark.integration

TRAIN = {"max_steps": 40, "total_batch_size": 8, "max_per_device_batch_size": 8, "save_every_steps": 20,
         "logging_steps": 10, "learning_rate": 5e-3}
DPO = {"type": "lora", "objective": "dpo", "lora": {"r": 8, "dropout": 0.0}}


def _learned_the_preference(run: Path) -> tuple[list, list, dict]:
    """The held-out pairs went from about chance (the starting model) to >= 90% after 40 steps;
    (events, steps, the last preference scores)."""
    events = read_events(run / "events.jsonl")
    scores = [e for e in events if e.event == "eval" and "preference_accuracy" in e.metrics][-1].metrics
    assert 0.25 <= scores["preference_accuracy_base"] <= 0.75
    assert scores["preference_accuracy"] >= 0.9 and scores["reward_accuracy"] >= 0.9 and scores["reward_margin"] > 0
    steps = [e for e in events if e.event == "step"]
    assert steps[-1].step == 40 and steps[-1].loss < steps[0].loss
    return events, steps, scores


def test_dpo_raises_held_out_preference_accuracy(write_spec, tmp_path: Path) -> None:
    # two training sources in two formats, held-out pairs in OpenAI's preference format
    plain = write_pairs(tmp_path / "plain.jsonl", 200, seed=1, fmt="plain")
    conv = write_pairs(tmp_path / "conv.jsonl", 200, seed=2)
    held = write_pairs(tmp_path / "held.jsonl", 80, seed=3, fmt="openai")
    spec = write_spec(name="dpo", method=DPO, train=TRAIN,
                      data={"train": [str(plain), str(conv)], "eval": str(held), "max_length": 128})
    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "dpo"
    events, steps, scores = _learned_the_preference(run)
    assert "rewards/accuracies" in steps[-1].metrics and "rewards/margins" in steps[-1].metrics
    start = next(e for e in events if e.event == "start")
    assert start.train_rows == 400 and start.eval_rows == 80
    report = (run / "eval" / "report.md").read_text()
    assert "| preference accuracy |" in report
    assert json.loads((run / "eval" / "metrics.json").read_text())["preference_accuracy"] == scores["preference_accuracy"]
    assert (run / "final" / "adapter" / "adapter_model.safetensors").exists()
    assert "eval at step 40: preference_accuracy_base" in res.stdout
    # served like any run (from a random base, DPO alone shifts preferences; it does not teach answers)
    chat = run_kubetune("chat", str(run), "What colour is the fox?", timeout=200)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-1000:]


def test_orpo_raises_held_out_preference_accuracy_without_a_reference(write_spec, tmp_path: Path) -> None:
    # ORPO: the chosen answers' likelihood and the odds ratio in one loss, no reference model — full
    # fine-tuning (where DPO would keep a frozen copy), its memory plan and its `plan` display
    pairs = write_pairs(tmp_path / "pairs.jsonl", 400, seed=11)
    held = write_pairs(tmp_path / "held.jsonl", 80, seed=12, fmt="openai")
    spec = write_spec(name="orpo", method={"type": "full", "objective": "orpo", "orpo": {"beta": 0.5}},
                      train={**TRAIN, "learning_rate": 1e-3},
                      data={"train": str(pairs), "eval": str(held), "max_length": 128})
    plan = run_kubetune("plan", str(spec), "--show", "1", timeout=200)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "orpo: each micro-batch runs the chosen and the rejected answers" in plan.stdout
    assert "[chosen]" in plan.stdout and "[rejected]" in plan.stdout
    shown = run_kubetune("plan", str(spec), "--show", "2", "--json", timeout=200)
    rows = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and rows[0]["chosen"][1]["trained"] and not rows[0]["rejected"][0]["trained"]
    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "orpo"
    _, steps, _ = _learned_the_preference(run)
    assert {"nll_loss", "log_odds_ratio", "rewards/accuracies"} <= set(steps[-1].metrics)
    assert steps[-1].tokens_seen > 0 and steps[-1].tokens_per_s  # both answers' tokens counted
    assert (run / "final" / "merged" / "model.safetensors").exists() and (run / "eval" / "report.md").exists()
    chat = run_kubetune("chat", str(run), "What colour is the fox?", timeout=200)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-1000:]


def test_kto_plan_shows_labeled_answers(write_spec, tmp_path: Path) -> None:
    labeled = write_labeled(tmp_path / "labeled.jsonl", 20, seed=9)
    spec = write_spec(name="ktoplan", method={**DPO, "objective": "kto"}, data={"train": str(labeled), "eval": None})
    shown = run_kubetune("plan", str(spec), "--show", "3", "--json", timeout=200)
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and {type(r["label"]) for r in rows} == {bool}
    assert [s["trained"] for s in rows[0]["segments"]] == [False, True]
    text = run_kubetune("plan", str(spec), "--show", "2", timeout=200)
    assert text.returncode == 0 and "kto: each micro-batch also runs" in text.stdout
    assert "desirable):" in text.stdout or "undesirable):" in text.stdout


def test_dpo_from_an_sft_adapter_resumes_after_sigkill(write_spec, tmp_path: Path) -> None:
    sft = write_spec(name="sft", data={"eval": None}, method={"type": "lora", "lora": {"r": 8, "dropout": 0.0}},
                     train={"max_steps": 4, "save_every_steps": 4})
    assert run_kubetune("train", str(sft), timeout=300).returncode == 0
    pairs = write_pairs(tmp_path / "pairs.jsonl", 400, seed=4)
    spec = write_spec(name="dpo2", method={**DPO, "lora": {"r": 16}},
                      model={"base": str(ROOT / "examples/assets/tiny-llama"), "adapter": str(tmp_path / "runs/sft")},
                      train={**TRAIN, "max_steps": 60, "save_every_steps": 5, "logging_steps": 5},
                      data={"train": str(pairs), "eval": None, "max_length": 128})
    out = tmp_path / "runs" / "dpo2"
    saved, output = kill_after_first_checkpoint(spec, out)
    assert "starting from the adapter of" in output and "(r=8" in output  # the SFT adapter, not a new r=16 one
    assert_resumes(spec, out, saved, last=60, logging=5)
    assert '"r": 8' in (out / "final" / "adapter" / "adapter_config.json").read_text()


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo", "grpo"])
def test_every_objective_renders_for_kubernetes(write_spec, tmp_path: Path, cli, objective: str) -> None:
    import yaml

    pairs = write_pairs(tmp_path / "pairs.jsonl", 10, seed=5)
    method = {**DPO, "objective": objective,
              "grpo": {"rewards": [{"function": "regex", "pattern": "The .*"}]}}
    spec = write_spec(name=f"{objective}k8s", method=method, data={"train": str(pairs), "eval": None},
                      output=f"s3://bucket/runs/{objective}k8s", resources={"accelerator": "nvidia", "devices_per_node": 2})
    code, out, _ = cli("render", str(spec))
    assert code == 0
    objects = [o for o in yaml.safe_load_all(out) if o]
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-spec"))
    assert yaml.safe_load(config["data"]["spec.yaml"])["method"]["objective"] == objective
    job = next(o for o in objects if o["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert kubetune_argv(container)[:2] == ["kubetune", "train"]  # the same entry point as SFT, resumable
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "2"


def test_kto_resumes_after_sigkill(write_spec, tmp_path: Path) -> None:
    labeled = write_labeled(tmp_path / "labeled.jsonl", 400, seed=8)
    spec = write_spec(name="ktokill", method={**DPO, "objective": "kto"},
                      train={**TRAIN, "max_steps": 30, "save_every_steps": 5, "logging_steps": 5},
                      data={"train": str(labeled), "eval": None, "max_length": 128})
    out = tmp_path / "runs" / "ktokill"
    saved, _ = kill_after_first_checkpoint(spec, out)
    assert_resumes(spec, out, saved, last=30, logging=5)
    chat = run_kubetune("chat", str(out), "What colour is the fox?", timeout=200)  # served like any run
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-1000:]


def test_kto_on_labeled_answers_moves_held_out_preference_accuracy(write_spec, tmp_path: Path) -> None:
    labeled = write_labeled(tmp_path / "labeled.jsonl", 400, seed=6)
    held = write_pairs(tmp_path / "held.jsonl", 80, seed=7, fmt="openai")
    spec = write_spec(name="kto", method={**DPO, "objective": "kto"}, train=TRAIN,
                      data={"train": str(labeled), "eval": str(held), "max_length": 128})
    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "kto"
    events = read_events(run / "events.jsonl")
    scores = [e for e in events if e.event == "eval" and "preference_accuracy" in e.metrics][-1].metrics
    assert 0.25 <= scores["preference_accuracy_base"] <= 0.75
    assert scores["preference_accuracy"] >= scores["preference_accuracy_base"] + 0.2 and scores["reward_margin"] > 0
    steps = [e for e in events if e.event == "step"]
    assert steps[-1].loss < steps[0].loss and "kl" in steps[-1].metrics
    assert (run / "eval" / "report.md").exists() and (run / "final" / "adapter" / "adapter_model.safetensors").exists()
