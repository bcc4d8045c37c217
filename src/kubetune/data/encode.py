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
                   loss_on: str) -> EncodeReport:
    """Encode every sample; too_long=error raises one DataError listing every over-long row."""
    report = EncodeReport(rows=[])
    problems: list[Problem] = []
    for sample in samples:
        try:
            if sample.messages is not None:
                ids, labels = fmt.encode_chat(sample.messages, loss_on)
            else:
                ids = fmt.encode_text(sample.text or "")
                labels = list(ids)
        except TemplateMismatch as exc:
            problems.append(Problem(sample.where, str(exc)))
            continue
        report.lengths.append(len(ids))
        if len(ids) > max_length:
            if too_long == "error":
                problems.append(Problem(sample.where, f"{len(ids)} tokens > data.max_length {max_length}"))
                continue
            if too_long == "drop":
                report.dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        row = Encoded(ids, labels, sample.where)
        if row.trained_tokens == 0:
            # e.g. truncation cut off every assistant token: the row would only add padding.
            report.no_trained_tokens += 1
            report.dropped += 1
            continue
        report.rows.append(row)
    if problems:
        hint = ("raise data.max_length, or set data.too_long: truncate or drop"
                if any("max_length" in p.message for p in problems) else
                "use a prefix-stable template (model.chat_template: chatml or a template file)")
        raise DataError(capped(problems), hint=hint)
    return report
