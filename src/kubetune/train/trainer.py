"""The transformers Trainer with one change: kubetune's length-bucketed batch order."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from kubetune.train.sampling import LengthBucketSampler


class KubetuneTrainer(Trainer):
    def __init__(self, *args: Any, length_buckets: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.length_buckets = length_buckets
        # Real and padded positions since the last log, kept as tensors: reading them (a host sync)
        # happens only at logging steps, never per step.
        self._real: Any = 0
        self._positions = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        mask = inputs.get("attention_mask")
        if mask is not None:
            self._real = self._real + mask.sum()
            self._positions += mask.numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def take_padding_fraction(self) -> float | None:
        """Share of padded positions in the micro-batches since the previous call (this rank)."""
        if not self._positions:
            return None
        real = float(self._real)
        frac = 1 - real / self._positions
        self._real, self._positions = 0, 0
        return frac

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.length_buckets or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        return LengthBucketSampler(dataset.lengths(), self.args.per_device_train_batch_size,
                                   world_size=self.args.world_size, seed=self.args.data_seed or self.args.seed)
