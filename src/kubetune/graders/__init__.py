"""OpenAI's graders: a score in [0, 1] (or a formula's value) for a model's answer to a dataset row.

The shapes are OpenAI's (`string_check`, `text_similarity`, `multi`, `python`, `score_model`,
`label_model`) so a grader written for its API is checked and run here unchanged; templates read
`{{sample.output_text}}`, `{{sample.output_json.FIELD}}` and `{{item.FIELD}}`. This module runs the
graders that need no model in-process, and `python` graders — the tenant's code — in a sandboxed
process of their own (sandbox.py), once per batch of answers, and `score_model`/`label_model`
graders by asking a judge model the operator serves (judge.py), a few answers at a time.

Everything here is pure and bounded: texts compared by similarity metrics are cut to MAX_COMPARED
characters (the edit-distance and ROUGE-L metrics are quadratic), a formula is parsed into a small
arithmetic tree (no names but the sub-graders', no calls but a few math functions, no powers).
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from typing import Annotated, Any, Callable, Collection, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Grader", "GraderError", "Graded", "LabelModelGrader", "MultiGrader", "PythonGrader", "ScoreModelGrader",
           "StringCheckGrader", "TextSimilarityGrader", "check_grader", "grade", "grade_many", "model_graders",
           "cosine_graders", "parse_grader", "python_graders"]

MAX_TEXT = 20_000          # characters of a template
MAX_COMPARED = 2_000       # characters of each side a similarity metric compares (ROUGE-L is quadratic in words)
MAX_RENDERED = 100_000     # characters a filled-in template (a judge call's messages together) may have
MAX_PARTS = 16             # content parts of a judge's message
MAX_FORMULA_NODES = 200
_SURROGATE = re.compile("[\ud800-\udfff]")
_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][\w]*(?:\.[\w-]+)*)\s*\}\}")


class GraderError(ValueError):
    """A grader that cannot be used as written: `param` names the field (grader.operation, ...)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: str = Field(max_length=MAX_TEXT)
    reference: str = Field(max_length=MAX_TEXT)
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    input: str = Field(max_length=MAX_TEXT)
    reference: str = Field(max_length=MAX_TEXT)
    evaluation_metric: Literal["cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3",
                               "rouge_4", "rouge_5", "rouge_l"]


class PythonGrader(_Grader):
    type: Literal["python"]
    source: str = Field(max_length=256_000)
    image_tag: str | None = Field(None, max_length=128)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: str = Field(max_length=MAX_TEXT)


class JudgeMessage(BaseModel):
    """One message of a model grader's conversation with its judge (text only: judges read no images
    or audio here)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Annotated[str, Field(max_length=MAX_TEXT)], TextPart,
                   Annotated[list[TextPart], Field(max_length=MAX_PARTS)]]

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, list) and sum(len(p.text) for p in value) > MAX_TEXT:
            raise ValueError(f"a message's parts may have {MAX_TEXT:,} characters together")
        return value

    def text(self) -> str:
        parts = [self.content] if isinstance(self.content, (str, TextPart)) else self.content
        return "".join(p if isinstance(p, str) else p.text for p in parts)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_completions_tokens: int | None = Field(None, ge=1, le=32768)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class ScoreModelGrader(_Grader):
    type: Literal["score_model"]
    model: str = Field(min_length=1, max_length=128)
    input: list[JudgeMessage] = Field(min_length=1, max_length=32)
    range: list[float] | None = Field(None, min_length=2, max_length=2)
    sampling_params: SamplingParams | None = None

    @field_validator("range")
    @classmethod
    def _finite(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError("the range's bounds must be finite numbers")
        return value


class LabelModelGrader(_Grader):
    type: Literal["label_model"]
    model: str = Field(min_length=1, max_length=128)
    input: list[JudgeMessage] = Field(min_length=1, max_length=32)
    labels: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=2, max_length=64)
    passing_labels: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=1, max_length=64)


Single = Annotated[Union[StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader, LabelModelGrader],
                   Field(discriminator="type")]


class MultiGrader(_Grader):
    type: Literal["multi"]
    graders: dict[Annotated[str, Field(pattern=r"^[A-Za-z_]\w{0,63}$")], Single] = Field(min_length=1, max_length=32)
    calculate_output: str = Field(min_length=1, max_length=2000)


Grader = Annotated[Union[StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader, LabelModelGrader,
                         MultiGrader], Field(discriminator="type")]


class Graded(BaseModel):
    """One grading, in the fields OpenAI's run endpoint reports."""
    reward: float
    scores: dict[str, float] = Field(default_factory=dict)       # each sub-grader's (multi), else the grader's
    errors: dict[str, bool] = Field(default_factory=dict)
    details: str | None = None
    execution_time: float = 0.0
    tokens: dict[str, dict[str, int]] = Field(default_factory=dict)   # judge model → prompt/completion tokens
    retryable: bool = False   # it failed because a judge or embedding model was down or busy


