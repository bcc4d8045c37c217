"""Reward functions for GRPO (method.grpo.rewards): the built-ins, OpenAI graders, and the user's own by
import path, in TRL's reward signature — (prompts, completions, **columns) → one float per completion.
A completion is text, or (conversational prompts) a list holding the assistant message; either is read
as text."""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, Callable

from kubetune.errors import Problem, SpecError, TransientError, UsageError
from kubetune.spec.models import EndpointSpec, JudgeSpec, RewardSpec, SandboxSpec

Reward = Callable[..., list[float]]


def answer_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "").strip()
    return str(completion).strip()


def _normal(value: Any) -> str:
    return " ".join(str(value).split()).lower()


def exact_match(column: str, pattern: str | None) -> Reward:
    """1 when the answer (or the first group of `pattern`'s first match in it) equals the row's `column`."""
    compiled = re.compile(pattern) if pattern else None

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        truths = columns.get(column)
        if truths is None:
            raise KeyError(column)
        out = []
        for completion, truth in zip(completions, truths):
            text = answer_text(completion)
            if compiled is not None:
                found = compiled.search(text)
                text = (found.group(1) if found and found.groups() else found.group(0)) if found else None
            out.append(1.0 if text is not None and _normal(text) == _normal(truth) else 0.0)
        return out

    reward.__name__ = f"exact_match_{column}"
    return reward


def regex(pattern: str) -> Reward:
    """1 when the whole answer matches `pattern` (a format check), else 0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [1.0 if compiled.fullmatch(answer_text(c)) else 0.0 for c in completions]

    reward.__name__ = "regex"
    return reward


def length(max_chars: int) -> Reward:
    """0 up to max_chars, then -(excess / max_chars), at most -1."""

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [-min(1.0, max(0, len(answer_text(c)) - max_chars) / max_chars) for c in completions]

    reward.__name__ = "length"
    return reward


# TRL's own keyword arguments to a reward function, beside the data columns
_TRL_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})
_PYTHON_FAILED = ("python_grader_runtime_error", "python_grader_server_error", "unresponsive_reward_error")
_MODEL_FAILED = ("model_grader_server_error", "model_grader_parse_error", "model_grader_refusal_error")
_FAILED = _PYTHON_FAILED + _MODEL_FAILED


class GraderReward:
    """An OpenAI grader as a reward: each answer graded against its row's other columns (`item`).
    Sub-grader scores and error rates are logged through TRL's log_metric (`grader/NAME/mean`,
    `grader/error_mean`; with python graders `grader/python_error_mean`, `grader/unresponsive_mean`). A batch in which every answer's grading failed — the grader's code raises,
    hangs or dies whatever the answer — ends the run (exit 2): it would train on no signal."""

    def __init__(self, grader: Any, where: str, sandbox: SandboxSpec, judges: dict[str, JudgeSpec] | None = None,
                 embeddings: EndpointSpec | None = None) -> None:
        from kubetune.graders.judge import Endpoints
        from kubetune.graders.sandbox import SandboxLimits

        self.grader, self.where = grader, where
        self.endpoints = Endpoints(judges or {}, embeddings, retries=1)
        self.sandbox = SandboxLimits(seconds=sandbox.seconds, memory_mb=sandbox.memory_mb)
        self.__name__ = "grader_" + (re.sub(r"[^\w.-]", "_", grader.name)[:48] or "grader")

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        from kubetune.graders import grade_many, model_graders, python_graders

        log = columns.get("log_metric")
        data = {k: v for k, v in columns.items() if k not in _TRL_KWARGS and isinstance(v, list)}
        items = [{k: v[j] for k, v in data.items()} for j in range(len(completions))]
        graded = grade_many(self.grader, [(answer_text(c), item) for c, item in zip(completions, items)],
                            self.sandbox, self.endpoints)
        failed = [g for g in graded if any(g.errors.get(k) for k in _FAILED)]
        if graded and all(g.retryable for g in graded):
            # the judge (or embedding model) is down, not the grader wrong: a retry continues from the last checkpoint
            raise TransientError(f"{self.where}: the judge or embedding model was down or busy for a whole batch "
                                 f"({len(graded)}): {graded[0].details}")
        if graded and len(failed) == len(graded):
            hint = ("fix the grader: python graders run with no files, network, subprocesses or threads, within "
                    "method.grpo.sandbox's limits") if python_graders(self.grader) else \
                ("fix the grader's messages: the judge must answer a score in the grader's range, or one of its labels")
            raise UsageError(f"{self.where}: the grader failed on every answer of a batch ({len(graded)}): "
                             f"{failed[0].details}", hint)
        if callable(log) and graded:
            for name in graded[0].scores if self.grader.type == "multi" else ():
                values = [g.scores[name] for g in graded if name in g.scores]
                if values:
                    log(f"grader/{name}/mean", sum(values) / len(values))
            log("grader/error_mean", sum(any(g.errors.values()) for g in graded) / len(graded))
            if model_graders(self.grader):
                log("grader/model_error_mean", _rate(graded, _MODEL_FAILED))
            if python_graders(self.grader):
                log("grader/python_error_mean", _rate(graded, _PYTHON_FAILED))
                log("grader/unresponsive_mean",
                    sum(bool(g.errors.get("unresponsive_reward_error")) for g in graded) / len(graded))
        return [g.reward for g in graded]


def _rate(graded: list[Any], kinds: tuple[str, ...]) -> float:
    return sum(any(g.errors.get(k) for k in kinds) for g in graded) / len(graded)


def grader_columns(grader: Any) -> set[str]:
    """The row columns a grader's templates read ({{item.COLUMN...}})."""
    text = json.dumps(grader.model_dump())
    return set(re.findall(r"\{\{\s*item\.([\w-]+)", text))


