"""Direct preference optimisation through TRL's DPOTrainer: kubetune gives it pairs already tokenised
through the run's chat template (prompt ids, and each answer's ids exactly as the SFT masks train
them), its batch plan, events, checkpoints and resume. With LoRA the reference model is the base
with the adapter disabled (no second copy in memory); with full fine-tuning TRL loads a frozen copy.

After training, the eval pairs are scored by the base and by the tuned model: preference accuracy
(the chosen answer more likely than the rejected one) for both, and DPO's implicit reward accuracy
and margin for the tuned model against the base — in an eval event, the trackers and eval/report.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.artifacts.layout import RunLayout
from kubetune.data.preferences import EncodedPair, PreferenceData, prepare_pairs
from kubetune.spec.models import RunSpec


class DPO:
    name = "dpo"

    def prepare(self, spec: RunSpec) -> PreferenceData:
        return prepare_pairs(spec)

    def arguments(self, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        from trl import DPOConfig

        d = spec.method.dpo
        return DPOConfig, {"beta": d.beta, "loss_type": [d.loss_type], "label_smoothing": d.label_smoothing,
                           "max_length": None,  # the pairs are already cut to data.max_length
                           "padding_free": False, "precompute_ref_log_probs": False}

    def trainer(self, spec: RunSpec, data: PreferenceData, model: Any, args: Any, batches: Any,
                callbacks: list[Any]) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data.model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = data.formatter.pad_id
        return _trainer_class()(model=model, args=args, train_dataset=_dataset(data.train.rows),
                                eval_dataset=_dataset(data.eval.rows) if data.eval.rows else None,
                                processing_class=tokenizer, callbacks=callbacks)

    def save_final(self, spec: RunSpec, trainer: Any, data: PreferenceData, layout: RunLayout, main: bool) -> Path:
        from kubetune.train.objectives.sft import save_final_folder

        return save_final_folder(spec, trainer, data, layout, main)

    def evaluate(self, spec: RunSpec, trainer: Any, data: PreferenceData, layout: RunLayout, main: bool) -> None:
        """Base vs tuned on the eval pairs (every rank computes; the main process reports)."""
        if not data.eval.rows:
            return
        scores = preference_scores(trainer, data.eval.rows, spec.method.dpo.beta, data.formatter.pad_id)
        trainer.log({f"eval_{k}": v for k, v in scores.items()})
        if main:
            write_report(layout, scores, len(data.eval.rows))


def _dataset(rows: list[EncodedPair]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [r.prompt_ids for r in rows], "chosen_ids": [r.chosen_ids for r in rows],
                              "rejected_ids": [r.rejected_ids for r in rows]})


def _trainer_class() -> Any:
    from trl import DPOTrainer

    from kubetune.train.trainer import KubetuneMixin

    class KubetuneDPOTrainer(KubetuneMixin, DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kubetune_init()

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # tokenised by kubetune, through the run's template and masks

    return KubetuneDPOTrainer


def preference_scores(trainer: Any, rows: list[EncodedPair], beta: float, pad_id: int,
                      batch: int = 8) -> dict[str, float]:
    """Summed log-probabilities of each answer under the tuned model and the reference (the base: the
    adapter disabled, or TRL's reference copy), and what they say about the pairs."""
    import torch

    model = trainer.model
    model.eval()
    tuned, base = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            tuned.append(_answer_logps(model, chunk, pad_id, trainer.args.device))
            with _reference(trainer) as ref:
                base.append(_answer_logps(ref, chunk, pad_id, trainer.args.device))
    model.train()
    t, b = torch.cat(tuned), torch.cat(base)  # [n, 2]: chosen, rejected
    margin = beta * ((t[:, 0] - b[:, 0]) - (t[:, 1] - b[:, 1]))
    return {"preference_accuracy_base": float((b[:, 0] > b[:, 1]).float().mean()),
            "preference_accuracy": float((t[:, 0] > t[:, 1]).float().mean()),
            "reward_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean())}


def _answer_logps(model: Any, rows: list[EncodedPair], pad_id: int, device: Any) -> Any:
    import torch

    seqs, masks = [], []
    for r in rows:
        for answer in (r.chosen_ids, r.rejected_ids):
            seqs.append(r.prompt_ids + answer)
            masks.append([0] * len(r.prompt_ids) + [1] * len(answer))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.bool)
    for k, (s, m) in enumerate(zip(seqs, masks)):
        ids[k, :len(s)] = torch.tensor(s)
        attention[k, :len(s)] = 1
        answer[k, :len(s)] = torch.tensor(m, dtype=torch.bool)
    ids, attention, answer = ids.to(device), attention.to(device), answer.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    per_seq = (logps * answer[:, 1:]).sum(-1)
    return per_seq.view(-1, 2).cpu()


class _reference:
    """The reference model for scoring: TRL's copy, or the policy with its adapter disabled."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._ctx: Any = None

    def __enter__(self) -> Any:
        if self.trainer.ref_model is not None:
            return self.trainer.ref_model
        self._ctx = self.trainer.model.disable_adapter()
        self._ctx.__enter__()
        return self.trainer.model

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def write_report(layout: RunLayout, scores: dict[str, float], pairs: int) -> None:
    layout.eval.mkdir(parents=True, exist_ok=True)
    (layout.eval / "report.md").write_text(
        "# Preference evaluation\n\n"
        f"{pairs} held-out pairs. Preference accuracy: the chosen answer has the higher log-probability.\n\n"
        "| | base | tuned |\n| --- | ---: | ---: |\n"
        f"| preference accuracy | {scores['preference_accuracy_base']:.1%} | {scores['preference_accuracy']:.1%} |\n\n"
        f"Implicit reward (tuned against base, beta-scaled): accuracy {scores['reward_accuracy']:.1%}, "
        f"mean margin {scores['reward_margin']:.4f}.\n")
    import json

    (layout.eval / "metrics.json").write_text(json.dumps(scores, indent=2))
