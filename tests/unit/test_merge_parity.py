"""What a merge must prove: the merged model computes what adapter-on-base computes, at any depth and
width. A correct merge of deep random models is accepted (fp32 round-off, which grows with the logits'
size, once failed a fixed absolute bound); a merge whose weights were perturbed afterwards is refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kubetune.hf import Parity, merge_with_parity  # noqa: E402
from kubetune.serve.engine import MERGE_TOLERANCE  # noqa: E402


def adapter_on_base(layers: int, hidden: int, logit_scale: float):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight *= logit_scale  # logits the size a trained model's are
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


PROBES = [list(range(3, 40)), list(range(200, 230))]


@pytest.mark.parametrize("layers,hidden", [(24, 128), (32, 64)])
def test_a_correct_merge_of_a_deep_model_is_accepted(layers: int, hidden: int) -> None:
    merged, parity = merge_with_parity(adapter_on_base(layers, hidden, 400.0), PROBES)
    assert parity.scale > 10  # large logits: their round-off alone is above the old absolute bound
    assert parity.max_diff > 1e-4 and parity.within(MERGE_TOLERANCE), parity.describe()


def test_a_merge_with_perturbed_weights_is_refused() -> None:
    model = adapter_on_base(24, 128, 400.0)
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([p])).logits.float() for p in PROBES]
    merged, parity = merge_with_parity(model, PROBES)
    assert parity.within(MERGE_TOLERANCE)
    with torch.no_grad():
        weight = merged.model.layers[12].mlp.down_proj.weight
        weight += torch.randn_like(weight) * weight.std() * 1e-3  # one matrix, off by 0.1%
        after = [merged(input_ids=torch.tensor([p])).logits.float() for p in PROBES]
    wrong = Parity(max(float((a - r).abs().max()) for a, r in zip(after, reference)), parity.scale)
    assert not wrong.within(MERGE_TOLERANCE), wrong.describe()


def test_small_logits_keep_the_absolute_floor() -> None:
    assert Parity(9e-5, 0.3).within(1e-4) and not Parity(2e-4, 0.3).within(1e-4)
    assert Parity(9e-4, 10.0).within(1e-4) and not Parity(2e-3, 10.0).within(1e-4)
