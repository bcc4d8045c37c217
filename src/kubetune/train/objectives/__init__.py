"""Training objectives. An objective turns the spec into its data, its collator and its Trainer, and says
what the rest of kubetune must know about it: how many sequences a row puts into a micro-batch and
whether a frozen reference copy sits beside the weights (the memory plan), how a sample is shown
(`plan`), what a job costs (the control plane's caps) and which OpenAI fine-tuning method maps to it.
Everything around it (model and method, batch plan, events, checkpoints and their upload, resume,
preemption, the lease, trackers, eval) is shared.

A new objective is one module beside sft.py with a class that satisfies `Objective` (usually by
extending `BaseObjective`), one line in OBJECTIVES, and its settings section in the spec.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Protocol

from kubetune.runs.layout import RunLayout
from kubetune.spec.models import RunSpec

# name → "module:Class"; the names are the spec's `method.objective` values (spec.models.OBJECTIVE_NAMES)
OBJECTIVES: dict[str, str] = {
    "sft": "kubetune.train.objectives.sft:SFT",
    "dpo": "kubetune.train.objectives.dpo:DPO",
    "kto": "kubetune.train.objectives.kto:KTO",
    "orpo": "kubetune.train.objectives.orpo:ORPO",
    "grpo": "kubetune.train.objectives.grpo:GRPO",
}


class Objective(Protocol):
    name: str
    # OpenAI fine-tuning's `method.type` that trains this objective (None: not offered through that API)
    openai_method: str | None

    def prepare(self, spec: RunSpec) -> Any:
        """The run's data, tokenized and masked (also what `validate` and `plan` report)."""

    def trainer(self, spec: RunSpec, data: Any, model: Any, args: Any, batches: Any, callbacks: list[Any]) -> Any:
        """A transformers Trainer (with `take_token_counts()`) for the model and data."""

    def arguments(self, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        """The TrainingArguments subclass the objective's Trainer takes (None: transformers' own) and its
        objective-specific settings."""

    def save_final(self, spec: RunSpec, trainer: Any, data: Any, layout: RunLayout, main: bool) -> Path:
        """Write final/ (COMPLETE last) and return the model folder."""

    def evaluate(self, spec: RunSpec, trainer: Any, data: Any, layout: RunLayout, main: bool) -> None:
        """After training, on every rank: the objective's own evaluation (logged through the trainer)."""

    def sequences_per_row(self, spec: RunSpec) -> int:
        """Sequences of up to data.max_length tokens that one training row puts into a micro-batch."""

    def reference_copy(self, spec: RunSpec, method: str) -> bool:
        """Whether training holds a frozen copy of the weights beside the trained ones (for `method`,
        which the memory plan varies: with LoRA the reference is the adapter disabled)."""

    def memory_notes(self, spec: RunSpec, plan: Any, seq_len: int, kv_bytes_per_token: int) -> list[str]:
        """What the memory plan should tell about this objective's micro-batch."""

    def answers_per_row(self, spec: RunSpec) -> int:
        """Training-batch entries one data row becomes (train.total_batch_size counts these)."""

    def tokens_per_row(self, spec: RunSpec) -> int:
        """At most this many tokens are processed for one batch entry (prompt, answers, generations)."""

    def held_out_passes(self, spec: RunSpec, steps: int) -> tuple[str, int, int] | None:
        """Own held-out scoring during a job of `steps` steps: (its spec field, scorings, rows scored per
        eval row over the job); None: the eval rows are read at train.eval_every_steps and the end."""

    def openai_hyperparameters(self, spec: RunSpec) -> dict[str, Any]:
        """This objective's settings under OpenAI's hyperparameter names."""

    def show(self, spec: RunSpec, data: Any, rows: list[Any], color: bool) -> list[Any]:
        """`plan`: lines (str or rich Text) showing these rows as they will be trained."""

    def sample_json(self, data: Any, rows: list[Any]) -> list[str]:
        """`plan --show N --json`: one JSON line per row."""


class BaseObjective:
    """Defaults for an objective that trains one sequence per row and keeps no reference copy."""

    name = ""
    openai_method: str | None = None

    def evaluate(self, spec: RunSpec, trainer: Any, data: Any, layout: RunLayout, main: bool) -> None:
        return None

    def save_final(self, spec: RunSpec, trainer: Any, data: Any, layout: RunLayout, main: bool) -> Path:
        from kubetune.train.objectives.sft import save_final_folder

        return save_final_folder(spec, trainer, data, layout, main)

    def sequences_per_row(self, spec: RunSpec) -> int:
        return 1

    def reference_copy(self, spec: RunSpec, method: str) -> bool:
        return False

    def memory_notes(self, spec: RunSpec, plan: Any, seq_len: int, kv_bytes_per_token: int) -> list[str]:
        return []

    def answers_per_row(self, spec: RunSpec) -> int:
        return 1

    def tokens_per_row(self, spec: RunSpec) -> int:
        return spec.data.max_length * self.sequences_per_row(spec)

    def held_out_passes(self, spec: RunSpec, steps: int) -> tuple[str, int, int] | None:
        return None

    def openai_hyperparameters(self, spec: RunSpec) -> dict[str, Any]:
        return {}

    def show(self, spec: RunSpec, data: Any, rows: list[Any], color: bool) -> list[Any]:
        from kubetune.train.plan import show_sample

        legend = "green = trained, dim = masked" if color else "⟦trained⟧, the rest masked"
        out: list[Any] = []
        for row in rows:
            out += [f"\nsample ({row.where}; {legend}):", show_sample(row, data.formatter, color)]
        return out

    def sample_json(self, data: Any, rows: list[Any]) -> list[str]:
        from kubetune.train.plan import segments

        return [json.dumps({"where": row.where, "segments": segments(row, data.formatter)}, ensure_ascii=False)
                for row in rows]


def objective_named(name: str) -> Objective:
    module, _, cls = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()  # type: ignore[no-any-return]


def objective_for(spec: RunSpec) -> Objective:
    return objective_named(spec.method.objective)


def objective_for_openai(method_type: str) -> str:
    """The objective OpenAI's fine-tuning `method.type` trains (KeyError: none)."""
    for name in OBJECTIVES:
        if objective_named(name).openai_method == method_type:
            return name
    raise KeyError(method_type)
