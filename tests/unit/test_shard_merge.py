"""The shard-at-a-time merge: deep sharded bases merge into the base's dtype, keys and shards, computing
what adapter-on-base computes; a wrong delta, an adapter of another base or a non-LoRA adapter is refused;
memory stays bounded by a shard, not the model (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kubetune.errors import TrainingError, UsageError  # noqa: E402
from kubetune.hf import Parity  # noqa: E402
from kubetune.train.shard_merge import merge_shards  # noqa: E402


def make_base_and_adapter(tmp: Path, layers: int, hidden: int, dtype: "torch.dtype", shard: str,
                          vocab: int = 512, logit_scale: float = 1.0) -> tuple[Path, Path]:
    """A random Llama saved by transformers in shards, and a LoRA adapter saved by PEFT (random A and B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    with torch.no_grad():
        base.lm_head.weight *= logit_scale
    base.to(dtype).save_pretrained(tmp / "base", max_shard_size=shard)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp / "adapter")
    return tmp / "base", tmp / "adapter"


def logits(model, ids: list[int]) -> "torch.Tensor":  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def test_a_deep_sharded_fp32_model_merges_into_the_same_model(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = make_base_and_adapter(tmp_path, 24, 128, torch.float32, "3MB", logit_scale=400.0)
    result = merge_shards(base, adapter, tmp_path / "merged")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert result.shards == len(set(index["weight_map"].values())) > 3 and result.merged == 24 * 7
    assert json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text()) == index
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    probe = list(range(3, 60))
    before, after = logits(reference, probe), logits(merged, probe)
    parity = Parity(float((before - after).abs().max()), float(before.pow(2).mean().sqrt()))
    assert parity.scale > 10 and parity.within(1e-4), parity.describe()
    with reference.disable_adapter():
        assert float((before - logits(reference, probe)).abs().max()) > 1  # the adapter matters


def test_a_bf16_base_stays_bf16_and_every_layer_is_within_its_rounding(tmp_path: Path) -> None:
    from safetensors import safe_open

    base, adapter = make_base_and_adapter(tmp_path, 4, 64, torch.bfloat16, "200KB")
    (base / "modeling_custom.py").write_text("# a remote-code model's own modeling file\n")
    result = merge_shards(base, adapter, tmp_path / "merged")
    assert result.worst <= 1e-4 and result.largest_weight == 4 * 64 * 128
    assert (tmp_path / "merged" / "modeling_custom.py").read_text() == (base / "modeling_custom.py").read_text()
    changed = 0
    for shard in {p.name for p in (tmp_path / "merged").glob("*.safetensors")}:
        with safe_open(str(base / shard), "pt") as old, safe_open(str(tmp_path / "merged" / shard), "pt") as new:
            assert set(old.keys()) == set(new.keys())
            for key in new.keys():
                assert new.get_slice(key).get_dtype() == "BF16"
                changed += not torch.equal(old.get_tensor(key), new.get_tensor(key))
    assert changed == 4 * 7  # the targeted weights, and only they


def test_a_wrong_delta_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import Linear

    base, adapter = make_base_and_adapter(tmp_path, 4, 64, torch.float32, "200KB")
    right = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, name: right(self, name) * 1.01)  # scale off by 1%
    with pytest.raises(TrainingError, match=r"merged model\.layers\.\d+\.\S+\.weight differs from adapter-on-base"):
        merge_shards(base, adapter, tmp_path / "merged")


def test_an_adapter_of_another_base_or_kind_is_refused(tmp_path: Path) -> None:
    base, adapter = make_base_and_adapter(tmp_path / "a", 2, 64, torch.float32, "200KB")
    other, _ = make_base_and_adapter(tmp_path / "b", 2, 128, torch.float32, "200KB")
    with pytest.raises(UsageError, match=r"the adapter's model\.layers\.0\.\S+ \(A \(8, 64\).* does not fit the base"):
        merge_shards(other, adapter, tmp_path / "m1")
    shallow, _ = make_base_and_adapter(tmp_path / "c", 1, 64, torch.float32, "200KB")
    with pytest.raises(UsageError, match=r"the adapter changes model\.layers\.1\.\S+, which the base's weights"):
        merge_shards(shallow, adapter, tmp_path / "m2")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UsageError, match="adapter_config.json sets use_dora"):
        merge_shards(base, adapter, tmp_path / "m3")