ERRORS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error", "model_grader_refusal_error",
          "model_grader_server_error", "other_error", "python_grader_runtime_error", "python_grader_server_error",
          "sample_parse_error", "truncated_observation_error", "unresponsive_reward_error")


IN_PROCESS = frozenset({"string_check", "text_similarity", "multi"})
MODEL_GRADERS = frozenset({"score_model", "label_model"})   # run wherever a judge model is configured


def parse_grader(value: Any, where: str = "grader") -> Any:
    """A grader object from its JSON form; GraderError names the first field that is wrong."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Grader).validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        # pydantic names the union member it tried (graders.x.string_check.operation): keep the fields only
        loc = [str(p) for p in err["loc"] if p not in _TYPES]
        raise GraderError(".".join([where, *loc]), err["msg"]) from None


_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")


def python_graders(grader: Any) -> dict[str, Any]:
    """The python graders in `grader`, by the key their score is reported under."""
    if isinstance(grader, PythonGrader):
        return {grader.name: grader}
    if isinstance(grader, MultiGrader):
        return {k: g for k, g in grader.graders.items() if isinstance(g, PythonGrader)}
    return {}


def model_graders(grader: Any) -> dict[str, Any]:
    """The score_model/label_model graders in `grader`, by the key their score is reported under."""
    if grader.type in MODEL_GRADERS:
        return {grader.name: grader}
    if isinstance(grader, MultiGrader):
        return {k: g for k, g in grader.graders.items() if g.type in MODEL_GRADERS}
    return {}


def cosine_graders(grader: Any) -> dict[str, Any]:
    """The text_similarity graders in `grader` that compare embeddings (cosine), by their score's key."""
    def cosine(g: Any) -> bool:
        return isinstance(g, TextSimilarityGrader) and g.evaluation_metric == "cosine"
    if cosine(grader):
        return {grader.name: grader}
    if isinstance(grader, MultiGrader):
        return {k: g for k, g in grader.graders.items() if cosine(g)}
    return {}


def check_grader(grader: Any, runnable: frozenset[str] = IN_PROCESS, where: str = "grader",
                 judges: Collection[str] = (), embeddings: bool = False) -> None:
    """What `validate` adds to the schema: a formula that parses and names only sub-graders; metrics
    this server computes (cosine where an embedding model is configured); grader types it runs
    (`runnable`; model graders where their `model` is one of the `judges` configured). GraderError
    names the field."""
    if grader.type in MODEL_GRADERS:
        if not judges:
            raise GraderError(f"{where}.model", f"{grader.type} graders need a judge model, and none is configured "
                                                "here (server.yaml graders.models; a spec's method.grpo.judges)")
        if grader.model not in judges:
            raise GraderError(f"{where}.model", f"{grader.model!r} is not a judge model here; the judges are: "
                                                f"{', '.join(sorted(judges))}")
        if isinstance(grader, ScoreModelGrader) and grader.range and not grader.range[0] < grader.range[1]:
            raise GraderError(f"{where}.range", "the range is [low, high] with low < high")
        if isinstance(grader, LabelModelGrader):
            if len(set(grader.labels)) != len(grader.labels):
                raise GraderError(f"{where}.labels", "the labels must differ")
            stray = [label for label in grader.passing_labels if label not in grader.labels]
            if stray:
                raise GraderError(f"{where}.passing_labels", f"{stray[0]!r} is not one of the labels")
        for i, message in enumerate(grader.input):
            _check_template(message.text(), f"{where}.input.{i}.content")
    elif grader.type not in runnable:
        raise GraderError(f"{where}.type", f"{grader.type} graders do not run on this server")
    if isinstance(grader, TextSimilarityGrader) and grader.evaluation_metric == "cosine" and not embeddings:
        raise GraderError(f"{where}.evaluation_metric", "cosine needs an embedding model, and none is configured "
                                                        "here (server.yaml graders.embeddings; a spec's "
                                                        "method.grpo.embeddings); use fuzzy_match, bleu, gleu, meteor "
                                                        "or rouge_*")
    if isinstance(grader, MultiGrader):
        for name, sub in grader.graders.items():
            check_grader(sub, runnable, f"{where}.graders.{name}", judges, embeddings)
        try:
            _Formula(grader.calculate_output, set(grader.graders))
        except GraderError as exc:
            raise GraderError(f"{where}.calculate_output", exc.message) from None


