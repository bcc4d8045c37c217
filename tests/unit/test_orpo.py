"""ORPO's likelihood term trains the chosen answer's tokens only — as kubetune's SFT masks do — not the
prompt that TRL's ORPOTrainer counts too."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.data.preferences import EncodedPair


def test_the_likelihood_term_is_the_chosen_answers_tokens_only(tiny_model: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kubetune.train.objectives.orpo import _dataset, _orpo, _trainer_class

    ORPOConfig = _orpo().ORPOConfig

    torch.manual_seed(0)
    rows = [EncodedPair("a", [1, 20, 30, 40, 50], [60, 61], [70, 71, 72]),
            EncodedPair("b", [1, 21, 31], [62, 63, 64, 65], [73])]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = 0
    args = ORPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, report_to=[],
                      max_length=64, bf16=False, disable_dropout=True)
    trainer = _trainer_class()(model=model, args=args, train_dataset=_dataset(rows), processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    nll = trainer.concatenated_forward(trainer.model, batch)[4]

    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r.prompt_ids + r.chosen_ids])
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            for pos in range(len(r.prompt_ids), ids.shape[1]):  # each answer token, from the position before it
                total -= float(logps[pos - 1, ids[0, pos]])
                count += 1
    assert float(nll) == pytest.approx(total / count, rel=1e-4)
    # TRL's own term (prompt included) differs: the override is what makes the test pass
    prompt_too = torch.nn.functional.cross_entropy(
        trainer.model(input_ids=torch.tensor([rows[0].prompt_ids + rows[0].chosen_ids])).logits[0, :-1],
        torch.tensor(rows[0].prompt_ids[1:] + rows[0].chosen_ids))
    assert float(prompt_too) != pytest.approx(total / count, rel=1e-3)
