"""Reward functions for GRPO (method.grpo.rewards): the built-ins and the user's own by import path,
in TRL's reward signature — (prompts, completions, **columns) → one float per completion. A completion
is text, or (conversational prompts) a list holding the assistant message; either is read as text."""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from kubetune.errors import Problem, SpecError
from kubetune.spec.models import RewardSpec

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


def load_rewards(specs: list[RewardSpec]) -> tuple[list[Reward], list[float]]:
    """The reward callables and their weights; an import path that does not resolve is a spec error."""
    funcs: list[Reward] = []
    problems: list[Problem] = []
    for i, r in enumerate(specs):
        if r.function == "exact_match":
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
        raise SpecError(problems, hint="a reward function is importable from the training process (PYTHONPATH, or an "
                                       "installed package) and takes (prompts, completions, **columns)")
    return funcs, [r.weight for r in specs]
