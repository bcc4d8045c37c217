"""Preference data for DPO and KTO: rows → (prompt, chosen, rejected) → token ids through the run's chat
template, with the masks of the SFT path (only the answer's tokens are the completion).

Formats, detected per source like the SFT ones:
  preference          prompt/chosen/rejected: plain strings (a user turn and assistant answers), or
                      conversational (prompt a list of messages, chosen/rejected an assistant message
                      or a one-message list), as TRL takes them
  openai_preference   OpenAI's preference fine-tuning file: input.messages (+ input.tools),
                      preferred_output and non_preferred_output (lists holding the assistant message)
  kto                 prompt/completion/label (bool: the answer is desirable), plain or conversational;
                      for method.objective kto (which also takes pairs, as two labeled answers)
Every bad row is reported as file:line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kubetune.data.dataset import SourceReport, split_by_ratio
from kubetune.data.formats import PREFERENCE_KEYS, _message
from kubetune.artifacts.manifest import sha256_file
from kubetune.data.sources import local_files, read_source
from kubetune.data.template import IGNORE, ChatFormatter, TemplateMismatch
from kubetune.errors import DataError, Problem, capped
from kubetune.spec.models import DataSpec, RunSpec
from kubetune.uris import is_hub

PREFERENCE_FORMATS = ("preference", "openai_preference")


@dataclass(frozen=True)
class Pair:
    where: str
    prompt: tuple[dict[str, Any], ...]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    tools: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class EncodedPair:
    where: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PairSet:
    rows: list[EncodedPair] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    @property
    def total(self) -> int:
        return len(self.rows) + self.dropped

    def stats(self) -> dict[str, float]:
        lengths = sorted(len(r) for r in self.rows) or [0]
        return {"min": lengths[0], "p50": lengths[len(lengths) // 2], "p95": lengths[int(len(lengths) * 0.95)],
                "max": lengths[-1], "mean": sum(lengths) / len(lengths)}


def detect_preference(keys: set[str], data: DataSpec) -> str | None:
    c = data.columns
    if PREFERENCE_KEYS <= keys:
        return "openai_preference"
    if {c.prompt, "chosen", "rejected"} <= keys:
        return "preference"
    if {c.prompt, c.completion, "label"} <= keys:
        return "kto"
    return None


def to_pair(row: Any, where: str, fmt: str, data: DataSpec) -> Pair | Problem:
    if not isinstance(row, dict):
        return Problem(where, f"expected an object with columns, got {type(row).__name__}")
    if fmt == "openai_preference":
        missing = [k for k in ("input", "preferred_output", "non_preferred_output") if row.get(k) is None]
        if missing:
            return Problem(where, f"missing column {missing[0]!r} (OpenAI preference format)")
        inp = row["input"]
        if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list):
            return Problem(where, "column 'input' must be an object with a list of 'messages'")
        prompt, tools = inp["messages"], inp.get("tools")
        chosen, rejected = row["preferred_output"], row["non_preferred_output"]
        names = ("input.messages", "preferred_output", "non_preferred_output")
    else:
        col = data.columns.prompt
        missing = [k for k in (col, "chosen", "rejected") if row.get(k) is None]
        if missing:
            return Problem(where, f"missing column {missing[0]!r} (preference format)")
        prompt, tools = row[col], row.get(data.columns.tools)
        chosen, rejected = row["chosen"], row["rejected"]
        names = (col, "chosen", "rejected")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return Problem(where, "tools must be a list of tool (function) objects")
    messages = _prompt(prompt, names[0], data.system_prompt)
    if isinstance(messages, str):
        return Problem(where, messages)
    answers = []
    for value, name in ((chosen, names[1]), (rejected, names[2])):
        answer = _answer(value, name)
        if isinstance(answer, str):
            return Problem(where, answer)
        answers.append(answer)
    if answers[0] == answers[1]:
        return Problem(where, f"{names[1]} and {names[2]} are the same answer (nothing to prefer)")
    return Pair(where, messages, answers[0], answers[1], tuple(tools) if tools else None)


def _prompt(value: Any, name: str, system_prompt: str | None) -> tuple[dict[str, Any], ...] | str:
    if isinstance(value, str):
        if not value.strip():
            return f"column {name!r} is empty"
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        messages = []
        for i, msg in enumerate(value):
            converted = _message(msg, f"{name}[{i}]", sharegpt=False)
            if isinstance(converted, str):
                return converted
            messages.append(converted)
        if messages[-1]["role"] not in ("user", "tool"):
            return f"{name} must end with a user (or tool) message: the answers follow it"
    else:
        return f"column {name!r} must be a string or a non-empty list of messages, got {type(value).__name__}"
    # earlier answers in the context are context: only the preferred/rejected answer is compared
    messages = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in messages]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tuple(messages)


def _answer(value: Any, name: str) -> dict[str, Any] | str:
    if isinstance(value, str):
        return {"role": "assistant", "content": value} if value.strip() else f"column {name!r} is empty"
    if isinstance(value, list):
        if len(value) != 1:
            return f"{name} must hold exactly one assistant message, got {len(value)}"
        value = value[0]
    converted = _message(value, name, sharegpt=False)
    if isinstance(converted, str):
        return converted
    if converted["role"] != "assistant":
        return f"{name} must be an assistant message, got role {converted['role']!r}"
    return converted


@dataclass
class Skipped:
    """The rows left out (data.bad_rows: skip), shaped like the SFT data's `samples` for shared reporting."""

    skipped: list[Problem]
    eval: list[Any] = field(default_factory=list)  # no generation samples: DPO evaluates pairs


