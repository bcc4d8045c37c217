"""Prompts for GRPO: rows with a `prompt` column (text, or a list of messages ending with the user's),
every other column kept for the reward functions; every bad row reported as file:line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.data.dataset import SourceReport, split_by_ratio
from kubetune.data.preferences import Skipped, _prompt
from kubetune.data.sources import read_source
from kubetune.errors import DataError, Problem, capped
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
    from kubetune.artifacts.manifest import sha256_file
    from kubetune.data.sources import local_files
    from kubetune.data.template import ChatFormatter
    from kubetune.storage import resolve_model

    data = spec.data
    model_dir = resolve_model(spec.model.base, spec.model.revision, only_tokenizer=True)
    formatter = ChatFormatter(model_dir, spec.model.chat_template)
    problems: list[Problem] = []
    reports: list[SourceReport] = []
    train: list[PromptRow] = []
    for source in data.sources():
        rows, report, bad = _rows(source.path, spec, source.weight)
        train += rows
        reports.append(report)
        problems += bad
    evals: list[PromptRow] = []
    if data.eval_source() is not None:
        evals, report, bad = _rows(data.eval_source().path, spec, 1.0)
        report.uri = f"{report.uri} (eval)"
        reports.append(report)
        problems += bad
    if problems and data.bad_rows == "error":
        raise DataError(capped(problems), hint="fix these rows, or set data.bad_rows: skip to train without them")
    ratio = data.eval_ratio()
    if ratio is not None:
        train, evals = split_by_ratio(train, ratio, spec.train.seed)  # type: ignore[arg-type]
    if not train:
        raise DataError([Problem("data.train", "no usable prompts")])
    hashes: dict[str, str] = {}
    for source in data.sources():
        if not source.path.startswith("hf://"):
            hashes.update({str(f): sha256_file(f) for f in local_files(source.path)})
    return PromptData(PromptSet(train), PromptSet(evals), formatter, model_dir, reports, Skipped(problems), hashes)