def _check_template(text: str, where: str) -> None:
    for match in _VARIABLE.finditer(text):
        if match.group(1).split(".")[0] not in ("sample", "item"):
            raise GraderError(where, f"{{{{{match.group(1)}}}}}: a template reads sample.* and item.* only")


def grade(grader: Any, sample: str, item: Any, sandbox: Any = None, endpoints: Any = None) -> Graded:
    """Run a grader on one answer (`sample`, the model's text) to one row (`item`)."""
    return grade_many(grader, [(sample, item)], sandbox, endpoints)[0]


def grade_many(grader: Any, cases: list[tuple[str, Any]], sandbox: Any = None, endpoints: Any = None) -> list[Graded]:
    """Run a grader on each (answer, row). Python graders run in one sandboxed process per batch
    (`sandbox`: its SandboxLimits; None refuses them); model graders ask their judge and cosine
    similarity embeds the batch's texts (`endpoints`: judge.Endpoints; None refuses them), every
    judge call of the batch in one small pool; the rest in this process."""
    started = time.perf_counter()
    outside: dict[str, list[Any]] = {}
    for key, sub in python_graders(grader).items():
        if sandbox is None:
            raise GraderError("grader.type", "python graders do not run here")
        from kubetune.graders.sandbox import run_python

        outside[key] = run_python(sub.source, [(python_sample(s), item) for s, item in cases], sandbox)
    judged, embedded = model_graders(grader), cosine_graders(grader)
    if (judged or embedded) and endpoints is None:
        raise GraderError("grader.type", "model graders and cosine similarity do not run here")
    if judged:
        outside.update(_judged(judged, cases, endpoints))
    for key, sub in embedded.items():
        outside[key] = _embedded(sub, cases, endpoints)
    shared = (time.perf_counter() - started) / max(1, len(cases))
    return [_grade_one(grader, sample, item, {k: v[j] for k, v in outside.items()}, shared)
            for j, (sample, item) in enumerate(cases)]


def _judged(graders: dict[str, Any], cases: list[tuple[str, Any]], endpoints: Any) -> dict[str, list[Any]]:
    """Each model grader's judgement of each case (or JudgeFailed, or the _RenderError its messages
    raised), all the calls asked together."""
    from kubetune.graders.judge import JudgeCall, ask_all

    results: dict[str, list[Any]] = {key: [None] * len(cases) for key in graders}
    calls, slots = [], []
    for key, grader in graders.items():
        params = getattr(grader, "sampling_params", None)  # score_model has them, label_model not (as OpenAI's)
        sampling = params.model_dump(exclude_none=True) if params else {}
        labels = tuple(grader.labels) if isinstance(grader, LabelModelGrader) else ()
        bounds = tuple(grader.range) if isinstance(grader, ScoreModelGrader) and grader.range else (0.0, 1.0)
        for j, (sample, item) in enumerate(cases):
            try:
                budget = _Budget()
                messages = [{"role": m.role, "content": _sendable(render(m.text(), _namespace(sample, item), budget))}
                            for m in grader.input]
            except _RenderError as exc:
                results[key][j] = exc
                continue
            calls.append(JudgeCall(grader.model, messages, labels, bounds, sampling))  # type: ignore[arg-type]
            slots.append((key, j))
    for (key, j), outcome in zip(slots, ask_all(calls, endpoints)):
        results[key][j] = outcome
    return results


def _embedded(grader: Any, cases: list[tuple[str, Any]], endpoints: Any) -> list[Any]:
    """Each case's cosine similarity (a Judgement), JudgeFailed, or its template's _RenderError."""
    from kubetune.graders.judge import JudgeFailed, Judgement, cosines

    results: list[Any] = [None] * len(cases)
    pairs, slots = [], []
    for j, (sample, item) in enumerate(cases):
        try:
            namespace = _namespace(sample, item)
            pairs.append((_sendable(render(grader.input, namespace)[:MAX_COMPARED]),
                          _sendable(render(grader.reference, namespace)[:MAX_COMPARED])))
            slots.append(j)
        except _RenderError as exc:
            results[j] = exc
    found = cosines(pairs, endpoints) if pairs else []
    for n, j in enumerate(slots):
        results[j] = found if isinstance(found, JudgeFailed) else Judgement(found[n])
    return results


