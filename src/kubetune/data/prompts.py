"""Prompts for GRPO: rows with a `prompt` column (text, or a list of messages ending with the user's),
every other column kept for the reward functions; every bad row reported as file:line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.data.dataset import SourceReport
from kubetune.data.preferences import Skipped, _prompt, gather, source_hashes
from kubetune.data.sources import read_source
from kubetune.errors import Problem
from kubetune.spec.models import RunSpec


@dataclass(frozen=True)
class PromptRow:
    where: str
    prompt: tuple[dict[str, Any], ...]
    columns: dict[str, Any]

    def __len__(self) -> int:  # for shared reports: prompts are measured in tokens elsewhere
        return 0


def _rows(uri: str, spec: RunSpec, weight: float) -> tuple[list[PromptRow], SourceReport, list[Problem]]:
    data = spec.data
    col = data.columns.prompt
    needed = {r.column for r in spec.method.grpo.rewards if r.column}
    read = read_source(uri)
    problems = list(read.problems)
    out: list[PromptRow] = []
    for row in read.rows:
        if not isinstance(row.data, dict):
            problems.append(Problem(row.where, f"expected an object with columns, got {type(row.data).__name__}"))
            continue
        if row.data.get(col) is None:
            problems.append(Problem(row.where, f"missing column {col!r} (grpo prompts)"))
            continue
        missing = sorted(c for c in needed if c not in row.data)
        if missing:
            problems.append(Problem(row.where, f"missing column {missing[0]!r} (a reward function reads it)"))
            continue
        messages = _prompt(row.data[col], col, data.system_prompt)
        if isinstance(messages, str):
            problems.append(Problem(row.where, messages))
            continue
        out.append(PromptRow(row.where, messages, {k: v for k, v in row.data.items() if k != col}))
    whole, frac = divmod(weight, 1.0)
    out = out * int(whole) + out[:int(len(out) * frac)]
    return out, SourceReport(uri, "prompts", len(read.rows) + len(read.problems), len(out), len(problems), weight), problems


@dataclass
class PromptSet:
    rows: list[PromptRow]
    truncated: int = 0
    dropped: int = 0

    @property
    def total(self) -> int:
        return len(self.rows)

    def stats(self) -> dict[str, float]:
        return {"min": 0, "p50": 0, "p95": 0, "max": 0, "mean": 0}


@dataclass
class PromptData:
    train: PromptSet
    eval: PromptSet
    formatter: Any
    model_dir: Any
    reports: list[SourceReport]
    samples: Skipped
    file_hashes: dict[str, str]
    has_chat: bool = True

    def summary(self) -> list[str]:
        lines = [f"  {r.uri}: prompts, {r.used} rows" + (f", {r.skipped} skipped" if r.skipped else "")
                 for r in self.reports]
        lines.append(f"  train prompts {len(self.train.rows)}, eval prompts {len(self.eval.rows)}")
        lines.append(f"  chat template: {self.formatter.template_source}")
        return lines


def prepare_prompts(spec: RunSpec) -> PromptData:
    from kubetune.data.template import ChatFormatter
    from kubetune.storage import resolve_model

    model_dir = resolve_model(spec.model.base, spec.model.revision, only_tokenizer=True)
    formatter = ChatFormatter(model_dir, spec.model.chat_template)
    train, evals, reports, problems = gather(spec, lambda uri, _fmt, weight: _rows(uri, spec, weight), "prompts")
    return PromptData(PromptSet(train), PromptSet(evals), formatter, model_dir, reports, Skipped(problems),
                      source_hashes(spec))
