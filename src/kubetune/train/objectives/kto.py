"""KTO through TRL's KTOTrainer: answers judged alone, desirable or not (prompt, completion, label),
tokenised by kubetune through the run's template and masks like DPO's pairs; preference pairs are
taken too, as two labeled answers. The reference is the starting model (LoRA: the adapter disabled).

Eval: held-out pairs (any preference format in data.eval) are scored base vs tuned as for DPO —
preference accuracy and implicit reward margins; held-out labeled answers go to TRL's own eval
(rewards of desirable and undesirable answers, KL)."""

from __future__ import annotations

import json
import random
from typing import Any

from kubetune.data.preferences import EncodedLabeled, PreferenceData, prepare_pairs
from kubetune.spec.models import RunSpec
from kubetune.train.objectives.dpo import PairObjective


class KTO(PairObjective):
    name = "kto"

    def prepare(self, spec: RunSpec) -> PreferenceData:
        return prepare_pairs(spec, self.name, labeled=True)

    def beta(self, spec: RunSpec) -> float:
        return spec.method.kto.beta

    def sequences_per_row(self, spec: RunSpec) -> int:
        return 1  # one answer a row; its KL partner's forward pass keeps no activations (no grad)

    def tokens_per_row(self, spec: RunSpec) -> int:
        return 2 * spec.data.max_length  # the answer and the KL estimate's mismatched answer

    def reference_copy(self, spec: RunSpec, method: str) -> bool:
        return method == "full"  # TRL's KTOTrainer keeps a frozen copy, as DPO's does

    def memory_notes(self, spec: RunSpec, plan: Any, seq_len: int, kv_bytes_per_token: int) -> list[str]:
        return ["kto: each micro-batch also runs a no-grad forward pass of mismatched answers (the KL estimate) and "
                "the reference model's" + (" (the adapter disabled: no second copy)"
                                           if spec.method.type != "full" else ", a frozen copy of the weights")]

    def show(self, spec: RunSpec, data: Any, rows: list[Any], color: bool) -> list[Any]:
        out: list[Any] = []
        for row in rows:
            answer = data.formatter.decode(row.completion_ids)
            out += [f"\nanswer ({row.where}; {'desirable' if row.label else 'undesirable'}):",
                    data.formatter.decode(row.prompt_ids) + f"⟦{answer}⟧"]
        return out

    def sample_json(self, data: Any, rows: list[Any]) -> list[str]:
        fmt = data.formatter
        return [json.dumps({"where": row.where, "label": row.label, "segments": [
            {"text": fmt.decode(row.prompt_ids), "trained": False, "ids": row.prompt_ids},
            {"text": fmt.decode(row.completion_ids), "trained": True, "ids": row.completion_ids}]}, ensure_ascii=False)
            for row in rows]

    def arguments(self, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        from trl import KTOConfig

        k = spec.method.kto
        return KTOConfig, {"beta": k.beta, "desirable_weight": k.desirable_weight,
                           "undesirable_weight": k.undesirable_weight, "max_length": None,
                           "precompute_ref_log_probs": False,
                           # KTO's KL estimate pairs each row with its neighbour in a fixed-order batch: the
                           # rows are shuffled once, by train.seed, instead of by the sampler
                           "train_sampling_strategy": "sequential"}

    def trainer(self, spec: RunSpec, data: PreferenceData, model: Any, args: Any, batches: Any,
                callbacks: list[Any]) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data.model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = data.formatter.pad_id
        labeled_eval = [r for r in data.eval.rows if isinstance(r, EncodedLabeled)]
        rows = list(data.train.rows)
        random.Random(spec.train.seed).shuffle(rows)
        return _trainer_class()(model=model, args=args, train_dataset=_dataset(rows),
                                eval_dataset=_dataset(labeled_eval) if labeled_eval else None,
                                processing_class=tokenizer, callbacks=callbacks)


def _dataset(rows: list[EncodedLabeled]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [r.prompt_ids for r in rows],
                              "completion_ids": [r.completion_ids for r in rows],
                              "label": [r.label for r in rows]})


def _trainer_class() -> Any:
    from trl import KTOTrainer

    from kubetune.train.trainer import KubetuneMixin

    class KubetuneKTOTrainer(KubetuneMixin, KTOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kubetune_init()

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            """Tokenised by kubetune already; what remains is KTO's KL estimate, which pairs each prompt with
            another row's answer (TRL's rotation by one within each micro-batch)."""
            if not self.calculate_KL:
                return dataset

            def rotate(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    return KubetuneKTOTrainer
