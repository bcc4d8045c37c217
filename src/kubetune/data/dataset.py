"""From `spec.data` to train and eval samples: read each source, detect its format, convert and
validate every row (all problems at once), mix sources by weight, and split off eval rows."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.data.formats import PREFERENCE_KEYS, Sample, detect_format, to_sample
from kubetune.data.sources import SourceRows, read_source
from kubetune.errors import DataError, Problem, capped
from kubetune.spec.models import Columns, DataSource, DataSpec

@dataclass
class SourceReport:
    uri: str
    format: str
    rows: int
    used: int
    skipped: int
    weight: float


@dataclass
class Samples:
    train: list[Sample]
    eval: list[Sample]
    sources: list[SourceReport] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)


def load_samples(data: DataSpec, seed: int) -> Samples:
    """Every row of every source, checked; raises DataError listing all bad rows (unless skipped)."""
    problems: list[Problem] = []
    reports: list[SourceReport] = []
    files: list[Path] = []
    per_source: list[list[Sample]] = []
    need_assistant = data.loss_on == "assistant"
    for source in data.sources():
        samples, report, bad, src_files = _load_source(source, data, need_assistant)
        problems += bad
        reports.append(report)
        files += src_files
        per_source.append(samples)
    eval_samples: list[Sample] = []
    eval_source = data.eval_source()
    if eval_source is not None:
        eval_samples, report, bad, src_files = _load_source(eval_source, data, need_assistant)
        report.uri = f"{report.uri} (eval)"
        problems += bad
        reports.append(report)
        files += src_files
    if problems and data.bad_rows == "error":
        raise DataError(capped(problems), hint="fix these rows, or set data.bad_rows: skip to train without them")
    rng = random.Random(seed)
    train: list[Sample] = []
    for source, samples in zip(data.sources(), per_source):
        train += _weighted(samples, source.weight, rng)
    ratio = data.eval_ratio()
    if ratio is not None:
        train, eval_samples = split_by_ratio(train, ratio, seed)
    if not train:
        raise DataError([Problem("data.train", "no usable training rows")])
    return Samples(train, eval_samples, reports, files, problems)


def _load_source(source: DataSource, data: DataSpec, need_assistant: bool
                 ) -> tuple[list[Sample], SourceReport, list[Problem], list[Path]]:
    read = read_source(source.path)
    columns: Columns = source.columns or data.columns
    fmt = source.format or data.format
    if fmt == "auto":
        fmt = _detect(read, columns)
    if fmt in ("preference", "openai_preference", "kto"):
        raise DataError([Problem(source.path, f"data.format {fmt} holds preference pairs, and method.objective is sft")],
                        hint="set method.objective: dpo or orpo to train on preference pairs")
    samples: list[Sample] = []
    problems = list(read.problems)
    for row in read.rows:
        result = to_sample(row.data, row.where, fmt, columns, data.system_prompt, need_assistant)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            samples.append(result)
    report = SourceReport(source.path, fmt, len(read.rows) + len(read.problems), len(samples),
                          len(problems), source.weight)
    return samples, report, problems, read.files


def _detect(read: SourceRows, columns: Columns) -> str:
    votes: dict[str, int] = {}
    seen_keys: set[str] = set()
    for row in read.rows[:100]:
        if isinstance(row.data, dict):
            keys = set(row.data)
            seen_keys |= keys
            labeled = {columns.prompt, columns.completion, "label"} <= keys and isinstance(row.data["label"], bool)
            if PREFERENCE_KEYS <= keys or {columns.prompt, "chosen", "rejected"} <= keys or labeled:
                raise DataError([Problem(row.where, "preference data (prompt/chosen/rejected, OpenAI's input/"
                                                    "preferred_output/non_preferred_output, or prompt/completion "
                                                    "with a true/false label), and method.objective is sft")],
                                hint="set method.objective: dpo or orpo (pairs), or kto (labeled answers)")
            fmt = detect_format(keys, columns)
            if fmt:
                votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        if not read.rows:
            # Nothing parsed: the reading problems (bad JSON, corrupt file) are the real story.
            raise DataError(read.problems or [Problem(read.uri, "no rows")],
                            hint="fix the file, or point data.train at another one")
        if not seen_keys:
            kind = type(read.rows[0].data).__name__
            raise DataError(read.problems[:20] + [Problem(read.rows[0].where, f"rows must be objects with columns, got {kind}")])
        raise DataError(
            read.problems[:20] + [Problem(read.uri, f"cannot tell the format from the columns {sorted(seen_keys)}")],
            hint="expected messages, conversations (ShareGPT), instruction+output, prompt+completion or text; "
            "set data.format and map your column names with data.columns (e.g. columns: {prompt: question})",
        )
    return max(votes, key=lambda k: votes[k])


def _weighted(samples: list[Sample], weight: float, rng: random.Random) -> list[Sample]:
    """weight 2 repeats every row twice; 0.5 keeps a random half (deterministic for a seed)."""
    whole, frac = divmod(weight, 1.0)
    out = samples * int(whole)
    extra = round(frac * len(samples))
    if extra:
        out += rng.sample(samples, extra)
    return out


def split_by_ratio(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``ratio`` of the rows for eval, chosen by a hash of (seed, row), so the split is
    stable across runs and machines and does not depend on row order."""
    if len(samples) < 2:
        return samples, []
    n_eval = max(1, round(len(samples) * ratio))

    def key(s: Sample) -> str:
        return hashlib.sha256(f"{seed}|{s.where}".encode()).hexdigest()

    ranked = sorted(range(len(samples)), key=lambda i: key(samples[i]))
    held = set(ranked[:n_eval])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])
