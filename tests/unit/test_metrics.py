"""Generation metrics."""

from __future__ import annotations

import pytest

from kubetune.evaluate.metrics import exact_match, rouge


def test_exact_match_normalises_case_and_spaces() -> None:
    assert exact_match(["A blue  fox. ", "no"], ["a blue fox.", "yes"]) == 0.5


def test_rouge_identical_and_disjoint() -> None:
    same = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    none = rouge(["zebra"], ["the cat sat"])
    assert none["rouge1"] == 0.0
    partial = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert 0 < partial["rougeL"] < 1 and partial["rouge1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
