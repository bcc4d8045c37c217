"""Direct preference optimisation through TRL's DPOTrainer: kubetune gives it pairs already tokenised
through the run's chat template (prompt ids, and each answer's ids exactly as the SFT masks train
them), its batch plan, events, checkpoints and resume. With LoRA the reference model is the base
with the adapter disabled (no second copy in memory); with full fine-tuning TRL loads a frozen copy.

After training, the eval pairs are scored by the base and by the tuned model: preference accuracy
(the chosen answer more likely than the rejected one) for both, and DPO's implicit reward accuracy
and margin for the tuned model against the base — in an eval event, the trackers and eval/report.md.
"""

from __future__ import annotations

from typing import Any

import json

from kubetune.runs.layout import RunLayout
from kubetune.data.preferences import EncodedPair, PreferenceData, prepare_pairs
from kubetune.spec.models import RunSpec
from kubetune.train.objectives import BaseObjective


class PairObjective(BaseObjective):
    """An objective trained on preference pairs: a micro-batch runs each pair's two answers, `plan` shows
    the prompt and both answers, and the held-out pairs are scored base vs tuned after training."""

    def prepare(self, spec: RunSpec) -> PreferenceData:
        return prepare_pairs(spec, self.name)

    def sequences_per_row(self, spec: RunSpec) -> int:
        return 2

    def show(self, spec: RunSpec, data: Any, rows: list[Any], color: bool) -> list[Any]:
        from kubetune.train.plan import show_pair

        legend = "dim = prompt, green = chosen, red = rejected" if color else "the answers ⟦compared⟧"
        out: list[Any] = []
        for row in rows:
            out += [f"\npair ({row.where}; {legend}):", show_pair(row, data.formatter, color)]
        return out

    def sample_json(self, data: Any, rows: list[Any]) -> list[str]:
        from kubetune.train.plan import pair_segments

        return [json.dumps({"where": row.where, **pair_segments(row, data.formatter)}, ensure_ascii=False)
                for row in rows]

    def beta(self, spec: RunSpec) -> float:
        """The beta of the implicit reward margin reported by the held-out scoring."""
        raise NotImplementedError

    def evaluate(self, spec: RunSpec, trainer: Any, data: PreferenceData, layout: RunLayout, main: bool) -> None:
        """Base vs tuned on the eval pairs (every rank computes; the main process reports)."""
        pairs = [r for r in data.eval.rows if isinstance(r, EncodedPair)]
        if not pairs:
            return
        scores = preference_scores(trainer, pairs, self.beta(spec), data.formatter.pad_id)
        trainer.log({f"eval_{k}": v for k, v in scores.items()})
        if main:
            write_report(layout, scores, len(pairs))


class DPO(PairObjective):
    name = "dpo"
    openai_method = "dpo"

    def beta(self, spec: RunSpec) -> float:
        return spec.method.dpo.beta

    def reference_copy(self, spec: RunSpec, method: str) -> bool:
        return method == "full"

    def memory_notes(self, spec: RunSpec, plan: Any, seq_len: int, kv_bytes_per_token: int) -> list[str]:
        return ["dpo: each micro-batch runs the chosen and the rejected answers (twice the sequences), and the "
                "reference model's forward pass" + (" (the adapter disabled: no second copy)"
                                                    if spec.method.type != "full" else ", a frozen copy of the weights")]

    def openai_hyperparameters(self, spec: RunSpec) -> dict[str, Any]:
        return {"beta": spec.method.dpo.beta}

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
                      batch: int = 4) -> dict[str, float]:
    """Summed log-probabilities of each answer under the tuned model and the reference (the base: the
    adapter disabled, or TRL's reference copy), and what they say about the pairs."""
    tuned = pair_logps(trainer.model, rows, pad_id, trainer.args.device, batch)
    with _reference(trainer) as ref:
        base = pair_logps(ref, rows, pad_id, trainer.args.device, batch)
    return compare(tuned, base, beta)


def pair_logps(model: Any, rows: list[EncodedPair], pad_id: int, device: Any, batch: int = 4) -> Any:
    """[n, 2]: the summed log-probability of each pair's chosen and rejected answer under `model`."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            out.append(_answer_logps(model, rows[i:i + batch], pad_id, device))
    model.train(was_training)
    return torch.cat(out)


def compare(tuned: Any, base: Any, beta: float) -> dict[str, float]:
    """Preference accuracy of the base and the tuned model, and the tuned model's implicit reward
    (beta-scaled log-ratio against the base) accuracy and margin."""
    t, b = tuned, base  # [n, 2]: chosen, rejected
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
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    per_seq = []
    for k in range(len(seqs)):  # one sequence's vocabulary in fp32 at a time (not the batch's: GBs at 128k)
        row = logits[k].float()
        logps = row.gather(-1, ids[k, 1:, None])[:, 0] - torch.logsumexp(row, dim=-1)
        per_seq.append((logps * answer[k, 1:]).sum())
    return torch.stack(per_seq).view(-1, 2).cpu()


class _reference:
    """The reference model for scoring: TRL's copy, or the policy with its adapter disabled."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._ctx: Any = None

    def __enter__(self) -> Any:
        ref = getattr(self.trainer, "ref_model", None)
        if ref is not None:
            return ref
        self._ctx = self.trainer.model.disable_adapter()
        self._ctx.__enter__()
        return self.trainer.model

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def write_report(layout: RunLayout, scores: dict[str, float], pairs: int) -> None:
    layout.eval.mkdir(parents=True, exist_ok=True)
    layout.eval_report.write_text(
        "# Preference evaluation\n\n"
        f"{pairs} held-out pairs. Preference accuracy: the chosen answer has the higher log-probability.\n\n"
        "| | base | tuned |\n| --- | ---: | ---: |\n"
        f"| preference accuracy | {scores['preference_accuracy_base']:.1%} | {scores['preference_accuracy']:.1%} |\n\n"
        f"Implicit reward (tuned against base, beta-scaled): accuracy {scores['reward_accuracy']:.1%}, "
        f"mean margin {scores['reward_margin']:.4f}.\n")
    layout.eval_metrics.write_text(json.dumps(scores, indent=2))
