"""transformers' TrainingArguments from the spec: the one place spec names become Trainer settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.runs.layout import RunLayout
from kubetune.errors import Problem, SpecError, UsageError
from kubetune.spec.models import RunSpec
from kubetune.storage import read_model_config


def training_arguments(spec: RunSpec, layout: RunLayout, batches: Any, has_eval: bool, model_dir: Path,
                       strategy: str = "ddp", cls: Any = None, extra: dict[str, Any] | None = None) -> Any:
    """transformers TrainingArguments for the spec (or `cls`, an objective's subclass such as TRL's
    DPOConfig, with its `extra` settings); a name transformers rejects is a spec error."""
    from transformers import TrainingArguments

    cls = cls or TrainingArguments

    from kubetune.train.fastpath import check_liger
    from kubetune.train.model import resolve_dtype, resolve_mixed_precision, use_cpu

    dtype = resolve_dtype(spec.model.dtype, spec.resources.accelerator)
    precision = resolve_mixed_precision(spec, dtype, int(read_model_config(model_dir).get("hidden_size", 0)))
    t = spec.train
    try:
        values = dict(
            output_dir=str(layout.checkpoints),
            per_device_train_batch_size=batches.per_device,
            per_device_eval_batch_size=batches.per_device,
            gradient_accumulation_steps=batches.accumulation,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=t.optim,
            logging_steps=t.logging_steps,
            save_strategy="steps",
            save_steps=t.save_every_steps,
            save_total_limit=None,  # retention is ours: it must respect COMPLETE markers
            eval_strategy="steps" if has_eval and t.eval_every_steps else "no",
            eval_steps=t.eval_every_steps,
            seed=t.seed,
            data_seed=t.seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=use_cpu(spec),
            report_to=[n for n in spec.tracking.report_to if n != "tensorboard"] or "none",  # see TrackerRuns
            run_name=spec.name,
            disable_tqdm=True,
            remove_unused_columns=False,
            activation_checkpointing=t.gradient_checkpointing is not False,
            activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing is not False else None,
            ddp_find_unused_parameters=False,
            include_num_input_tokens_seen="no",  # counted by KubetuneTrainer without a per-step host sync
            train_sampling_strategy="random" if t.sampling == "length_buckets" else t.sampling,
            dataloader_num_workers=t.dataloader_workers,
            log_level="warning",
            use_liger_kernel=check_liger(spec),
            torch_compile=t.compile,
            **fsdp_arguments(spec, strategy),
        )
        return cls(**{**values, **(extra or {})})  # the objective's settings win (e.g. kto's data order)
    except ValueError as exc:
        msg = str(exc)
        field = "train.optim" if "OptimizerNames" in msg else "train.lr_scheduler" if "SchedulerType" in msg else "train"
        raise SpecError([Problem(field, msg)], hint="names follow transformers' TrainingArguments") from None


def fsdp_arguments(spec: RunSpec, strategy: str) -> dict[str, Any]:
    """transformers' FSDP2 settings when the run shards (`strategy`: resources.strategy as the memory plan
    resolved it).

    Checkpoints are sharded (each rank writes its own part, in torch.distributed.checkpoint's format)
    and the final model is gathered into one Hugging Face folder. Activation checkpointing stays the
    model's own (train.gradient_checkpointing), which the auto policy switches per micro-batch."""
    if strategy != "fsdp":
        return {}
    from kubetune.train.model import use_cpu

    if spec.resources.offload and use_cpu(spec):
        raise UsageError("resources.offload moves sharded state from accelerator memory to CPU memory, and this "
                         "run trains on the CPU", "set resources.offload: false here")
    from kubetune.hf import drop_log_message

    # FSDP's own activation checkpointing wraps every layer for good; the model's lets the auto policy
    # recompute only long micro-batches, for one extra all-gather per checkpointed layer in backward.
    drop_log_message("transformers.training_args", "prefer `fsdp_config['activation_checkpointing']`")
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
        "cpu_offload": spec.resources.offload, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