PEAK = """
import json, sys
from pathlib import Path
import peft, safetensors.torch, torch
from kubetune.train.shard_merge import merge_shards
def hwm():  # this process's own peak resident set: ru_maxrss is inherited from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
before = hwm()
result = merge_shards(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
print(json.dumps({"growth": hwm() - before, "before": before, "largest": result.largest_weight}))
"""


@pytest.mark.integration
def test_memory_is_bounded_by_a_shard_not_the_model(tmp_path: Path) -> None:
    """A 510 MB bf16 model (1 GB in fp32, what the old merge loaded) in 150 MB shards."""
    base, adapter = make_base_and_adapter(tmp_path, 24, 1024, torch.bfloat16, "150MB", vocab=16000)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    run = subprocess.run([sys.executable, "-c", PEAK, str(base), str(adapter), str(tmp_path / "merged")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.splitlines()[-1])
    assert model_bytes > 480e6 and measured["largest"] == 4 * 1024 * 2048
    # one weight: read, its fp32 copies, the delta and the merged bytes; never the model. Measured: 80-90 MB
    # here, 165 MB once in a clean clone (before the check went rows at a time), most of it the first use
    # of PEFT's and torch's code and the allocator's arenas.
    assert measured["growth"] < 12 * measured["largest"] + 128e6 < model_bytes / 2, measured


def small_delta_layer(dtype: "torch.dtype"):  # type: ignore[no-untyped-def]
    """A 256x1024 base weight in `dtype` with a trained-size LoRA delta (~1% of the weight)."""
    from peft import LoraConfig

    from kubetune.train.shard_merge import _lora_layer

    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(256, 1024, generator=g) * 0.02).to(dtype)
    a, b = torch.randn(16, 1024, generator=g) * 0.01, torch.randn(256, 16, generator=g) * 0.01
    layer = _lora_layer(weight, a, b, LoraConfig(r=16, lora_alpha=32), "w")
    with torch.no_grad():
        exact = weight.float() + layer.get_delta_weight("default")
    return weight, layer, exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bytes_without_the_delta_or_with_part_of_it_are_refused_in_any_dtype(dtype: "torch.dtype") -> None:
    from kubetune.train.shard_merge import _weight_parity

    weight, layer, exact = small_delta_layer(dtype)
    g = torch.Generator().manual_seed(0)
    assert _weight_parity(layer, exact, exact.to(dtype), "w", 1e-4, g) < 1e-5  # the right bytes pass
    for wrong in (weight, (weight.float() + 0.5 * (exact - weight.float())).to(dtype)):  # no delta, half of it
        with pytest.raises(TrainingError, match="as written is not W \\+ delta rounded"):
            _weight_parity(layer, exact, wrong, "w", 1e-4, g)
    poisoned = exact.to(dtype).clone()
    poisoned[3, 7] = float("nan")
    with pytest.raises(TrainingError, match="NaN or infinite"):
        _weight_parity(layer, exact, poisoned, "w", 1e-4, g)


def test_a_delta_that_is_not_what_peft_computes_is_refused_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import Linear

    from kubetune.train.shard_merge import _weight_parity

    right = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, name: right(self, name) * 0.5)
    weight, layer, exact = small_delta_layer(torch.bfloat16)
    with pytest.raises(TrainingError, match="differs from adapter-on-base"):
        _weight_parity(layer, exact, exact.to(torch.bfloat16), "w", 1e-4, torch.Generator().manual_seed(0))


