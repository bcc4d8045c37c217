"""Batches of pre-tokenised rows: pad to the longest row, labels padded with -100."""

from __future__ import annotations

from typing import Any

from kubetune.data.template import IGNORE


class ListDataset:
    """A map-style dataset over encoded rows; exposes lengths for length-grouped sampling."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> list[int]:
        return [len(r.input_ids) for r in self.rows]

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self.rows[i]
        return {"input_ids": row.input_ids, "labels": row.labels}


class PadCollator:
    def __init__(self, pad_id: int, multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:
            longest = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])  # lists, or int32 numpy views from the data cache
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class FlatCollator:
    """Padding-free batches: the micro-batch's rows concatenated into one sequence of shape (1, N),
    position ids restarting at 0 for each row. Attention stays within a row — FlashAttention-2 reads
    the boundaries from the position ids (varlen), SDPA and eager get a block-diagonal causal mask
    built from them — so the loss is the padded batch's, with no compute spent on padding. The first
    label of every row is ignored: there the model would predict a row from the end of the previous one."""

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        labels = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        positions = torch.cat([torch.arange(len(f["input_ids"]), dtype=torch.long) for f in features])
        labels[positions == 0] = IGNORE
        return {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None], "use_cache": False}