def load_rewards(specs: list[RewardSpec], sandbox: SandboxSpec | None = None, judges: dict[str, JudgeSpec] | None = None,
                 embeddings: EndpointSpec | None = None) -> tuple[list[Reward], list[float]]:
    """The reward callables and their weights; an import path that does not resolve, or a grader
    that does not parse or load, is a spec error."""
    funcs: list[Reward] = []
    problems: list[Problem] = []
    for i, r in enumerate(specs):
        if r.function == "grader":
            where = f"method.grpo.rewards.{i}.grader"
            grader, problem = _checked_grader(r.grader, where, sandbox or SandboxSpec(), judges or {}, embeddings)
            if problem is not None:
                problems.append(problem)
            else:
                funcs.append(GraderReward(grader, where, sandbox or SandboxSpec(), judges, embeddings))
        elif r.function == "exact_match":
            funcs.append(exact_match(str(r.column), r.pattern))
        elif r.function == "regex":
            funcs.append(regex(str(r.pattern)))
        elif r.function == "length":
            funcs.append(length(int(r.max_chars or 1)))
        else:
            module, _, name = r.function.partition(":")
            try:
                func = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                problems.append(Problem(f"method.grpo.rewards.{i}.function",
                                        f"cannot import {r.function}: {type(exc).__name__}: {exc}"))
                continue
            if not callable(func):
                problems.append(Problem(f"method.grpo.rewards.{i}.function", f"{r.function} is not callable"))
                continue
            funcs.append(func)
    if problems:
        raise SpecError(problems, hint="a grader is OpenAI's grader object; a reward function is importable from the training process (PYTHONPATH, or an "
                                       "installed package) and takes (prompts, completions, **columns)")
    return funcs, [r.weight for r in specs]


def _checked_grader(value: Any, where: str, sandbox: SandboxSpec, judges: dict[str, JudgeSpec],
                    embeddings: EndpointSpec | None = None) -> tuple[Any, Problem | None]:
    """The grader, parsed and checked; python graders loaded once in the sandbox (a syntax error, a
    missing grade function or an import that is not there is found here, not at step 1)."""
    from kubetune.graders import GraderError, check_grader, parse_grader, python_graders
    from kubetune.graders.sandbox import SandboxLimits, check_python, sandbox_problem

    try:
        grader = parse_grader(value, where)
        check_grader(grader, frozenset({"string_check", "text_similarity", "multi", "python"}), where, judges,
                     embeddings is not None)
    except GraderError as exc:
        return None, Problem(exc.param, exc.message)
    sources = python_graders(grader)
    if sources:
        problem = sandbox_problem()
        if problem:
            return None, Problem(where, f"python graders cannot run on this machine: {problem}")
        limits = SandboxLimits(seconds=sandbox.seconds, memory_mb=sandbox.memory_mb)
        for key, sub in sources.items():
            failed = check_python(sub.source, limits)
            if failed:
                field = f"{where}.source" if grader.type == "python" else f"{where}.graders.{key}.source"
                return None, Problem(field, f"the grader does not load: {failed}")
    return grader, None
