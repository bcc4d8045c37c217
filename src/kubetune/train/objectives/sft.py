"""Supervised fine-tuning: chat/instruction/text rows with loss masks from the chat template,
length-bucketed padded batches, and the token-weighted causal-LM loss of transformers' Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.runs.layout import RunLayout
from kubetune.data.prepare import Prepared, prepare
from kubetune.spec.models import RunSpec
from kubetune.train.objectives import BaseObjective


class SFT(BaseObjective):
    name = "sft"
    openai_method = "supervised"

    def prepare(self, spec: RunSpec) -> Prepared:
        return prepare(spec)

    def trainer(self, spec: RunSpec, data: Prepared, model: Any, args: Any, batches: Any, callbacks: list[Any]) -> Any:
        from kubetune.data.collate import FlatCollator, ListDataset, PadCollator
        from kubetune.train.fastpath import resolve_attention, resolve_padding_free
        from kubetune.train.trainer import KubetuneTrainer

        flat = resolve_padding_free(spec, resolve_attention(spec))

        return KubetuneTrainer(
            length_buckets=spec.train.sampling == "length_buckets",
            checkpoint_above_tokens=checkpoint_threshold(spec, data, batches),
            model=model,
            args=args,
            train_dataset=ListDataset(data.train.rows),
            eval_dataset=ListDataset(data.eval.rows) if data.eval.rows else None,
            data_collator=FlatCollator() if flat else PadCollator(data.formatter.pad_id),
            callbacks=callbacks,
        )

    def arguments(self, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        return None, {}  # transformers' TrainingArguments as they are

    # evaluate: none of its own — generation metrics run after training (eval.metrics, through the
    # launcher's after_training)


def save_final_folder(spec: RunSpec, trainer: Any, data: Any, layout: RunLayout, main: bool) -> Path:
    """final/merged (full) or final/adapter with the tokenizer, template and generation config; COMPLETE last."""
    from kubetune.data.tokenizer_files import save_tokenizer_and_config

    target = layout.served(spec)  # what the run will serve: the adapter, or the whole model (full)
    trainer.save_final_model(str(target))  # written by the main process; a PEFT model saves just the adapter
    if main:
        stop = data.formatter.stop if data.has_chat else None
        save_tokenizer_and_config(data.model_dir, data.formatter.template, stop, data.formatter.pad_id, target)
        layout.final_complete.write_text("ok\n")
    return target


def checkpoint_threshold(spec: RunSpec, data: Prepared, batches: Any) -> int | None:
    """For gradient_checkpointing: auto, the padded-token size above which a micro-batch recomputes.

    Half the longest micro-batch: activation memory grows faster than linearly with length (attention),
    so a batch of half the tokens without checkpointing needs no more than the longest one with it."""
    if spec.train.gradient_checkpointing != "auto":
        return None
    longest = max((len(r.input_ids) for r in data.train.rows), default=0)
    return batches.per_device * longest // 2
