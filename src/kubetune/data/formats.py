"""Row formats → one shape: a chat (list of {role, content}) or a plain text.

alpaca and prompt/completion rows become a user turn and an assistant turn, so every chat-like
format trains through the tokenizer's chat template, and the tuned model answers the chat API the
same way it was trained. Plain text is trained on every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.errors import Problem
from kubetune.spec.models import Columns

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "alpaca", "prompt_completion", "text")


@dataclass(frozen=True)
class Sample:
    where: str
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None


def detect_format(keys: set[str], columns: Columns) -> str | None:
    """The format whose required columns are present (most specific first)."""
    if columns.messages in keys:
        return "messages"
    if columns.instruction in keys and columns.output in keys:
        return "alpaca"
    if columns.prompt in keys and columns.completion in keys:
        return "prompt_completion"
    if columns.text in keys:
        return "text"
    return None


def required_columns(fmt: str, columns: Columns) -> list[str]:
    return {
        "messages": [columns.messages],
        "alpaca": [columns.instruction, columns.output],
        "prompt_completion": [columns.prompt, columns.completion],
        "text": [columns.text],
    }[fmt]


def to_sample(data: Any, where: str, fmt: str, columns: Columns, system_prompt: str | None,
              need_assistant: bool) -> Sample | Problem:
    """Convert one row, or say exactly what is wrong with it."""
    if not isinstance(data, dict):
        return Problem(where, f"expected an object with columns, got {type(data).__name__}")
    for col in required_columns(fmt, columns):
        if col not in data or data[col] is None:
            return Problem(where, f"missing column {col!r} ({fmt} format)")
    if fmt == "messages":
        return _chat(data[columns.messages], where, columns.messages, system_prompt, need_assistant)
    if fmt == "text":
        text = data[columns.text]
        if not isinstance(text, str):
            return Problem(where, f"column {columns.text!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            return Problem(where, f"column {columns.text!r} is empty")
        return Sample(where, text=text)
    if fmt == "alpaca":
        fields = [columns.instruction, columns.output] + ([columns.input] if data.get(columns.input) else [])
    else:
        fields = [columns.prompt, columns.completion]
    for col in fields + ([columns.system] if data.get(columns.system) is not None else []):
        if not isinstance(data[col], str):
            return Problem(where, f"column {col!r} must be a string, got {type(data[col]).__name__}")
    if fmt == "alpaca":
        user = data[columns.instruction]
        if data.get(columns.input):
            user = f"{user}\n\n{data[columns.input]}"
        answer = data[columns.output]
    else:
        user, answer = data[columns.prompt], data[columns.completion]
    if not user.strip() or not answer.strip():
        empty = fields[0] if not user.strip() else fields[-1] if fmt == "prompt_completion" else columns.output
        return Problem(where, f"column {empty!r} is empty")
    system = data.get(columns.system) or system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return Sample(where, messages=tuple(messages))


def _chat(value: Any, where: str, col: str, system_prompt: str | None, need_assistant: bool) -> Sample | Problem:
    if not isinstance(value, list):
        return Problem(where, f"column {col!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        return Problem(where, "empty conversation")
    messages = []
    for i, msg in enumerate(value):
        at = f"{col}[{i}]"
        if not isinstance(msg, dict):
            return Problem(where, f"{at} must be an object with role and content, got {type(msg).__name__}")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role is None:
            return Problem(where, f"{at} has no 'role'")
        if role not in ROLES:
            return Problem(where, f"{at}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if content is None:
            return Problem(where, f"{at} ({role}) has no 'content'")
        if not isinstance(content, str):
            return Problem(where, f"{at} ({role}): content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            return Problem(where, f"{at}: empty assistant message (nothing to learn from)")
        messages.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return Problem(where, "conversation has no assistant turn (nothing to train on)")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Sample(where, messages=tuple(messages))
