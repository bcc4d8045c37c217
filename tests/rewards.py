"""A reward function given by import path (method.grpo.rewards: tests.rewards:ends_with_period), in
TRL's signature."""

from __future__ import annotations

from typing import Any


def ends_with_period(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if t.strip().endswith(".") else 0.0 for t in texts]
