"""OpenAI's graders, computed: string checks, text similarity metrics against their libraries' own
numbers, templates over the sample and the item, multi-grader formulas and what a formula may not do."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from kubetune.graders import Grader, GraderError, check_grader, grade

GRADER = TypeAdapter(Grader)


def g(**fields: object) -> object:
    return GRADER.validate_python({"name": "g", **fields})


@pytest.mark.parametrize("operation,sample,expected", [
    ("eq", "42", 1.0), ("eq", "42 ", 0.0), ("ne", "41", 1.0), ("like", "it is 42.", 1.0), ("like", "it is 4 2", 0.0),
    ("ilike", "THE ANSWER IS FORTY-TWO", 1.0), ("like", "THE ANSWER IS FORTY-TWO", 0.0)])
def test_string_check(operation: str, sample: str, expected: float) -> None:
    reference = "forty-two" if "FORTY" in sample else "42"
    grader = g(type="string_check", input="{{sample.output_text}}", reference="{{item.answer}}", operation=operation)
    assert grade(grader, sample, {"answer": reference}).reward == expected


def test_similarity_metrics_are_the_libraries_numbers() -> None:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rapidfuzz import fuzz
    from rouge_score import rouge_scorer

    sample, reference = "the cat sat on the mat today", "the cat sat on the mat"

    def run(metric: str) -> float:
        return grade(g(type="text_similarity", input="{{sample.output_text}}", reference="{{item.ref}}",
                       evaluation_metric=metric), sample, {"ref": reference}).reward

    assert run("fuzzy_match") == pytest.approx(fuzz.ratio(sample, reference) / 100)
    assert run("bleu") == pytest.approx(sentence_bleu([reference.split()], sample.split(),
                                                      smoothing_function=SmoothingFunction().method1))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = scorer.score(reference, sample)
    assert run("rouge_1") == pytest.approx(scores["rouge1"].fmeasure)
    assert run("rouge_2") == pytest.approx(scores["rouge2"].fmeasure)
    assert run("rouge_l") == pytest.approx(scores["rougeL"].fmeasure)
    assert 0.5 < run("gleu") < 1 and 0.5 < run("meteor") <= 1
    assert run("rouge_1") > grade(g(type="text_similarity", input="a dog ran", reference="the cat sat on the mat",
                                    evaluation_metric="rouge_1"), "", None).reward


def test_templates_read_json_answers_and_a_missing_variable_is_an_error_not_a_crash() -> None:
    grader = g(type="string_check", input="{{sample.output_json.result.value}}", reference="{{item.expected}}",
               operation="eq")
    assert grade(grader, '{"result": {"value": 7}}', {"expected": "7"}).reward == 1.0
    missing = grade(grader, "not json", {"expected": "7"})
    assert missing.reward == 0.0 and missing.errors["invalid_variable_error"] and "sample.output_json" in missing.details


def test_multi_grader_formula() -> None:
    multi = g(type="multi", calculate_output="0.75 * exact + 0.25 * max(close, 0.5)", graders={
        "exact": {"name": "e", "type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.a}}",
                  "operation": "eq"},
        "close": {"name": "c", "type": "text_similarity", "input": "{{sample.output_text}}",
                  "reference": "{{item.a}}", "evaluation_metric": "fuzzy_match"}})
    check_grader(multi)
    right = grade(multi, "Paris", {"a": "Paris"})
    assert right.reward == pytest.approx(1.0) and right.scores == {"exact": 1.0, "close": 1.0}
    wrong = grade(multi, "London", {"a": "Paris"})
    assert wrong.reward == pytest.approx(0.25 * 0.5)


@pytest.mark.parametrize("formula,why", [
    ("__import__('os').system('id')", "can be called"), ("exact ** 1000", "not allowed"), ("unknown + 1", "unknown"),
    ("exact.__class__", "not allowed"), ("'a' * 10", "not allowed"), ("9" * 400 + " * exact", "too large"),
    ("(", "not a formula"), ("+".join(["exact"] * 300), "terms")])
def test_a_formula_can_only_do_arithmetic(formula: str, why: str) -> None:
    multi = g(type="multi", calculate_output=formula, graders={
        "exact": {"name": "e", "type": "string_check", "input": "x", "reference": "x", "operation": "eq"}})
    with pytest.raises(GraderError) as refused:
        check_grader(multi)
    assert refused.value.param == "grader.calculate_output" and why in refused.value.message


def test_graders_this_server_does_not_run_are_refused_by_field() -> None:
    with pytest.raises(GraderError) as refused:
        check_grader(g(type="python", source="def grade(sample, item):\n    return 1.0\n"))
    assert refused.value.param == "grader.type"
    with pytest.raises(GraderError) as refused:
        check_grader(g(type="text_similarity", input="a", reference="b", evaluation_metric="cosine"))
    assert refused.value.param == "grader.evaluation_metric"
    assert grade(g(type="multi", calculate_output="1 / (exact - 1)", graders={
        "exact": {"name": "e", "type": "string_check", "input": "x", "reference": "x", "operation": "eq"}}),
        "", None).errors["formula_parse_error"]
