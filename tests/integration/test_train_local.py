"""Real training on the tiny model: run layout, adapter contents, merge parity, chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from kubetune.artifacts.events import read_events
from tests.conftest import run_kubetune

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    from tests.conftest import QUICKSTART_DATA

    tmp = tmp_path_factory.mktemp("run")
    spec = {
        "name": "e2e", "model": {"base": str(tiny_model)},
        "data": {"train": str(QUICKSTART_DATA / "train.jsonl"), "eval": str(QUICKSTART_DATA / "eval.jsonl"),
                 "max_length": 128},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
        "train": {"max_steps": 30, "total_batch_size": 8, "max_per_device_batch_size": 4, "save_every_steps": 10,
                  "keep_checkpoints": 2, "logging_steps": 5, "learning_rate": 3e-3},
        "output": str(tmp / "runs" / "e2e"), "resources": {"accelerator": "cpu"},
        "eval": {"metrics": ["loss", "rouge", "exact_match"], "num_samples": 8, "max_new_tokens": 16},
    }
    path = tmp / "e2e.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = run_kubetune("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 30/30" in res.stdout  # plain progress lines when not on a terminal
    assert "Loading weights" not in res.stdout + res.stderr  # no tqdm bars in logs
    return tmp / "runs" / "e2e"


def test_train_with_eval_metrics_writes_the_evaluation(trained: Path) -> None:
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"base", "tuned", "num_samples", "num_loss_rows"}
    for model in ("base", "tuned"):
        assert set(metrics[model]) == {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert metrics["num_samples"] == 8 and metrics["num_loss_rows"] == 60
    # 30 steps already move the tuned model well away from the random base on its own eval rows.
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"] - 1.0
    rows = [json.loads(line) for line in (trained / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "reference", "base", "tuned"} <= set(r) for r in rows)
    report = (trained / "eval" / "report.md").read_text()
    assert "| rougeL |" in report and "![loss curve](loss.png)" in report
    assert (trained / "eval" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_run_layout(trained: Path) -> None:
    spec = yaml.safe_load((trained / "spec.yaml").read_text())
    assert spec["train"]["max_steps"] == 30 and spec["data"]["too_long"] == "truncate"  # resolved, defaults filled
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"] and manifest["seed"] == 42
    assert all(len(h) == 64 for h in manifest["data"].values()) and len(manifest["data"]) == 2
    assert manifest["hardware"]["cpu_count"] >= 1
    events = read_events(trained / "events.jsonl")
    kinds = [e.event for e in events]
    assert kinds[0] == "start" and "eval" in kinds and kinds.index("eval_report") == kinds.index("end") + 1
    steps = [e for e in events if e.event == "step"]
    assert [e.step for e in steps] == [5, 10, 15, 20, 25, 30]
    assert all(e.total_steps == 30 and e.loss > 0 and e.learning_rate is not None for e in steps)
    assert all(e.tokens_per_s > 0 and e.eta_s is not None for e in steps)
    assert events[0].per_device_batch == 4 and events[0].accumulation == 2
    # Retention: the two newest complete checkpoints remain, each with its marker.
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-20", "checkpoint-30"]
    assert all((trained / "checkpoints" / c / "COMPLETE").exists() for c in ckpts)
    assert (trained / "final" / "COMPLETE").exists()


def test_adapter_holds_only_lora_tensors_and_the_template(trained: Path) -> None:
    adapter = trained / "final" / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"q_proj", "v_proj", "down_proj"}
    assert "<|im_start|>" in (adapter / "chat_template.jinja").read_text()
    gen = json.loads((adapter / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == 5  # <|im_end|> first: generation stops at the end of the turn
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in adapter.iterdir())


def test_finished_run_is_not_retrained(trained: Path) -> None:
    res = run_kubetune("train", str(trained.parent.parent / "e2e.yaml"))
    assert res.returncode == 0 and "already finished" in res.stdout
    changed = run_kubetune("train", str(trained.parent.parent / "e2e.yaml"), "--set", "train.learning_rate=1e-3")
    assert changed.returncode == 2
    assert "already finished with a different spec (train.learning_rate: 0.003 -> 0.001)" in changed.stderr


def test_merge_matches_adapter_on_base_and_chat_answers(trained: Path) -> None:
    res = run_kubetune("merge", str(trained))
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.split("max |logit diff| vs adapter-on-base: ")[1].split(";")[0])
    worst_layer = float(res.stdout.split("worst layer vs PEFT's LoRA forward: ")[1].split(";")[0])
    assert diff < 1e-4 and worst_layer < 1e-5  # fp32 round-off only
    merged = trained / "final" / "merged"
    assert (merged / "model.safetensors").exists() and (merged / "chat_template.jinja").exists()
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"][0] == 5
    merge_events = [e for e in read_events(trained / "events.jsonl") if e.event == "merge"]
    assert merge_events and merge_events[-1].max_logit_diff == pytest.approx(diff, rel=1e-2)
    config = json.loads((trained / "final" / "merged" / "config.json").read_text())
    assert merge_events[-1].largest_weight_bytes == 4 * config["hidden_size"] * config["intermediate_size"]  # mlp
    layers_only = run_kubetune("merge", str(trained), "--check", "layers")  # what a model too big for memory gets
    assert layers_only.returncode == 0 and "whole-model logits not checked" in layers_only.stdout
    assert [e for e in read_events(trained / "events.jsonl") if e.event == "merge"][-1].max_logit_diff is None
    chat = run_kubetune("chat", str(trained), "--compare", "Describe a blue fox.", "--max-new-tokens", "12")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "> Describe a blue fox." in chat.stdout and "base:" in chat.stdout and "tuned:" in chat.stdout


def test_unknown_target_module_lists_the_real_ones(write_spec, tmp_path: Path) -> None:
    res = run_kubetune("train", str(write_spec(method={"lora": {"target_modules": ["q_proj", "vproj"]}})))
    assert res.returncode == 2
    assert "method.lora.target_modules[1]: 'vproj' matches no linear layer; did you mean 'v_proj'?" in res.stderr
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "t").exists()  # a config mistake leaves no half-made run behind


def test_unknown_optimizer_is_a_spec_error(write_spec, tmp_path: Path) -> None:
    res = run_kubetune("train", str(write_spec(train={"optim": "adamw_nope"})))
    assert res.returncode == 2 and "train.optim: adamw_nope is not a valid OptimizerNames" in res.stderr
    assert not (tmp_path / "runs" / "t").exists()


def test_qlora_without_cuda_is_a_clear_error(write_spec) -> None:
    res = run_kubetune("train", str(write_spec(method={"type": "qlora"}, resources={"accelerator": "auto"})))
    assert res.returncode == 2
    assert "qlora needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr


def test_full_fine_tune_writes_the_model(write_spec, tmp_path: Path) -> None:
    res = run_kubetune("train", str(write_spec(name="full", method={"type": "full"},
                                               train={"max_steps": 4, "save_every_steps": 4})))
    assert res.returncode == 0, res.stderr[-2000:]
    merged = tmp_path / "runs" / "full" / "final" / "merged"
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()


def test_eval_verb_without_base(trained: Path) -> None:
    res = run_kubetune("eval", str(trained), "--no-base")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    assert "base" not in metrics and "rougeL" in metrics["tuned"]
    assert res.stdout.splitlines()[0].split() == ["metric", "tuned"]


def test_a_merge_is_saved_in_the_base_models_dtype(tmp_path: Path, tiny_model: Path) -> None:
    """A bf16 base merges (checked in fp32) into bf16 weights: a 7B model stays 14 GB on disk, not 28."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import QUICKSTART_DATA

    base = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    spec = {"name": "bf16", "model": {"base": str(base)},
            "data": {"train": str(QUICKSTART_DATA / "train.jsonl"), "eval": None, "max_length": 64},
            "train": {"max_steps": 6, "total_batch_size": 8, "max_per_device_batch_size": 8, "save_every_steps": 6,
                      "logging_steps": 3, "learning_rate": 3e-3},
            "output": str(tmp_path / "runs" / "bf16"), "resources": {"accelerator": "cpu"}}
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(spec))
    trained = run_kubetune("train", str(tmp_path / "bf16.yaml"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    merged = run_kubetune("merge", str(tmp_path / "runs" / "bf16"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    folder = tmp_path / "runs" / "bf16" / "final" / "merged"
    config = json.loads((folder / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_push_writes_a_model_card_from_the_run(trained: Path, tmp_path: Path) -> None:
    """Workflow B publishes its model: the card names the base, the data by hash, the method and the
    eval scores base vs tuned, all read from what the run recorded."""
    import hashlib

    from tests.conftest import QUICKSTART_DATA

    res = run_kubetune("push", str(trained), "--to", str(tmp_path / "published"))
    assert res.returncode == 0, res.stderr[-2000:]
    card = (tmp_path / "published" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"].endswith("examples/assets/tiny-llama")  # the spec's model.base
    assert "kubetune" in front["tags"] and front["library_name"] in ("peft", "transformers")
    digest = hashlib.sha256((QUICKSTART_DATA / "train.jsonl").read_bytes()).hexdigest()
    assert digest in card and "LoRA r=8, alpha=16" in card and "q_proj, v_proj, down_proj" in card
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    base = (metrics.get("base") or {}).get("rougeL")  # a later eval of this run may have skipped the base
    shown = f"{base:.4g}" if base is not None else "—"
    assert f"| rougeL | {shown} | {metrics['tuned']['rougeL']:.4g} |" in card
    assert (tmp_path / "published" / "tokenizer_config.json").exists()
    # the merged model is published whole when the run has one, else the adapter: both, in this order
    import shutil

    published = {p.name for p in (tmp_path / "published").iterdir()}
    if (trained / "final" / "merged").exists():
        assert front["library_name"] == "transformers" and "model.safetensors" in published
        assert "adapter_config.json" not in published
    else:
        assert front["library_name"] == "peft" and "adapter_model.safetensors" in published
        res = run_kubetune("merge", str(trained))
        assert res.returncode == 0, res.stderr[-2000:]
        res = run_kubetune("push", str(trained), "--to", str(tmp_path / "merged-published"))
        assert res.returncode == 0, res.stderr[-2000:]
        merged = {p.name for p in (tmp_path / "merged-published").iterdir()}
        front = yaml.safe_load((tmp_path / "merged-published" / "README.md").read_text().split("---")[1])
        assert front["library_name"] == "transformers" and "model.safetensors" in merged
        assert "adapter_config.json" not in merged
    shutil.rmtree(tmp_path / "published")