def _sendable(text: str) -> str:
    """UTF-8 that an HTTP body can carry: a lone surrogate (JSON's "\\ud800") becomes U+FFFD."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def _namespace(sample: str, item: Any) -> dict[str, Any]:
    return {"sample": {"output_text": sample, "output_json": _json_or_none(sample)}, "item": item}


def python_sample(text: str) -> dict[str, Any]:
    """The `sample` a python grader's grade(sample, item) receives (OpenAI's fields)."""
    return {"output_text": text, "output_json": _json_or_none(text), "output_tools": [],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def _grade_one(grader: Any, sample: str, item: Any, python: dict[str, Any], shared: float) -> Graded:
    started = time.perf_counter()
    errors = dict.fromkeys(ERRORS, False)
    namespace = _namespace(sample, item)
    scores: dict[str, float] = {}
    tokens = _tokens(grader, python)

    def failed(kind: str, details: str, retryable: bool = False) -> Graded:
        errors[kind] = True
        return Graded(reward=0.0, scores=scores, errors=errors, details=details, tokens=tokens, retryable=retryable,
                      execution_time=shared + time.perf_counter() - started)

    try:
        if isinstance(grader, MultiGrader):
            formula = _Formula(grader.calculate_output, set(grader.graders))
            for name, sub in grader.graders.items():
                scores[name] = _single(sub, namespace, python.get(name))
            reward = formula.value(scores)
        else:
            reward = _single(grader, namespace, python.get(grader.name))
            scores[grader.name] = reward
    except _MissingVariable as exc:
        return failed("invalid_variable_error", str(exc))
    except _TooLong as exc:
        return failed("other_error", str(exc))
    except ArithmeticError as exc:
        return failed("formula_parse_error", f"calculate_output: {exc}")
    except _PythonFailed as exc:
        return failed(exc.kind, exc.detail, exc.retryable)
    return Graded(reward=reward, scores=scores, errors=errors, tokens=tokens,
                  execution_time=shared + time.perf_counter() - started)


def _tokens(grader: Any, outcomes: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Prompt and completion tokens each judge model spent on this answer (OpenAI's token usage)."""
    from kubetune.graders.judge import JudgeFailed, Judgement

    used: dict[str, dict[str, int]] = {}
    for key, sub in model_graders(grader).items():
        outcome = outcomes.get(key)
        if isinstance(outcome, (Judgement, JudgeFailed)):  # an answer that was no grade cost tokens too
            count = used.setdefault(sub.model, {"prompt_tokens": 0, "completion_tokens": 0})
            count["prompt_tokens"] += outcome.prompt_tokens
            count["completion_tokens"] += outcome.completion_tokens
    return used


class _PythonFailed(Exception):
    """A grade another process or a model could not give: `kind` is OpenAI's error name."""

    def __init__(self, kind: str, detail: str, retryable: bool = False) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retryable = kind, detail, retryable


class _RenderError(Exception):
    pass


class _MissingVariable(_RenderError, LookupError):
    pass


class _TooLong(_RenderError):
    pass


class _Budget:
    """Characters a filling-in may produce (a template of 20,000 characters naming a 1 MB answer a
    thousand times would otherwise build gigabytes)."""

    def __init__(self, chars: int = MAX_RENDERED) -> None:
        self.left = chars

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _TooLong(f"the filled-in template is longer than {MAX_RENDERED:,} characters")


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def render(template: str, namespace: dict[str, Any], budget: _Budget | None = None) -> str:
    """`{{sample.output_text}}`, `{{item.answer}}`, `{{sample.output_json.a.b}}` filled in; a
    variable that is not there raises (OpenAI's invalid_variable_error), and so does a result longer
    than the budget (MAX_RENDERED characters, shared by the messages of one judge call)."""
    budget = budget or _Budget()
    budget.spend(len(template))

    def value(match: re.Match[str]) -> str:
        node: Any = namespace
        for part in match.group(1).split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _MissingVariable(f"{{{{{match.group(1)}}}}} is not in the sample or the item")
        text = node if isinstance(node, str) else json.dumps(node)
        budget.spend(len(text))
        return text
    return _VARIABLE.sub(value, template)


