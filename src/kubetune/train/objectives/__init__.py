"""Training objectives. An objective turns the spec into its data, its collator and its Trainer;
everything around it (model and method, batch plan, events, checkpoints and their upload, resume,
preemption, the lease, trackers, eval) is shared. The objective is chosen here, in one place.

A new objective (DPO, KTO, GRPO) is one module beside sft.py that satisfies `Objective`, and one
line in `objective_for`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kubetune.artifacts.layout import RunLayout
from kubetune.spec.models import RunSpec


class Objective(Protocol):
    name: str

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


def objective_for(spec: RunSpec) -> Objective:
    if spec.method.objective == "dpo":
        from kubetune.train.objectives.dpo import DPO

        return DPO()
    if spec.method.objective == "kto":
        from kubetune.train.objectives.kto import KTO

        return KTO()
    if spec.method.objective == "grpo":
        from kubetune.train.objectives.grpo import GRPO

        return GRPO()
    from kubetune.train.objectives.sft import SFT

    return SFT()
