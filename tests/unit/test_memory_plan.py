"""The per-device memory plan: its arithmetic on a real 7B config, the strategies it compares, and
the refusal (exit 2, with fixes) of `train`, `render` and `submit` when a plan cannot fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.errors import UsageError
from kubetune.spec.load import load_spec
from kubetune.train.memory import Inputs, Shape, check_fits, fixes, parse_size, plan_memory
from tests.conftest import QUICKSTART_DATA

# Llama-2-7B's config.json (the architecture of the seeds' 8-card full fine-tune)
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
PARAMS_7B = 6_738_415_616


def _spec(write_spec, **sections):
    return load_spec(write_spec(**sections))


def _inputs(seq: int = 4096) -> Inputs:
    return Inputs(Shape.from_config(LLAMA2_7B, PARAMS_7B), seq, seq // 2, local=False)


def test_full_7b_on_8_gpus_needs_sharding(write_spec) -> None:
    spec = _spec(write_spec, method={"type": "full"},
                 train={"total_batch_size": 16, "max_per_device_batch_size": 2, "gradient_checkpointing": True},
                 resources={"accelerator": "nvidia", "devices_per_node": 8, "device_memory": "40GB"})
    ddp = plan_memory(spec, _inputs())
    # bf16 weights (2 bytes), their gradients and DDP's bucket copy (2 + 2), Adam's two moments (4)
    assert ddp.weights == pytest.approx(2 * PARAMS_7B, rel=0.01)
    assert ddp.gradients == pytest.approx(4 * PARAMS_7B, rel=0.01)
    assert ddp.optimizer == pytest.approx(4 * PARAMS_7B, rel=0.01)
    assert not ddp.fits and ddp.peak > 67e9  # 10 bytes per parameter before activations
    fsdp = plan_memory(spec, _inputs(), strategy="fsdp")
    assert fsdp.fits and fsdp.peak < 40e9
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8)
    suggestions = fixes(spec, ddp)
    assert any(s.startswith("resources.strategy: fsdp") for s in suggestions)
    with pytest.raises(UsageError) as info:
        check_fits(spec, ddp)
    assert info.value.exit_code == 2 and "resources.strategy: fsdp" in info.value.render()


def test_activations_scale_with_the_micro_batch_and_checkpointing_cuts_them(write_spec) -> None:
    spec = _spec(write_spec, method={"type": "lora"}, train={"gradient_checkpointing": False},
                 resources={"accelerator": "nvidia", "device_memory": "80GB"})
    one = plan_memory(spec, _inputs(2048), micro_batch=1)
    four = plan_memory(spec, _inputs(2048), micro_batch=4)
    assert four.activations == pytest.approx(4 * one.activations)
    assert one.activations_on < one.activations_off / 5
    # LoRA: the frozen base in bf16, only the adapter's gradients and Adam state
    assert one.gradients < 0.02 * one.weights and one.optimizer < 0.03 * one.weights
    best = one.max_micro_batch
    assert best and best >= 2 and plan_memory(spec, _inputs(2048), micro_batch=best).fits
    assert not plan_memory(spec, _inputs(2048), micro_batch=best + 1).fits


def test_lora_dropout_costs_activation_memory(write_spec) -> None:
    base = {"accelerator": "nvidia", "device_memory": "80GB"}
    with_dropout = plan_memory(_spec(write_spec, method={"type": "lora", "lora": {"dropout": 0.05}}, resources=base),
                               _inputs(), micro_batch=1, checkpointing="off")
    without = plan_memory(_spec(write_spec, method={"type": "lora", "lora": {"dropout": 0.0}}, resources=base),
                          _inputs(), micro_batch=1, checkpointing="off")
    assert with_dropout.activations > 1.2 * without.activations


def test_device_memory_from_the_node_selector_and_sizes() -> None:
    from kubetune.train.memory import device_memory

    assert parse_size("80GB") == 80e9 and parse_size("24GiB") == 24 * 2**30 and parse_size("512Mi") == 512 * 2**20
    spec = load_spec_dict({"kubernetes": {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}},
                           "resources": {"accelerator": "nvidia"}})
    assert device_memory(spec, local=False) == (80e9, "NVIDIA-A100-SXM4-80GB")
    spec = load_spec_dict({"kubernetes": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}})
    assert device_memory(spec, local=False)[0] == 24e9
    assert device_memory(load_spec_dict({"resources": {"accelerator": "nvidia"}}), local=False) == (None, "unknown")


def load_spec_dict(sections: dict) -> object:
    import tempfile

    import yaml

    body = {"name": "m", "model": {"base": "hf://org/model"}, "data": {"train": "x.jsonl"}, **sections}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(body, fh)
    return load_spec(fh.name)


def test_spec_rules_for_strategy(write_spec) -> None:
    from kubetune.errors import SpecError

    for sections, field, text in [
        ({"resources": {"accelerator": "cpu", "strategy": "fsdp"}}, "resources.strategy", "nodes x devices_per_node is 1"),
        ({"resources": {"accelerator": "cpu", "devices_per_node": 2, "strategy": "ddp", "offload": True}},
         "resources.offload", "offload is FSDP's"),
        ({"resources": {"accelerator": "cpu", "device_memory": "lots"}}, "resources.device_memory", "not a size"),
        ({"resources": {"accelerator": "cpu", "devices_per_node": 2, "strategy": "fsdp", "offload": True}},
         "resources.offload", "nothing to offload"),
    ]:
        with pytest.raises(SpecError) as info:
            load_spec(write_spec(**sections))
        assert field in info.value.render() and text in info.value.render()


def test_render_refuses_a_run_that_cannot_fit_the_clusters_gpus(tmp_path: Path, write_spec, cli) -> None:
    base = tmp_path / "llama-2-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA2_7B))  # readable without a download: it is planned
    spec = write_spec(model={"base": str(base)}, method={"type": "full"}, output="s3://bucket/runs/big",
                      train={"total_batch_size": 16, "max_per_device_batch_size": 2},
                      data={"train": "s3://bucket/data/train.jsonl", "max_length": 4096},
                      resources={"accelerator": "nvidia", "devices_per_node": 8, "strategy": "ddp"},
                      kubernetes={"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}})
    code, out, err = cli("render", str(spec))
    assert code == 2 and out == "" and "Traceback" not in err
    assert "per device and NVIDIA-A100-SXM4-40GB has 40.0 GB" in err and "resources.strategy: fsdp" in err
    code, out, err = cli("submit", str(spec))  # refused before any cluster is contacted
    assert code == 2 and "NVIDIA-A100-SXM4-40GB has 40.0 GB" in err and "Traceback" not in err
    code, out, _ = cli("render", str(spec), "--set", "resources.strategy=fsdp")
    assert code == 0 and "kind: Job" in out
    code, out, _ = cli("render", str(spec), "--set", "resources.strategy=auto")  # auto shards in the pod
    assert code == 0 and "kind: Job" in out


def test_plan_prints_the_memory_plan_and_train_refuses_before_loading(write_spec, cli, tmp_path: Path) -> None:
    spec = write_spec(name="mem", data={"train": str(QUICKSTART_DATA / "train.jsonl"), "eval": None})
    code, out, _ = cli("plan", str(spec))
    assert code == 0 and "memory per device (one process; micro-batch 8 x" in out
    assert "largest micro-batch that fits:" in out and "peak ~" in out
    code, out, err = cli("train", str(spec), "--set", "resources.device_memory=100MB")
    assert code == 2 and "the run needs ~" in err and "resources.device_memory has 100 MB" in err
    assert not (tmp_path / "runs" / "mem" / "checkpoints").exists()


QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960}


def chat_counts(n: int) -> tuple[int, ...]:
    return (400, 350) + (300,) * (n - 2)


def test_the_sft_head_is_planned_on_trained_positions_only(write_spec) -> None:
    """Chat SFT with a 152k vocabulary: the head's logits, log-softmax and their gradient are planned for the
    positions trained in any row of the micro-batch (the trainer computes no others), capped by its length."""
    spec = _spec(write_spec, method={"type": "lora"},
                 train={"total_batch_size": 8, "max_per_device_batch_size": 8, "gradient_checkpointing": True},
                 resources={"accelerator": "nvidia", "device_memory": "80GB"})
    shape = Shape.from_config(QWEN3_8B, 8_190_735_360)
    every = plan_memory(spec, Inputs(shape, 4096, 2048, local=False))
    chat = plan_memory(spec, Inputs(shape, 4096, 2048, local=False, trained=chat_counts(64)))
    kept = 8 * (400 + 350 + 6 * 300)  # per row: the union is at most the sum of the 8 largest counts
    # bf16 logits, their fp32 copy and log-softmax (10 bytes a value) saved; the fp32 gradient (4) at the peak
    assert every.activations - chat.activations == pytest.approx((8 * 4096 - kept) * 151936 * 10)
    assert every.transient - chat.transient == pytest.approx((8 * 4096 - kept) * 151936 * 4)
    assert not every.fits and chat.peak < every.peak - 25e9
    long_answers = plan_memory(spec, Inputs(shape, 4096, 2048, local=False, trained=(3000,) * 8))
    assert long_answers.activations == every.activations  # the union cannot exceed the micro-batch's length
    best = chat.max_micro_batch
    assert best and plan_memory(spec, Inputs(shape, 4096, 2048, local=False, trained=chat_counts(64)),
                                micro_batch=best).fits


def test_trained_counts_read_the_labels_of_prepared_rows() -> None:
    from types import SimpleNamespace

    import numpy as np

    from kubetune.train.memory import trained_counts

    rows = [SimpleNamespace(input_ids=[1] * 6, labels=[-100, -100, -100, 4, 5, 6]),
            SimpleNamespace(input_ids=[1] * 5, labels=np.array([-100, 7, 8, -100, 9], dtype=np.int32)),
            SimpleNamespace(input_ids=[1] * 3, labels=[5, -100, -100])]  # the first label is never a target
    assert trained_counts(rows) == (3, 3, 0)
    assert trained_counts(rows, keep=1) == (3,)
    assert trained_counts([[1, 2, 3]]) == ()  # rows without labels (a preference pair's shape): unknown


@pytest.mark.parametrize("objective,copy", [("sft", False), ("dpo", True), ("kto", True), ("orpo", False),
                                            ("grpo", False)])
def test_a_full_parameter_reference_copy_is_planned_for_the_objectives_that_keep_one(write_spec, objective: str,
                                                                                       copy: bool) -> None:
    # DPO and KTO (TRL keeps a frozen copy of the starting model for full fine-tuning); ORPO is reference-free;
    # GRPO only with beta > 0; with LoRA the reference is the adapter disabled (no copy)
    res = {"accelerator": "nvidia", "devices_per_node": 8, "device_memory": "80GB"}
    method = {"type": "full", "objective": objective, "grpo": {"rewards": [{"function": "length", "max_chars": 64}]}}
    sft = plan_memory(_spec(write_spec, method={"type": "full"}, resources=res), _inputs(), micro_batch=1)
    plan = plan_memory(_spec(write_spec, method=method, resources=res), _inputs(), micro_batch=1)
    assert plan.weights - sft.weights == pytest.approx(2 * PARAMS_7B if copy else 0)
    sharded = plan_memory(_spec(write_spec, method=method, resources=res), _inputs(), micro_batch=1, strategy="fsdp")
    unsharded_sft = plan_memory(_spec(write_spec, method={"type": "full"}, resources=res), _inputs(), micro_batch=1,
                                strategy="fsdp")
    assert sharded.weights - unsharded_sft.weights == pytest.approx(2 * PARAMS_7B / 8 if copy else 0)
    lora = plan_memory(_spec(write_spec, method={**method, "type": "lora"}, resources=res), _inputs(), micro_batch=1)
    lora_sft = plan_memory(_spec(write_spec, method={"type": "lora"}, resources=res), _inputs(), micro_batch=1)
    assert lora.weights == pytest.approx(lora_sft.weights)
    if objective == "grpo":
        with_kl = {**method, "grpo": {**method["grpo"], "beta": 0.04}}
        assert plan_memory(_spec(write_spec, method=with_kl, resources=res), _inputs(), micro_batch=1).weights - \
            sft.weights == pytest.approx(2 * PARAMS_7B)


def test_a_pair_is_two_sequences_and_the_fix_counts_rows(write_spec) -> None:
    res = {"accelerator": "nvidia", "device_memory": "40GB"}
    train = {"total_batch_size": 32, "max_per_device_batch_size": 32, "gradient_checkpointing": True}
    sft = plan_memory(_spec(write_spec, method={"type": "lora"}, train=train, resources=res), _inputs(512))
    spec = _spec(write_spec, method={"type": "lora", "objective": "orpo"}, train=train, resources=res)
    pairs = plan_memory(spec, _inputs(512))
    assert (sft.micro_batch, pairs.micro_batch) == (32, 64)
    assert pairs.activations == pytest.approx(2 * sft.activations)
    assert not pairs.fits
    rows = next(s for s in fixes(spec, pairs) if s.startswith("train.max_per_device_batch_size"))
    best = int(rows.split(":")[1].split()[0])
    assert best == pairs.max_micro_batch // 2  # rows: each holds two sequences
    assert f"largest micro-batch that fits: {best} rows ({2 * best} sequences)" in "\n".join(pairs.lines())
    assert plan_memory(spec, _inputs(512), micro_batch=best).fits
    assert not plan_memory(spec, _inputs(512), micro_batch=best + 1).fits