def _single(grader: Any, namespace: dict[str, Any], python: Any = None) -> float:
    if grader.type in MODEL_GRADERS or cosine_graders(grader):  # asked of a model before: `python` holds it
        from kubetune.graders.judge import JudgeFailed

        if isinstance(python, _RenderError):
            raise python
        if isinstance(python, JudgeFailed):
            raise _PythonFailed(python.kind, f"{grader.name}: {python.detail}", python.retryable)
        if python is None:
            raise _PythonFailed("model_grader_server_error", f"{grader.name}: not run")
        if isinstance(grader, LabelModelGrader):
            return float(python.value in grader.passing_labels)
        return float(python.value)
    if isinstance(grader, PythonGrader):
        if python is None or python.score is None:
            raise _PythonFailed(python.kind if python else "python_grader_server_error",
                                f"{grader.name}: {python.detail if python else 'not run'}")
        return float(python.score)
    if isinstance(grader, StringCheckGrader):
        given, reference = render(grader.input, namespace), render(grader.reference, namespace)
        return float({"eq": given == reference, "ne": given != reference, "like": reference in given,
                      "ilike": reference.lower() in given.lower()}[grader.operation])
    if isinstance(grader, TextSimilarityGrader):
        given = render(grader.input, namespace)[:MAX_COMPARED]
        reference = render(grader.reference, namespace)[:MAX_COMPARED]
        return float(_METRICS[grader.evaluation_metric](given, reference))
    raise GraderError("grader.type", f"{grader.type} graders do not run here")


def _fuzzy(given: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(given, reference) / 100.0  # normalised Indel similarity


def _bleu(given: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not given.split() or not reference.split():
        return 0.0
    return sentence_bleu([reference.split()], given.split(), smoothing_function=SmoothingFunction().method1)


def _gleu(given: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return sentence_gleu([reference.split()], given.split()) if given.split() and reference.split() else 0.0


class _NoSynonyms:
    """WordNet stand-in when its data is not installed: METEOR matches exact words and stems only."""

    def synsets(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []


def _meteor(given: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    if not given.split() or not reference.split():
        return 0.0
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return meteor_score([reference.split()], given.split(), wordnet=wordnet)
    except LookupError:
        return meteor_score([reference.split()], given.split(), wordnet=_NoSynonyms())


def _rouge(kind: str) -> Callable[[str, str], float]:
    def score(given: str, reference: str) -> float:
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer([kind]).score(reference, given)[kind].fmeasure
    return score


_METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": _fuzzy, "bleu": _bleu, "gleu": _gleu, "meteor": _meteor,
    **{f"rouge_{n}": _rouge(f"rouge{n}") for n in "12345"}, "rouge_l": _rouge("rougeL"),
}

_FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log}
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b}


class _Formula:
    """`calculate_output`: + - * /, parentheses, numbers, the sub-graders' names and min/max/abs/
    floor/ceil/exp/sqrt/log. Parsed once; GraderError (at validate) for anything else."""

    def __init__(self, text: str, names: set[str]) -> None:
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError:
            raise GraderError("grader.calculate_output", f"{text!r} is not a formula") from None
        nodes = list(ast.walk(self.tree))
        if len(nodes) > MAX_FORMULA_NODES:
            raise GraderError("grader.calculate_output", f"more than {MAX_FORMULA_NODES} terms")
        for node in nodes:
            if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCTIONS:
                raise GraderError("grader.calculate_output", f"{node.id!r} is not one of the graders "
                                                             f"({', '.join(sorted(names))})")
            if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                                                    and not node.keywords):
                raise GraderError("grader.calculate_output", "only min, max, abs, floor, ceil, exp, sqrt and log "
                                                             "can be called")
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
                try:
                    float(node.value)
                except OverflowError:
                    raise GraderError("grader.calculate_output", "a number too large") from None
            allowed = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Load, ast.USub, ast.UAdd,
                       *_BINARY)
            if not isinstance(node, allowed) or (isinstance(node, ast.Constant)
                                                 and not isinstance(node.value, (int, float))):
                raise GraderError("grader.calculate_output", f"{type(node).__name__} is not allowed in a formula "
                                                             "(numbers, + - * /, parentheses and functions)")

    def value(self, scores: dict[str, float]) -> float:
        result = float(self._eval(self.tree, scores))
        if not math.isfinite(result):
            raise ArithmeticError("the formula's value is not a finite number")
        return result

    def _eval(self, node: ast.AST, scores: dict[str, float]) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.UnaryOp):
            inner = self._eval(node.operand, scores)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp):
            try:
                return _BINARY[type(node.op)](self._eval(node.left, scores), self._eval(node.right, scores))
            except ZeroDivisionError:
                raise ArithmeticError("division by zero") from None
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            args = [self._eval(a, scores) for a in node.args]
            try:
                return float(_FUNCTIONS[node.func.id](*args))
            except (ValueError, TypeError, OverflowError) as exc:
                raise ArithmeticError(f"{node.func.id}: {exc}") from None
        raise ArithmeticError(f"{type(node).__name__} in the formula")