@dataclass
class PreferenceData:
    """What `validate`/`plan` report and DPO trains on."""

    train: PairSet
    eval: PairSet
    formatter: ChatFormatter
    model_dir: Path
    reports: list[SourceReport]
    samples: Skipped
    file_hashes: dict[str, str] = field(default_factory=dict)
    has_chat: bool = True

    def summary(self) -> list[str]:
        lines = [f"  {r.uri}: {r.format}, {r.used} rows" + (f", {r.skipped} skipped" if r.skipped else "")
                 for r in self.reports]
        st = self.train.stats()
        kind = "pairs" if self.train.rows and isinstance(self.train.rows[0], EncodedPair) else "labeled answers"
        lines.append(f"  train {kind} {len(self.train.rows)}, eval rows {len(self.eval.rows)}")
        lines.append(f"  tokens per row (prompt + longest answer): min {st['min']}  p50 {st['p50']}  p95 {st['p95']}"
                     f"  max {st['max']}")
        lines.append(f"  over max_length: {self.train.truncated} truncated, {self.train.dropped} dropped")
        lines.append(f"  chat template: {self.formatter.template_source}")
        return lines


def load_pairs(spec: RunSpec, objective: str = "dpo", labeled: bool = False
               ) -> tuple[list[Any], list[Any], list[SourceReport], list[Problem]]:
    """Training and eval rows: pairs; with `labeled` (kto) labeled answers (a pair gives two: the chosen
    answer desirable, the rejected one not), while eval may stay pairs (then preference accuracy is
    measured on them). `objective` names the objective in messages."""
    data = spec.data
    train, evals, reports, problems = gather(
        spec, lambda uri, fmt, weight: _load(uri, fmt, data, weight, objective, labeled),
        "preference data", prepare_train=_unpaired if labeled else None)
    if labeled and any(isinstance(r, Pair) for r in evals) and not all(isinstance(r, Pair) for r in evals):
        evals = _unpaired(evals)  # mixed eval sources: all as labeled answers
    return train, evals, reports, problems


def gather(spec: RunSpec, load: Callable[[str, str, float], tuple[list[Any], SourceReport, list[Problem]]],
           noun: str, prepare_train: Callable[[list[Any]], list[Any]] | None = None
           ) -> tuple[list[Any], list[Any], list[SourceReport], list[Problem]]:
    """Every training source and the eval source through `load` (uri, format, weight), data.bad_rows
    applied once for all of them, and the eval split; DataError when no training row is left."""
    data = spec.data
    problems: list[Problem] = []
    reports: list[SourceReport] = []
    train: list[Any] = []
    for source in data.sources():
        rows, report, bad = load(source.path, source.format or data.format, source.weight)
        train += prepare_train(rows) if prepare_train else rows
        reports.append(report)
        problems += bad
    evals: list[Any] = []
    if data.eval_source() is not None:
        evals, report, bad = load(data.eval_source().path, data.format, 1.0)
        report.uri = f"{report.uri} (eval)"
        reports.append(report)
        problems += bad
    if problems and data.bad_rows == "error":
        raise DataError(capped(problems), hint="fix these rows, or set data.bad_rows: skip to train without them")
    ratio = data.eval_ratio()
    if ratio is not None:
        train, evals = split_by_ratio(train, ratio, spec.train.seed)  # type: ignore[arg-type]
    if not train:
        raise DataError([Problem("data.train", f"no usable {noun}")])
    return train, evals, reports, problems


