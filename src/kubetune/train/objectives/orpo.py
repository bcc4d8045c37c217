"""Odds-ratio preference optimisation (ORPO) through TRL's ORPOTrainer: one loss that learns the chosen
answers (their likelihood, as SFT would) and prefers them to the rejected ones (the log odds ratio,
weighted by method.orpo.beta) — no reference model, so no frozen copy even for full fine-tuning and
no second forward pass. kubetune gives TRL the pairs already tokenised through the run's chat
template and masks, as for DPO.

Eval: the held-out pairs are scored by the starting model (when the trainer is built, before any
step: after a resume too, since the checkpoint's weights load only when training starts) and by the
tuned model after the last step — preference accuracy for both, and the log-ratio margin of the
tuned model against the start, in an eval event, the trackers and eval/report.md, as for DPO.
"""

from __future__ import annotations

from typing import Any

from kubetune.runs.layout import RunLayout
from kubetune.data.preferences import EncodedPair, PreferenceData
from kubetune.data.template import IGNORE
from kubetune.spec.models import RunSpec
from kubetune.train.objectives.dpo import PairObjective, compare, pair_logps, write_report


class ORPO(PairObjective):
    name = "orpo"

    def __init__(self) -> None:
        self._start: Any = None  # [n, 2] log-probabilities of the eval pairs' answers under the starting model

    def beta(self, spec: RunSpec) -> float:
        return spec.method.orpo.beta

    def memory_notes(self, spec: RunSpec, plan: Any, seq_len: int, kv_bytes_per_token: int) -> list[str]:
        return ["orpo: each micro-batch runs the chosen and the rejected answers (twice the sequences); no reference "
                "model"]

    def arguments(self, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        return _orpo().ORPOConfig, {"beta": spec.method.orpo.beta,
                            "max_length": spec.data.max_length,  # the pairs are already cut to it
                            "disable_dropout": False}  # the spec's lora.dropout stands

    def trainer(self, spec: RunSpec, data: PreferenceData, model: Any, args: Any, batches: Any,
                callbacks: list[Any]) -> Any:
        from transformers import AutoTokenizer

        pairs = _eval_pairs(data)
        tokenizer = AutoTokenizer.from_pretrained(data.model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = data.formatter.pad_id
        trainer = _trainer_class()(model=model, args=args, train_dataset=_dataset(data.train.rows),
                                   eval_dataset=_dataset(pairs) if pairs else None,
                                   processing_class=tokenizer, callbacks=callbacks)
        if pairs:  # the Trainer has put the model on its device (FSDP wraps it only when training starts)
            model = trainer.model
            device = trainer.args.device if trainer.place_model_on_device else next(model.parameters()).device
            self._start = pair_logps(model, pairs, data.formatter.pad_id, device)
        return trainer

    def evaluate(self, spec: RunSpec, trainer: Any, data: PreferenceData, layout: RunLayout, main: bool) -> None:
        pairs = _eval_pairs(data)
        if not pairs or self._start is None:
            return
        tuned = pair_logps(trainer.model, pairs, data.formatter.pad_id, trainer.args.device)
        scores = compare(tuned, self._start, self.beta(spec))
        trainer.log({f"eval_{k}": v for k, v in scores.items()})
        if main:
            write_report(layout, scores, len(pairs))


def _eval_pairs(data: PreferenceData) -> list[EncodedPair]:
    return [r for r in data.eval.rows if isinstance(r, EncodedPair)]


def _dataset(rows: list[EncodedPair]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [r.prompt_ids for r in rows], "chosen_ids": [r.chosen_ids for r in rows],
                              "rejected_ids": [r.rejected_ids for r in rows]})


def tokenized_row(feature: dict[str, Any]) -> dict[str, Any]:
    """ORPOTrainer's columns from kubetune's ids: each answer follows the prompt, only the answer is
    trained (the prompt's labels are ignored), nothing is added or cut (the template put in the special
    tokens; data.max_length already applied)."""
    prompt = list(feature["prompt_ids"])
    row: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        row[f"{side}_input_ids"] = prompt + answer
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{side}_labels"] = [IGNORE] * len(prompt) + answer
    return row


def _orpo() -> Any:
    """trl.experimental.orpo, without its warning that experimental APIs may change: kubetune pins TRL
    (requirements.txt) and tests what it uses of it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        import trl.experimental.orpo as orpo
    return orpo


def _trainer_class() -> Any:
    from kubetune.train.trainer import KubetuneMixin

    class KubetuneORPOTrainer(KubetuneMixin, _orpo().ORPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kubetune_init()

        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
            return tokenized_row(feature)

        def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> Any:
            """TRL's chosen-answer likelihood term counts every position, the prompt's included; kubetune
            trains the answer only (as its SFT masks do): the term is taken again from the mean
            log-probability of each chosen answer's own tokens, weighted by their number."""
            import torch

            out = list(super().concatenated_forward(model, batch))
            chosen_logps = out[0]
            counts = (batch["chosen_labels"][:, 1:] != IGNORE).sum(-1).to(chosen_logps.device)
            summed = torch.where(counts > 0, chosen_logps * counts, torch.zeros_like(chosen_logps))
            out[4] = -summed.sum() / counts.sum().clamp(min=1)
            return tuple(out)

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            for side in ("chosen", "rejected"):  # the batch holds no input_ids of its own: count both answers
                if f"{side}_attention_mask" in inputs:
                    self.count_tokens(inputs[f"{side}_attention_mask"])
            return super().training_step(model, inputs, num_items_in_batch)

    return KubetuneORPOTrainer
