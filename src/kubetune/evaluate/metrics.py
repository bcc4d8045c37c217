"""Generation metrics: ROUGE-1/2/L F1 (rouge-score) and exact match, averaged over samples."""

from __future__ import annotations

import re
from typing import Sequence


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return 0.0
    return sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / len(references)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        for name, score in scorer.score(ref, pred).items():
            totals[name] += score.fmeasure
    n = max(1, len(references))
    return {name: total / n for name, total in totals.items()}
