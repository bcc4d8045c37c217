"""The SFT loss on trained positions only (train.trainer.trained_positions_only): the same loss and the
same gradients as transformers' causal-LM loss over every position, for a full model and a LoRA one,
with and without the Trainer's num_items_in_batch, on padded batches whose rows train different spans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.train.trainer import accepts_logits_to_keep, trained_positions_only


def batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 10:18] = ids[0, 10:18]   # a first answer
    labels[0, 30:36] = ids[0, 30:36]   # a second turn
    labels[1, 25:40] = ids[1, 25:40]   # an answer up to the last position
    labels[2, 5:9] = ids[2, 5:9]
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0                   # right padding
    labels[2, 20:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: Any, inputs: dict[str, Any], items: Any) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    extra = {"num_items_in_batch": items} if items is not None else {}
    loss = model(**inputs, **extra).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("items", [None, "count"])
def test_same_loss_and_gradients_as_every_position(tiny_model: Path, method: str, items: str | None) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    assert accepts_logits_to_keep(model)
    inputs = batch(model.config.vocab_size)
    count = (inputs["labels"][..., 1:] != -100).sum() if items else None

    kept = trained_positions_only(inputs)
    # a position is kept when it predicts a trained token in any row
    assert kept["logits_to_keep"].tolist() == [*range(4, 8), *range(9, 17), *range(24, 39)]
    every, every_grads = loss_and_grads(model, inputs, count)
    only, only_grads = loss_and_grads(model, kept, count)
    assert only == pytest.approx(every, rel=1e-6)
    assert every_grads.keys() == only_grads.keys() and every_grads
    for name, grad in every_grads.items():
        torch.testing.assert_close(only_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_nothing_trained_or_everything_trained_is_left_alone() -> None:
    ids = torch.arange(12).view(2, 6)
    none = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    assert trained_positions_only(none) is none
    every = {"input_ids": ids, "labels": ids.clone()}
    every["labels"][:, 0] = -100  # the first label is never a target; every position still predicts one
    assert trained_positions_only(every) is every
    assert trained_positions_only({"input_ids": ids}) == {"input_ids": ids}


def test_a_model_whose_loss_takes_no_shift_labels_keeps_every_position(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert accepts_logits_to_keep(model)
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()  # a custom loss
    assert not accepts_logits_to_keep(model)


def test_the_trainers_eval_loss_is_the_same_on_trained_positions(tiny_model: Path, tmp_path: Path) -> None:
    """Through KubetuneTrainer.evaluate: the head gets logits_to_keep, and the eval loss is unchanged."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, TrainingArguments

    from kubetune.data.collate import ListDataset, PadCollator
    from kubetune.train.trainer import KubetuneTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    data = batch(model.config.vocab_size)
    rows = [SimpleNamespace(input_ids=ids[mask.bool()].tolist(), labels=labels[mask.bool()].tolist())
            for ids, labels, mask in zip(data["input_ids"], data["labels"], data["attention_mask"])]
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append("logits_to_keep" in kw), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=3, report_to=[])
    trainer = KubetuneTrainer(model=model, args=args, eval_dataset=ListDataset(rows), data_collator=PadCollator(0))

    kept = trainer.evaluate()["eval_loss"]
    trainer._logits_to_keep = False  # every position, as transformers computes it
    every = trainer.evaluate()["eval_loss"]
    assert seen == [True, False]
    assert kept == pytest.approx(every, rel=1e-6)
