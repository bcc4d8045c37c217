"""Model graders (`score_model`, `label_model`) and cosine similarity: a judge or embedding model,
served by the operator behind an OpenAI-compatible endpoint (`kubetune serve`, vLLM, TEI), asked
through the official `openai` client.

A tenant names a judge only by the name the operator gave it (server.yaml `graders.models`, the
spec's `method.grpo.judges`): the URL, the model's name at the endpoint and the environment variable
holding its key are the operator's. The judge is asked for OpenAI's structured answer,
`{"result": SCORE}` or `{"result": LABEL}` (a JSON schema in `response_format`, which vLLM enforces);
an endpoint that ignores it may answer with the JSON, or with the bare score or label. All the
calls of a grading share one small pool and, on the API, one deadline; each has the operator's
timeout and token cap. Whatever the endpoint answers — an error, a body that is not JSON, a
number where text should be — is that answer's error, never an exception.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubetune.spec.models import EndpointSpec, JudgeSpec

__all__ = ["Endpoints", "JudgeCall", "JudgeFailed", "Judgement", "ask_all", "cosines"]

PARALLEL = 8               # judge calls of one grading at a time
EMBED_BATCH = 128          # texts per embeddings request
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_RETRYABLE = {408, 409, 429}  # and 5xx: the endpoint's trouble, not the question's


@dataclass(frozen=True)
class Endpoints:
    """The model endpoints graders may use here: judges by name, the embedding model, how often a
    failed call is retried, and a deadline (seconds from the start of a grading) for all its calls."""
    judges: dict[str, JudgeSpec] = field(default_factory=dict)
    embeddings: EndpointSpec | None = None
    retries: int = 1
    deadline_s: float | None = None


class JudgeFailed(Exception):
    """One judgement that gave no grade: `kind` is OpenAI's error name (model_grader_server_error,
    model_grader_parse_error, model_grader_refusal_error); `retryable`: the endpoint was down or
    busy (a retry may pass), not refusing the question."""

    def __init__(self, kind: str, detail: str, retryable: bool = False, tokens: tuple[int, int] = (0, 0)) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retryable = kind, detail, retryable
        self.prompt_tokens, self.completion_tokens = tokens  # what an answer that gave no grade still cost


@dataclass(frozen=True)
class JudgeCall:
    """One question to a judge: `labels` for a label_model (the answer must be one of them), else
    `bounds` for a score_model."""
    judge: str
    messages: list[dict[str, str]]
    labels: tuple[str, ...] = ()
    bounds: tuple[float, float] = (0.0, 1.0)
    sampling: dict[str, Any] = field(default_factory=dict)   # temperature, top_p, seed, max_completions_tokens, ...


@dataclass(frozen=True)
class Judgement:
    value: float | str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def ask_all(calls: list[JudgeCall], endpoints: Endpoints) -> list[Judgement | JudgeFailed]:
    """Each call's judgement (a score, or a label), or why there is none; never raises for a judge
    that fails — a grade records it as its error. Calls not started by the deadline are not made."""
    if not calls:
        return []
    ends = time.monotonic() + endpoints.deadline_s if endpoints.deadline_s else None

    def one(call: JudgeCall) -> Judgement | JudgeFailed:
        if ends is not None and time.monotonic() >= ends:
            return JudgeFailed("model_grader_server_error", f"the judge model {call.judge} was not asked: the "
                                                            "grading ran out of time", retryable=True)
        try:
            return _ask(call, endpoints)
        except Exception as exc:  # an answer the client could not read (a body that is not JSON, ...)
            return JudgeFailed("model_grader_server_error", f"the judge model {call.judge} answered something "
                                                            f"unreadable ({type(exc).__name__})")
    with ThreadPoolExecutor(max_workers=min(PARALLEL, len(calls))) as pool:
        return list(pool.map(one, calls))


def _client(endpoint: EndpointSpec, retries: int, deadline: float | None = None) -> Any:
    import openai

    key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
    timeout = endpoint.timeout_s if deadline is None else max(1.0, min(endpoint.timeout_s, deadline))
    return openai.OpenAI(base_url=endpoint.base_url, api_key=key or "none", timeout=timeout, max_retries=retries)


def _failed(what: str, exc: Exception) -> JudgeFailed:
    """An endpoint's error as a grade's: no URL in what a tenant reads."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return JudgeFailed("model_grader_server_error", f"{what} answered HTTP {code}",
                           retryable=code >= 500 or code in _RETRYABLE)
    retryable = isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError))
    return JudgeFailed("model_grader_server_error", f"{what} did not answer ({type(exc).__name__})", retryable)


