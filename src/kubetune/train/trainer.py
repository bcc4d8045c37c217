"""The transformers Trainer plus kubetune's per-step policies: length-bucketed batch order,
checkpointing only long micro-batches, malloc_trim on CPU, and sync-free token/padding counts.
The training loop itself stays transformers'."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from kubetune.train.sampling import LengthBucketSampler


class KubetuneTrainer(Trainer):
    """``checkpoint_above_tokens``: with activation checkpointing enabled on the model, recompute
    activations only for micro-batches of more padded tokens than this. On long-tailed data most
    batches are short: they skip the recompute, while the few long ones — which set peak memory —
    still checkpoint, so the peak stays that of always-on checkpointing."""

    def __init__(self, *args: Any, length_buckets: bool = True, checkpoint_above_tokens: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.length_buckets = length_buckets
        self.checkpoint_above_tokens = checkpoint_above_tokens
        self._checkpointing: bool | None = None
        self._trim = _malloc_trim() if self.args.use_cpu else None
        # Real and padded positions since the last log, kept as tensors: reading them (a host sync)
        # happens only at logging steps, never per step.
        self._real: Any = 0
        self._positions = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if self.checkpoint_above_tokens is not None:
            self._set_checkpointing(model, inputs["input_ids"].numel() > self.checkpoint_above_tokens)
        mask = inputs.get("attention_mask")
        if mask is not None:
            self._real = self._real + mask.sum()
            self._positions += mask.numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._trim is not None:
            self._trim(0)
        return loss

    def _set_checkpointing(self, model: Any, on: bool) -> None:
        if on == self._checkpointing:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = on
        self._checkpointing = on

    def take_token_counts(self) -> tuple[float, float]:
        """(real tokens, padded positions) since the previous call, summed over all ranks.

        Called at logging steps only: this is where the device-to-host read (and, under DDP, the
        all-reduce) happens — never per step. Every rank must call it (it is a collective)."""
        import torch
        import torch.distributed as dist

        counts = torch.tensor([float(self._real), float(self._positions)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            counts = counts.to(self.args.device)
            dist.all_reduce(counts)
        self._real, self._positions = 0, 0
        return float(counts[0]), float(counts[1])

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.length_buckets or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        return LengthBucketSampler(dataset.lengths(), self.args.per_device_train_batch_size,
                                   world_size=self.args.world_size, seed=self.args.data_seed or self.args.seed,
                                   accumulation=self.args.gradient_accumulation_steps)


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None. On CPU, batches of very different lengths leave freed activation
    memory resident but fragmented, and the next long batch stacks on top of it. Trimming after each
    step hands those pages back. Measured on the throughput bench: peak RSS 4.0 -> 3.2 GB (the same
    as checkpointing every batch) for ~10% of speed; trimming only before long batches kept 3.6 GB."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
