"""OpenAI's graders, computed: string checks, text similarity metrics against their libraries' own
numbers, templates over the sample and the item, multi-grader formulas and what a formula may not do."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from kubetune.graders import Grader, GraderError, check_grader, grade, grade_many, parse_grader

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


# model graders: a judge model behind an OpenAI-compatible endpoint (tests/judge.py)

SCORE = {"type": "score_model", "name": "judge", "model": "grader-7b",
         "input": [{"role": "system", "content": "You grade answers. Reply with a score from 0 to 1."},
                   {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}}\n"},
                                                {"type": "input_text", "text": "Reference: {{item.answer}}"}]}],
         "sampling_params": {"temperature": 0, "seed": 7, "max_completions_tokens": 99999 // 100}}
LABEL = {"type": "label_model", "name": "verdict", "model": "grader-7b", "labels": ["right", "wrong"],
         "passing_labels": ["right"],
         "input": [{"role": "user", "content": "Answer: {{sample.output_text}}\nReference: {{item.answer}}"}]}


@pytest.fixture
def judge(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from tests.judge import Judge

    monkeypatch.setenv("JUDGE_KEY", "sk-judge")
    served = Judge(key="sk-judge")
    yield served
    served.close()


def judges(url: str, retries: int = 1, **extra: object):  # type: ignore[no-untyped-def]
    """The endpoints: one judge, grader-7b, served by `url`."""
    from kubetune.graders.judge import Endpoints
    from kubetune.spec.models import JudgeSpec

    return Endpoints({"grader-7b": JudgeSpec(base_url=url, model="org/judge-model", api_key_env="JUDGE_KEY",
                                             max_tokens=256, **extra)}, retries=retries)  # type: ignore[arg-type]


def test_score_and_label_model_graders_ask_the_operators_judge(judge) -> None:  # type: ignore[no-untyped-def]
    cases = [("12", {"answer": "12"}), ("13", {"answer": "12"}), ("7", {"answer": "7"})]
    scored = grade_many(g(**SCORE), cases, endpoints=judges(judge.url))
    assert [s.reward for s in scored] == [1.0, 0.0, 1.0] and not any(any(s.errors.values()) for s in scored)
    assert scored[0].tokens == {"grader-7b": {"prompt_tokens": 11, "completion_tokens": 3}}
    assert len(judge.requests) == 3  # one call per answer (a few at once: in any order)
    sent = next(r for r in judge.requests if "Answer: 12\nReference: 12" in r["messages"][1]["content"])
    # the operator's model name and key; the tenant's sampling within the operator's token cap; OpenAI's
    # structured answer asked for; the templates filled in
    assert sent["model"] == "org/judge-model" and sent["auth"] == "Bearer sk-judge"
    assert (sent["max_tokens"], sent["temperature"], sent["seed"]) == (256, 0, 7)
    assert sent["response_format"]["json_schema"]["schema"]["properties"]["result"] == {"type": "number"}
    assert sent["messages"] == [SCORE["input"][0], {"role": "user", "content": "Answer: 12\nReference: 12"}]
    labelled = grade_many(g(**LABEL), cases, endpoints=judges(judge.url))
    assert [s.reward for s in labelled] == [1.0, 0.0, 1.0]
    assert judge.requests[-1]["response_format"]["json_schema"]["schema"]["properties"]["result"] == \
        {"type": "string", "enum": ["right", "wrong"]}
    multi = g(type="multi", name="both", calculate_output="0.5 * judged + 0.5 * said", graders={
        "judged": {**SCORE, "range": [0, 10]},
        "said": {"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
                 "reference": "{{item.answer}}", "operation": "like"}})
    judge.scale, judge.mode = 10.0, "bare"  # a judge that ignores response_format and says the number
    both = grade(multi, "12", {"answer": "12"}, endpoints=judges(judge.url))
    assert both.scores == {"judged": 10.0, "said": 1.0} and both.reward == 5.5


@pytest.mark.parametrize("mode, error, detail", [
    ("prose", "model_grader_parse_error", "not a score"),
    ("out_of_range", "model_grader_parse_error", "outside the grader's range [0, 1]"),
    ("refuse", "model_grader_refusal_error", "refused: I cannot grade this."),
    ("error", "model_grader_server_error", "answered HTTP 503"),
    ("slow", "model_grader_server_error", "did not answer (APITimeoutError)"),
])
def test_a_judge_that_does_not_grade_is_that_answers_error_not_a_crash(judge, mode: str, error: str,  # type: ignore[no-untyped-def]
                                                                        detail: str) -> None:
    judge.mode = mode
    graded = grade(g(**SCORE), "12", {"answer": "12"}, endpoints=judges(judge.url, timeout_s=1.0))
    assert graded.reward == 0.0 and graded.errors[error] and detail in (graded.details or ""), graded
    assert judge.url.split("//")[1] not in (graded.details or "")  # the operator's endpoint is not named
    # a template variable the row does not have: no call at all
    calls = len(judge.requests)
    missing = grade(g(**SCORE), "12", {}, endpoints=judges(judge.url, timeout_s=1.0))
    assert missing.errors["invalid_variable_error"] and len(judge.requests) == calls


def test_model_graders_name_only_a_judge_the_operator_configured() -> None:
    cases = [
        ({**SCORE}, (), "grader.model", "need a judge model, and none is configured"),
        ({**SCORE, "model": "http://169.254.169.254/v1"}, ("grader-7b",), "grader.model",
         "not a judge model here; the judges are: grader-7b"),
        ({**SCORE, "range": [1, 1]}, ("grader-7b",), "grader.range", "low < high"),
        ({**LABEL, "passing_labels": ["maybe"]}, ("grader-7b",), "grader.passing_labels", "'maybe' is not one"),
        ({**LABEL, "labels": ["a", "a"]}, ("grader-7b",), "grader.labels", "must differ"),
        ({**LABEL, "input": [{"role": "user", "content": "{{env.HOME}}"}]}, ("grader-7b",), "grader.input.0.content",
         "sample.* and item.* only"),
    ]
    for grader, configured, param, message in cases:
        with pytest.raises(GraderError) as refused:
            check_grader(g(**grader), judges=configured)
        assert refused.value.param == param and message in refused.value.message, refused.value.message
    for bad, param in (({**SCORE, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                        "grader.input.0.content"),
                       ({**SCORE, "base_url": "http://evil"}, "grader.base_url"),
                       ({**SCORE, "sampling_params": {"max_completions_tokens": 10 ** 9}},
                        "grader.sampling_params.max_completions_tokens")):
        with pytest.raises(GraderError) as refused:
            parse_grader(bad)
        assert refused.value.param.startswith(param), refused.value.param
    check_grader(g(type="multi", name="m", calculate_output="a", graders={"a": LABEL}), judges=("grader-7b",))
    with pytest.raises(GraderError) as refused:
        check_grader(g(type="multi", name="m", calculate_output="a", graders={"a": LABEL}))
    assert refused.value.param == "grader.graders.a.model"


def test_in_training_a_judge_down_for_a_batch_is_transient_and_a_judge_that_never_scores_ends_the_run(  # type: ignore[no-untyped-def]
        judge) -> None:
    from kubetune.errors import TransientError, UsageError
    from kubetune.spec.models import SandboxSpec
    from kubetune.train.rewards import GraderReward

    reward = GraderReward(g(**SCORE), "method.grpo.rewards.0.grader", SandboxSpec(), judges(judge.url).judges)
    logged: dict[str, float] = {}
    assert reward(["p"] * 3, ["12", "13", "12"], answer=["12", "12", "12"],
                  log_metric=logged.__setitem__) == [1.0, 0.0, 1.0]
    assert logged["grader/model_error_mean"] == 0.0 and "grader/python_error_mean" not in logged
    judge.mode = "error"  # a retry continues from the last checkpoint (exit 75, not 2)
    with pytest.raises(TransientError, match="down or busy for a whole batch"):
        reward(["p"] * 2, ["12", "13"], answer=["12", "12"])
    judge.mode = "prose"
    with pytest.raises(UsageError, match="failed on every answer") as ended:
        reward(["p"] * 2, ["12", "13"], answer=["12", "12"])
    assert "judge must answer a score" in (ended.value.hint or "")


def test_cosine_similarity_embeds_with_the_operators_embedding_model(judge) -> None:  # type: ignore[no-untyped-def]
    import math

    from kubetune.spec.models import EndpointSpec
    from tests.judge import letter_counts

    def expected(a: str, b: str) -> float:
        x, y = letter_counts(a), letter_counts(b)
        return sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))

    cosine = g(type="text_similarity", input="{{sample.output_text}}", reference="{{item.answer}}",
               evaluation_metric="cosine")
    with pytest.raises(GraderError) as refused:
        check_grader(cosine)
    assert refused.value.param == "grader.evaluation_metric" and "none is configured" in refused.value.message
    check_grader(cosine, embeddings=True)
    from kubetune.graders.judge import Endpoints

    endpoint = Endpoints(embeddings=EndpointSpec(base_url=judge.url, model="org/embedder", api_key_env="JUDGE_KEY"))
    cases = [("the cat sat", {"answer": "a cat sat"}), ("zzz", {"answer": "abc"}), ("x", {})]
    graded = grade_many(cosine, cases, endpoints=endpoint)
    assert graded[0].reward == pytest.approx(expected("the cat sat", "a cat sat")) and graded[0].reward > 0.8
    assert graded[1].reward == 0.0 and not graded[1].errors["model_grader_server_error"]
    assert graded[2].errors["invalid_variable_error"]
    (sent,) = judge.requests  # one request for the batch
    assert sent["path"] == "/v1/embeddings" and sent["model"] == "org/embedder" and sent["auth"] == "Bearer sk-judge"
    assert sorted(sent["input"]) == ["a cat sat", "abc", "the cat sat", "zzz"]  # each text once
    multi = g(type="multi", name="m", calculate_output="cos", graders={"cos": {**cosine.model_dump(), "name": "c"}})
    assert grade(multi, "dog", {"answer": "god"}, endpoints=endpoint).reward == pytest.approx(1.0)
    judge.mode = "error"
    down = grade(cosine, "a", {"answer": "b"}, endpoints=endpoint)
    assert down.errors["model_grader_server_error"] and "embedding model answered HTTP 503" in (down.details or "")


def test_what_a_tenant_or_a_broken_judge_sends_is_bounded_and_graded_not_raised(judge) -> None:  # type: ignore[no-untyped-def]
    """From a hostile review: templates that fill in to gigabytes, a slow judge holding the graders,
    infinite scores, lone surrogates, numeric labels, judges answering what is not JSON."""
    import time

    from kubetune.graders.judge import Endpoints

    many = {"role": "user", "content": [{"type": "input_text", "text": "{{sample.output_text}}"}] * 17}
    with pytest.raises(GraderError) as refused:
        parse_grader({**SCORE, "input": [many]})
    assert refused.value.param.startswith("grader.input.0.content")
    wide = {"role": "user", "content": [{"type": "input_text", "text": "x" * 15_000}] * 2}
    with pytest.raises(GraderError, match="characters together"):
        parse_grader({**SCORE, "input": [wide]})
    repeated = {**SCORE, "input": [{"role": "user", "content": "{{sample.output_text}}" * 800}]}
    calls = len(judge.requests)
    huge = grade(g(**repeated), "y" * 10_000, {"answer": "1"}, endpoints=judges(judge.url))
    assert huge.errors["other_error"] and "longer than 100,000 characters" in (huge.details or "")
    assert len(judge.requests) == calls  # nothing was built, nothing sent

    judge.mode = "slow"  # six judges in one multi, 3 s each: one deadline for the grading, no retries
    multi = g(type="multi", name="m", calculate_output="a1+a2+a3+a4+a5+a6",
              graders={f"a{i}": {**SCORE, "name": f"a{i}"} for i in range(1, 7)})
    calls, started = len(judge.requests), time.monotonic()
    slow = grade(multi, "12", {"answer": "12"},
                 endpoints=Endpoints(judges(judge.url).judges, retries=0, deadline_s=1.0))
    assert time.monotonic() - started < 2.5 and slow.errors["model_grader_server_error"] and slow.retryable
    assert len(judge.requests) - calls == 6  # asked together, once each

    judge.mode = "json"
    with pytest.raises(GraderError, match="finite"):
        parse_grader({**SCORE, "range": [0, float("inf")]})
    judge.scale = float("inf")  # the judge says {"result": Infinity}
    assert grade(g(**SCORE), "12", {"answer": "12"}, endpoints=judges(judge.url)).errors["model_grader_parse_error"]
    judge.scale = 1.0
    surrogate = grade(g(**SCORE), "12", {"answer": "\ud800"}, endpoints=judges(judge.url))
    assert not surrogate.errors["model_grader_server_error"] and "\ufffd" in judge.requests[-1]["messages"][1]["content"]
    numeric = {**LABEL, "labels": ["1", "0"], "passing_labels": ["1"]}
    judge.mode = "bare"  # answers the label 1 as a number
    assert grade(g(**numeric), "12", {"answer": "12"}, endpoints=judges(judge.url)).reward == 1.0
    for mode in ("not_json", "number_content"):
        judge.mode = mode
        odd = grade(g(**SCORE), "12", {"answer": "12"}, endpoints=judges(judge.url))
        assert odd.reward == (1.0 if mode == "number_content" else 0.0), (mode, odd)
    judge.mode = "json"
    reasoning = {**SCORE, "sampling_params": {"reasoning_effort": "high"}}
    grade(g(**reasoning), "12", {"answer": "12"}, endpoints=judges(judge.url))
    assert judge.requests[-1]["reasoning_effort"] == "high"


def test_a_judge_refusing_the_question_is_not_retried_as_a_judge_down(judge) -> None:  # type: ignore[no-untyped-def]
    from kubetune.errors import UsageError
    from kubetune.spec.models import SandboxSpec
    from kubetune.train.rewards import GraderReward

    judge.key = "another-key"  # every call answered 401: retrying the run cannot help
    reward = GraderReward(g(**SCORE), "method.grpo.rewards.0.grader", SandboxSpec(), judges(judge.url).judges)
    with pytest.raises(UsageError, match="answered HTTP 401"):
        reward(["p"] * 2, ["12", "13"], answer=["12", "12"])