def _unpaired(rows: list[Any]) -> list[Any]:
    out: list[Any] = []
    for r in rows:
        if isinstance(r, Pair):
            out += [Labeled(f"{r.where}#chosen", r.prompt, r.chosen, True, r.tools),
                    Labeled(f"{r.where}#rejected", r.prompt, r.rejected, False, r.tools)]
        else:
            out.append(r)
    return out


def _load(uri: str, fmt: str, data: DataSpec, weight: float, objective: str, kto: bool
          ) -> tuple[list[Any], SourceReport, list[Problem]]:
    read = read_source(uri)
    problems = list(read.problems)
    allowed = PREFERENCE_FORMATS + (("kto",) if kto else ())
    if fmt == "auto":
        found = {detect_preference(set(r.data), data) for r in read.rows[:100] if isinstance(r.data, dict)} - {None}
        found &= set(allowed)
        if not found:
            wanted = "prompt/completion/label rows or preference pairs" if kto else "preference pairs"
            raise DataError(read.problems[:20] + [Problem(read.uri, f"no {wanted}: method.objective {objective} needs "
                                                                    + ("prompt/completion/label (bool), or " if kto else "")
                                                                    + "prompt/chosen/rejected or OpenAI's input/"
                                                                    "preferred_output/non_preferred_output rows")],
                            hint="point data.train at preference data, or use method.objective: sft")
        fmt = sorted(found)[0]
    elif fmt not in allowed:
        raise DataError([Problem(read.uri, f"data.format {fmt} is not a format of method.objective {objective}")],
                        hint=f"method.objective {objective} reads {', '.join(allowed)} (or auto)")
    out: list[Any] = []
    for row in read.rows:
        result = to_labeled(row.data, row.where, data) if fmt == "kto" else to_pair(row.data, row.where, fmt, data)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            out.append(result)
    whole, frac = divmod(weight, 1.0)
    out = out * int(whole) + out[:int(len(out) * frac)]
    report = SourceReport(uri, fmt, len(read.rows) + len(read.problems), len(out), len(problems), weight)
    return out, report, problems


@dataclass(frozen=True)
class Labeled:
    """One answer judged alone (KTO): desirable (label true) or not."""

    where: str
    prompt: tuple[dict[str, Any], ...]
    completion: dict[str, Any]
    label: bool
    tools: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class EncodedLabeled:
    where: str
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def to_labeled(row: Any, where: str, data: DataSpec) -> Labeled | Problem:
    if not isinstance(row, dict):
        return Problem(where, f"expected an object with columns, got {type(row).__name__}")
    c = data.columns
    missing = [k for k in (c.prompt, c.completion, "label") if row.get(k) is None]
    if missing:
        return Problem(where, f"missing column {missing[0]!r} (kto format: prompt, completion, label)")
    if not isinstance(row["label"], bool):
        return Problem(where, f"column 'label' must be true or false, got {row['label']!r}")
    tools = row.get(c.tools)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return Problem(where, "tools must be a list of tool (function) objects")
    messages = _prompt(row[c.prompt], c.prompt, data.system_prompt)
    if isinstance(messages, str):
        return Problem(where, messages)
    answer = _answer(row[c.completion], c.completion)
    if isinstance(answer, str):
        return Problem(where, answer)
    return Labeled(where, messages, answer, row["label"], tuple(tools) if tools else None)


def encode_labeled(rows: list[Labeled], fmt: ChatFormatter, data: DataSpec) -> PairSet:
    """Each labeled answer as prompt ids and answer ids (the SFT masks), data.too_long applied."""
    out = PairSet()
    problems: list[Problem] = []
    for row in rows:
        try:
            prompt, answer = _split(fmt, row.prompt + (row.completion,), row.tools, data.reasoning)
        except (TemplateMismatch, ValueError) as exc:
            problems.append(Problem(row.where, str(exc)))
            continue
        answers = _fit(prompt, [answer], data, row.where, out, problems)
        if answers is not None:
            out.rows.append(EncodedLabeled(row.where, prompt, answers[0], row.label))
    if problems:
        raise DataError(capped(problems), hint="raise data.max_length, or set data.too_long: truncate or drop")
    return out