def tiny_gemma3(folder: Path) -> None:
    """A Gemma 3 with its vision tower, as gemma-3-4b-it and larger are: transformers 5 stores its text
    model as `language_model.model.layers…` and loads it (AutoModelForCausalLM, as training does) as
    `model.language_model.layers…`, the names a PEFT adapter of the loaded model uses."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=28, patch_size=14)
    Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                image_token_index=299, boi_token_index=297, eoi_token_index=298)) \
        .save_pretrained(folder)


def test_a_family_whose_checkpoint_keys_transformers_renames_merges_under_the_stored_keys(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from kubetune.train.merge import _same_weights

    tiny_gemma3(tmp_path / "base")
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in stored  # the on-disk names differ
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
                                     init_lora_weights=False))
    assert any(".model.language_model.layers.0.self_attn.q_proj" in n for n, _ in peft.named_modules())
    peft.save_pretrained(tmp_path / "adapter")
    result = merge_shards(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert result.merged == 3 * 3
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == stored  # written under the stored names, nothing added
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                          tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    probe = list(range(3, 40))
    before, after = logits(reference, probe), logits(merged, probe)
    parity = Parity(float((before - after).abs().max()), float(before.pow(2).mean().sqrt()))
    assert parity.within(1e-4), parity.describe()
    with reference.disable_adapter():
        assert float((before - logits(reference, probe)).abs().max()) > 1e-3  # the adapter matters
    # the whole-model weight check compares under the loaded names too: a merged weight off by more than
    # its rounding in the files is caught, not skipped as a name PEFT's model does not have
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").merge_and_unload()
    _same_weights(peft_merged, tmp_path / "merged")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    weights["language_model.model.layers.2.mlp.down_proj.weight"][0, 0] += 0.01
    save_file(weights, str(tmp_path / "merged" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingError, match="layers.2.mlp.down_proj.weight differs from PEFT's merge"):
        _same_weights(peft_merged, tmp_path / "merged")


def test_weights_transformers_builds_or_ties_are_refused_with_what_to_do(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    # Mixtral stores each expert's w1/w3; transformers fuses them into one experts.gate_up_proj parameter
    MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)) \
        .save_pretrained(tmp_path / "mixtral")
    (tmp_path / "fused").mkdir()
    save_file({"base_model.model.model.layers.0.mlp.experts.gate_up_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.mlp.experts.gate_up_proj.lora_B.weight": torch.zeros(128, 4)},
              str(tmp_path / "fused" / "adapter_model.safetensors"))
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "fused")
    with pytest.raises(UsageError, match="transformers builds from several stored tensors") as info:
        merge_shards(tmp_path / "mixtral", tmp_path / "fused", tmp_path / "m1")
    assert "no merge needed" in (info.value.hint or "") and not (tmp_path / "m1").exists()

    # a tied lm_head has no weight of its own in the files
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)) \
        .save_pretrained(tmp_path / "tied")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "tied"),
                   LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)) \
        .save_pretrained(tmp_path / "head")
    assert "base_model.model.lm_head.lora_A.weight" in load_file(str(tmp_path / "head" / "adapter_model.safetensors"))
    with pytest.raises(UsageError, match="its own copy of lm_head's weight") as info:
        merge_shards(tmp_path / "tied", tmp_path / "head", tmp_path / "m2")
    assert "without lm_head in method.lora.target_modules" in (info.value.hint or "")
    # saved without that copy, the files still have no lm_head weight to fold the delta into
    tensors = load_file(str(tmp_path / "head" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "base_layer" not in k},
              str(tmp_path / "head" / "adapter_model.safetensors"))
    with pytest.raises(UsageError, match="ties to its input embeddings") as info:
        merge_shards(tmp_path / "tied", tmp_path / "head", tmp_path / "m2")
    assert "target_modules" in (info.value.hint or "") and not (tmp_path / "m2").exists()


def test_a_model_whose_keys_are_not_renamed_merges_without_building_a_model(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama, Qwen and most families load under their stored names: no meta model, no conversion mapping."""
    import kubetune.train.shard_merge as shard_merge

    def built(*args: object) -> None:
        raise AssertionError("the conversion mapping was consulted for a model that needs none")
    monkeypatch.setattr(shard_merge, "loaded_names", built)
    base, adapter = make_base_and_adapter(tmp_path, 2, 32, torch.float32, "10GB")
    assert merge_shards(base, adapter, tmp_path / "merged").merged == 2 * 7