def _ask(call: JudgeCall, endpoints: Endpoints) -> Judgement | JudgeFailed:
    import openai

    judge = endpoints.judges.get(call.judge)
    if judge is None:  # check_grader refuses this first; a spec edited by hand could still get here
        return JudgeFailed("model_grader_server_error", f"no judge model named {call.judge!r} is configured")
    wanted = {"type": "string", "enum": list(call.labels)} if call.labels else {"type": "number"}
    body: dict[str, Any] = {
        "model": judge.model or call.judge, "messages": call.messages,
        "max_tokens": min(judge.max_tokens, int(call.sampling.get("max_completions_tokens") or judge.max_tokens)),
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "grade", "strict": True,
            "schema": {"type": "object", "properties": {"result": wanted}, "required": ["result"],
                       "additionalProperties": False}}}}
    for name in ("temperature", "top_p", "seed", "reasoning_effort"):
        if call.sampling.get(name) is not None:
            body[name] = call.sampling[name]
    with _client(judge, endpoints.retries, endpoints.deadline_s) as client:
        try:
            reply = client.chat.completions.create(**body)
        except openai.APIError as exc:
            return _failed(f"the judge model {call.judge}", exc)
    usage = reply.usage
    tokens = (int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0)) if usage else (0, 0)
    message = reply.choices[0].message if reply.choices else None
    if message is not None and getattr(message, "refusal", None):
        return JudgeFailed("model_grader_refusal_error", f"the judge model {call.judge} refused: "
                                                         f"{str(message.refusal)[:200]}", tokens=tokens)
    content = message.content if message is not None else None
    text = content if isinstance(content, str) else json.dumps(content) if content is not None else ""
    try:
        value = _parsed(text, call)
    except ValueError as exc:
        return JudgeFailed("model_grader_parse_error", f"the judge model {call.judge}: {exc}", tokens=tokens)
    return Judgement(value, *tokens)


def cosines(pairs: list[tuple[str, str]], endpoints: Endpoints) -> list[float] | JudgeFailed:
    """The cosine similarity of each (answer, reference) pair's embeddings, from the operator's
    embedding model (OpenAI's /v1/embeddings), or why there are none. An empty text (which
    embedding APIs refuse) is similar to nothing: 0."""
    import openai

    endpoint = endpoints.embeddings
    if endpoint is None:
        return JudgeFailed("model_grader_server_error", "no embedding model is configured")
    texts = sorted({t for pair in pairs for t in pair if t.strip()})
    vectors: dict[str, list[float]] = {}
    with _client(endpoint, endpoints.retries, endpoints.deadline_s) as client:
        for start in range(0, len(texts), EMBED_BATCH):
            chunk = texts[start:start + EMBED_BATCH]
            try:
                reply = client.embeddings.create(model=endpoint.model or "default", input=chunk,
                                                 encoding_format="float")
                got = sorted(reply.data, key=lambda d: d.index)
                if len(got) != len(chunk):
                    raise ValueError(f"{len(got)} embeddings for {len(chunk)} texts")
                vectors.update((t, [float(x) for x in d.embedding]) for t, d in zip(chunk, got))
            except openai.APIError as exc:
                return _failed("the embedding model", exc)
            except Exception as exc:  # an answer the client could not read
                return JudgeFailed("model_grader_server_error", f"the embedding model answered something unreadable "
                                                                f"({type(exc).__name__}: {str(exc)[:80]})")

    def cosine(a: str, b: str) -> float:
        x, y = vectors.get(a), vectors.get(b)
        if x is None or y is None or len(x) != len(y):
            return 0.0
        norms = math.sqrt(sum(v * v for v in x)) * math.sqrt(sum(v * v for v in y))
        value = sum(p * q for p, q in zip(x, y)) / norms if norms else 0.0
        return value if math.isfinite(value) else 0.0
    return [cosine(a, b) for a, b in pairs]


def _parsed(text: str, call: JudgeCall) -> float | str:
    """`{"result": …}`, else the whole answer as the label or a number; ValueError says what was wrong."""
    answer: Any = text.strip()
    try:
        data = json.loads(answer)
        if isinstance(data, dict) and "result" in data:
            answer = data["result"]
        elif isinstance(data, (int, float, str)) and not isinstance(data, bool):
            answer = data
    except ValueError:
        pass
    shown = repr(text.strip()[:80])
    if call.labels:
        said = str(answer).strip() if isinstance(answer, (str, int, float)) and not isinstance(answer, bool) else None
        label = next((label for label in call.labels if label.strip() == said), None)
        if label is None:
            raise ValueError(f"answered {shown}, not one of the labels {list(call.labels)}")
        return label
    if isinstance(answer, str):
        if _NUMBER.fullmatch(answer.strip()) is None:
            raise ValueError(f"answered {shown}, not a score")
        answer = float(answer)
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not math.isfinite(float(answer)):
        raise ValueError(f"answered {shown}, not a score")
    low, high = call.bounds
    if not low <= float(answer) <= high:
        raise ValueError(f"scored {answer}, outside the grader's range [{low:g}, {high:g}]")
    return float(answer)
