"""Model graders (`score_model`, `label_model`): a judge model, served by the operator behind an
OpenAI-compatible endpoint (`kubetune serve`, vLLM), reads the grader's messages and answers.

A tenant names a judge only by the name the operator gave it (server.yaml `graders.models`, the
spec's `method.grpo.judges`): the URL, the model's name at the endpoint and the environment variable
holding its key are the operator's. The judge is asked for OpenAI's structured answer,
`{"result": SCORE}` or `{"result": LABEL}` (a JSON schema in `response_format`, which vLLM enforces);
an endpoint that ignores it may answer with the JSON, or with the bare score or label. Calls of a
batch run a few at a time; each has the operator's timeout and token cap.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubetune.spec.models import EndpointSpec, JudgeSpec

__all__ = ["JudgeCall", "JudgeFailed", "ask_all", "cosines"]

EMBED_BATCH = 128          # texts per embeddings request

PARALLEL = 8               # judge calls of one batch at a time
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class JudgeFailed(Exception):
    """One judgement that gave no grade: `kind` is OpenAI's error name (model_grader_server_error,
    model_grader_parse_error, model_grader_refusal_error)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class JudgeCall:
    """One question to a judge: `labels` for a label_model (the answer must be one of them), else
    `bounds` for a score_model."""
    judge: str
    messages: list[dict[str, str]]
    labels: tuple[str, ...] = ()
    bounds: tuple[float, float] = (0.0, 1.0)
    sampling: dict[str, Any] = field(default_factory=dict)   # temperature, top_p, seed, max_completions_tokens


@dataclass(frozen=True)
class Judgement:
    value: float | str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def ask_all(calls: list[JudgeCall], judges: dict[str, JudgeSpec]) -> list[Judgement | JudgeFailed]:
    """Each call's judgement (a score, or a label), or why there is none; never raises for a judge
    that fails — a grade records it as its error."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=min(PARALLEL, len(calls))) as pool:
        return list(pool.map(lambda c: _ask(c, judges), calls))


def _ask(call: JudgeCall, judges: dict[str, JudgeSpec]) -> Judgement | JudgeFailed:
    import openai

    judge = judges.get(call.judge)
    if judge is None:  # check_grader refuses this first; a spec edited by hand could still get here
        return JudgeFailed("model_grader_server_error", f"no judge model named {call.judge!r} is configured")
    key = os.environ.get(judge.api_key_env, "") if judge.api_key_env else ""
    client = openai.OpenAI(base_url=judge.base_url, api_key=key or "none", timeout=judge.timeout_s, max_retries=1)
    wanted = {"type": "string", "enum": list(call.labels)} if call.labels else {"type": "number"}
    body: dict[str, Any] = {
        "model": judge.model or call.judge, "messages": call.messages,
        "max_tokens": min(judge.max_tokens, int(call.sampling.get("max_completions_tokens") or judge.max_tokens)),
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "grade", "strict": True,
            "schema": {"type": "object", "properties": {"result": wanted}, "required": ["result"],
                       "additionalProperties": False}}}}
    for name in ("temperature", "top_p", "seed"):
        if call.sampling.get(name) is not None:
            body[name] = call.sampling[name]
    try:
        reply = client.chat.completions.create(**body)
    except openai.APIStatusError as exc:
        return JudgeFailed("model_grader_server_error", f"the judge model {call.judge} answered HTTP {exc.status_code}")
    except openai.APIError as exc:  # connection refused, timeout: no URL in what a tenant reads
        return JudgeFailed("model_grader_server_error", f"the judge model {call.judge} did not answer "
                                                        f"({type(exc).__name__})")
    finally:
        client.close()
    usage = reply.usage
    tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    message = reply.choices[0].message if reply.choices else None
    if message is not None and getattr(message, "refusal", None):
        return JudgeFailed("model_grader_refusal_error", f"the judge model {call.judge} refused: "
                                                         f"{str(message.refusal)[:200]}")
    text = (message.content or "") if message is not None else ""
    try:
        value = _parsed(text, call)
    except ValueError as exc:
        return JudgeFailed("model_grader_parse_error", f"the judge model {call.judge}: {exc}")
    return Judgement(value, *tokens)


def cosines(pairs: list[tuple[str, str]], endpoint: EndpointSpec) -> list[float] | JudgeFailed:
    """The cosine similarity of each (answer, reference) pair's embeddings, from the operator's
    embedding model (OpenAI's /v1/embeddings), or why there are none."""
    import math

    import openai

    texts = [t for pair in pairs for t in pair]
    key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
    vectors: list[list[float]] = []
    with openai.OpenAI(base_url=endpoint.base_url, api_key=key or "none", timeout=endpoint.timeout_s,
                       max_retries=1) as client:
        for start in range(0, len(texts), EMBED_BATCH):
            chunk = texts[start:start + EMBED_BATCH]
            try:
                reply = client.embeddings.create(model=endpoint.model or "default", input=chunk,
                                                 encoding_format="float")
            except openai.APIStatusError as exc:
                return JudgeFailed("model_grader_server_error", f"the embedding model answered HTTP {exc.status_code}")
            except openai.APIError as exc:
                return JudgeFailed("model_grader_server_error", f"the embedding model did not answer "
                                                                f"({type(exc).__name__})")
            got = sorted(reply.data, key=lambda d: d.index)
            if len(got) != len(chunk):
                return JudgeFailed("model_grader_server_error", f"the embedding model returned {len(got)} "
                                                                f"embeddings for {len(chunk)} texts")
            vectors += [list(d.embedding) for d in got]

    def cosine(a: list[float], b: list[float]) -> float:
        norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        return sum(x * y for x, y in zip(a, b)) / norms if norms and len(a) == len(b) else 0.0
    return [cosine(vectors[2 * i], vectors[2 * i + 1]) for i in range(len(pairs))]


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
        label = answer.strip() if isinstance(answer, str) else answer
        if label not in call.labels:
            raise ValueError(f"answered {shown}, not one of the labels {list(call.labels)}")
        return label
    if isinstance(answer, str):
        numbers = _NUMBER.fullmatch(answer.strip())
        if numbers is None:
            raise ValueError(f"answered {shown}, not a score")
        answer = float(answer)
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise ValueError(f"answered {shown}, not a score")
    low, high = call.bounds
    if not low <= float(answer) <= high:
        raise ValueError(f"scored {answer}, outside the grader's range [{low:g}, {high:g}]")
    return float(answer)