def encode_rows(rows: list[Any], fmt: ChatFormatter, data: DataSpec) -> PairSet:
    if rows and isinstance(rows[0], Labeled):
        return encode_labeled(rows, fmt, data)
    return encode_pairs(rows, fmt, data)


def encode_pairs(pairs: list[Pair], fmt: ChatFormatter, data: DataSpec) -> PairSet:
    """Each pair as prompt ids and the two answers' ids (what the template renders after the prompt, up
    to and with the end-of-turn token). data.too_long: truncate cuts the answers, drop and error as SFT."""
    out = PairSet()
    problems: list[Problem] = []
    for pair in pairs:
        try:
            prompt_c, chosen = _split(fmt, pair.prompt + (pair.chosen,), pair.tools, data.reasoning)
            prompt_r, rejected = _split(fmt, pair.prompt + (pair.rejected,), pair.tools, data.reasoning)
        except (TemplateMismatch, ValueError) as exc:
            problems.append(Problem(pair.where, str(exc)))
            continue
        if prompt_c != prompt_r:
            problems.append(Problem(pair.where, "the chat template renders the prompt differently before the two "
                                                "answers; they cannot be compared"))
            continue
        answers = _fit(prompt_c, [chosen, rejected], data, pair.where, out, problems)
        if answers is not None:
            out.rows.append(EncodedPair(pair.where, prompt_c, *answers))
    if problems:
        raise DataError(capped(problems), hint="raise data.max_length, or set data.too_long: truncate or drop")
    return out


def _fit(prompt: list[int], answers: list[list[int]], data: DataSpec, where: str, out: PairSet,
         problems: list[Problem]) -> list[list[int]] | None:
    """The answers within data.max_length after the prompt (data.too_long: truncate cuts the answers,
    drop counts the row out, error reports it); None when the row is left out."""
    length = len(prompt) + max(len(a) for a in answers)
    if length <= data.max_length:
        return answers
    room = data.max_length - len(prompt)
    if data.too_long == "error":
        problems.append(Problem(where, f"{length} tokens, over data.max_length {data.max_length}"))
        return None
    if data.too_long == "drop" or room < 2:
        out.dropped += 1
        return None
    out.truncated += 1
    return [a[:room] for a in answers]


def _split(fmt: ChatFormatter, messages: tuple[dict[str, Any], ...], tools: Any, reasoning: str
           ) -> tuple[list[int], list[int]]:
    """(context ids, answer ids) of the last assistant turn, from the SFT path's loss mask."""
    parts = fmt.encode_conversation(messages, "assistant", tools=tools, reasoning=reasoning)
    if not parts:
        raise ValueError("the answer renders to no tokens")
    last = parts[-1]
    trained = [i for i, label in enumerate(last.labels) if label != IGNORE]
    if not trained:
        raise ValueError("the answer renders to no trained tokens")
    first, end = trained[0], trained[-1] + 1
    return list(map(int, last.ids[:first])), list(map(int, last.ids[first:end]))


def prepare_pairs(spec: RunSpec, objective: str = "dpo", labeled: bool = False) -> PreferenceData:
    """Load, check and tokenise the spec's preference data (no torch): pairs, or with `labeled` answers
    labeled desirable or not (pairs are split into two)."""
    from kubetune.storage import resolve_model

    model_dir = resolve_model(spec.model.base, spec.model.revision, only_tokenizer=True)
    formatter = ChatFormatter(model_dir, spec.model.chat_template)
    train, evals, reports, skipped = load_pairs(spec, objective, labeled)
    return PreferenceData(encode_rows(train, formatter, spec.data), encode_rows(evals, formatter, spec.data),
                          formatter, model_dir, reports, Skipped(skipped), source_hashes(spec))


def source_hashes(spec: RunSpec) -> dict[str, str]:
    """sha256 of every local training file, for the run's manifest (as the SFT data records them)."""
    hashes: dict[str, str] = {}
    for source in spec.data.sources():
        if not is_hub(source.path):
            hashes.update({str(f): sha256_file(f) for f in local_files(source.path)})
    return hashes
