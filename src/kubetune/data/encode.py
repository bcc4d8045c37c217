"""Tokenise samples with loss masks and apply `data.too_long` — counting what was cut or dropped."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from kubetune.data.formats import Sample
from kubetune.data.template import IGNORE, ChatFormatter, TemplateMismatch
from kubetune.errors import DataError, Problem, capped


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class EncodeReport:
    rows: list[Encoded]
    lengths: list[int] = field(default_factory=list)  # before truncation
    truncated: int = 0
    dropped: int = 0
    no_trained_tokens: int = 0
    split_conversations: int = 0   # conversations trained as one sample per assistant turn
    split_extra_tokens: int = 0    # what splitting costs: tokens beyond one rendering of each conversation

    def split_note(self) -> str | None:
        """What `validate` and `plan` say when a template made kubetune split conversations."""
        if not self.split_conversations:
            return None
        total = sum(self.lengths) or 1
        return (f"  {self.split_conversations} multi-turn conversation(s) split into one sample per assistant turn: "
                f"the template renders earlier turns differently than the last (e.g. it drops their reasoning), "
                f"so each turn is trained after exactly the context inference sends "
                f"(+{self.split_extra_tokens} tokens, {100 * self.split_extra_tokens / total:.1f}% of the data)")

    @property
    def total(self) -> int:
        return len(self.rows) + self.dropped

    def stats(self) -> dict[str, float]:
        if not self.lengths:
            return {"min": 0, "p50": 0, "p95": 0, "max": 0, "mean": 0}
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
        return {"min": ordered[0], "p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1],
                "mean": round(statistics.fmean(ordered), 1)}


def encode_samples(samples: list[Sample], fmt: ChatFormatter, max_length: int, too_long: str,
                   loss_on: str, reasoning: str = "train") -> EncodeReport:
    """Encode every sample; too_long=error raises one DataError listing every over-long row."""
    report = EncodeReport(rows=[])
    problems: list[Problem] = []
    for sample in samples:
        try:
            if sample.messages is not None:
                parts = fmt.encode_conversation(sample.messages, loss_on, tools=sample.tools, reasoning=reasoning)
                if len(parts) > 1 or (parts and parts[0].turn is not None):
                    report.split_conversations += 1
                    report.split_extra_tokens += sum(len(p.ids) for p in parts) - max(len(p.ids) for p in parts)
                encoded = [(p.ids, p.labels, sample.where if p.turn is None else f"{sample.where}#turn{p.turn}")
                           for p in parts]
            else:
                ids = fmt.encode_text(sample.text or "")
                encoded = [(ids, list(ids), sample.where)]
        except TemplateMismatch as exc:
            problems.append(Problem(sample.where, str(exc)))
            continue
        for ids, labels, where in encoded:
            problem = _add(report, ids, labels, where, max_length, too_long)
            if problem is not None:
                problems.append(problem)
    if problems:
        hint = ("raise data.max_length, or set data.too_long: truncate or drop"
                if any("max_length" in p.message for p in problems) else
                "the chat template cannot be trained as inference renders it; use model.chat_template: chatml "
                "or a template file")
        raise DataError(capped(problems), hint=hint)
    return report


def _add(report: EncodeReport, ids: list[int], labels: list[int], where: str, max_length: int,
         too_long: str) -> Problem | None:
    """One encoded sample into the report, with data.too_long applied; a Problem for too_long: error."""
    report.lengths.append(len(ids))
    if len(ids) > max_length:
        if too_long == "error":
            return Problem(where, f"{len(ids)} tokens > data.max_length {max_length}")
        if too_long == "drop":
            report.dropped += 1
            return None
        ids, labels = ids[:max_length], labels[:max_length]
        report.truncated += 1
    row = Encoded(ids, labels, where)
    if row.trained_tokens == 0:
        # e.g. truncation cut off every assistant token: the row would only add padding.
        report.no_trained_tokens += 1
        report.dropped += 1
        return None
    report.rows.append(row)
    return None
