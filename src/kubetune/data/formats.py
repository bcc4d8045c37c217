"""Row formats → one shape: a chat (list of {role, content, ...}) or a plain text.

Chats come as OpenAI messages (the fine-tuning file exactly: tools, assistant tool_calls with null
content, tool results, per-message weight 0/1, reasoning_content) or ShareGPT conversations
(from/value; human, gpt, system, tool, function_call, observation).

alpaca and prompt/completion rows become a user turn and an assistant turn, so every chat-like
format trains through the tokenizer's chat template, and the tuned model answers the chat API the
same way it was trained. Plain text is trained on every token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune.errors import Problem
from kubetune.spec.models import Columns

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
# ShareGPT speakers → chat roles (function_call: an assistant turn that calls a tool)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function": "tool", "function_call": "assistant"}
PREFERENCE_KEYS = {"input", "preferred_output", "non_preferred_output"}  # OpenAI's DPO file


@dataclass(frozen=True)
class Sample:
    where: str
    messages: tuple[dict[str, Any], ...] | None = None
    text: str | None = None
    tools: tuple[dict[str, Any], ...] | None = None  # offered to the model in this conversation


def detect_format(keys: set[str], columns: Columns) -> str | None:
    """The format whose required columns are present (most specific first)."""
    if columns.messages in keys:
        return "messages"
    if columns.conversations in keys:
        return "sharegpt"
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
        "sharegpt": [columns.conversations],
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
    if fmt in ("messages", "sharegpt"):
        tools = data.get(columns.tools)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            return Problem(where, f"column {columns.tools!r} must be a list of tool (function) objects")
        col = columns.messages if fmt == "messages" else columns.conversations
        return _chat(data[col], where, col, system_prompt, need_assistant, sharegpt=fmt == "sharegpt",
                     tools=tuple(tools) if tools else None)
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


def _chat(value: Any, where: str, col: str, system_prompt: str | None, need_assistant: bool,
          sharegpt: bool = False, tools: tuple[dict[str, Any], ...] | None = None) -> Sample | Problem:
    if not isinstance(value, list):
        return Problem(where, f"column {col!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        return Problem(where, "empty conversation")
    messages = []
    for i, msg in enumerate(value):
        converted = _message(msg, f"{col}[{i}]", sharegpt)
        if isinstance(converted, str):
            return Problem(where, converted)
        messages.append(converted)
    answers = [m for m in messages if m["role"] == "assistant"]
    if need_assistant and not answers:
        return Problem(where, "conversation has no assistant turn (nothing to train on)")
    if need_assistant and all(m.get("weight", 1) == 0 for m in answers):
        return Problem(where, "every assistant turn has weight 0 (nothing to train on)")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Sample(where, messages=tuple(messages), tools=tools)


def chat_message(msg: Any, at: str) -> dict[str, Any] | str:
    """One OpenAI message of a request (not a training row) in the shape chat templates take, or
    what is wrong with it: the same conversion training used, so a server renders what was trained.
    "developer" is read as the system role (as in training rows); an empty assistant turn is allowed."""
    if isinstance(msg, dict):
        msg = {k: v for k, v in msg.items() if k != "weight"}  # a training-file key, meaningless here
    return _message(msg, at, sharegpt=False, training=False)


def _message(msg: Any, at: str, sharegpt: bool, training: bool = True) -> dict[str, Any] | str:
    """One message in the shape chat templates take, or what is wrong with it."""
    if not isinstance(msg, dict):
        return f"{at} must be an object with role and content, got {type(msg).__name__}"
    speaker = msg.get("from") if sharegpt or ("from" in msg and "role" not in msg) else msg.get("role")
    if speaker is None:
        return f"{at} has no {'from' if sharegpt else 'role'!r}"
    # "developer" is OpenAI's newer name for the system role (its reinforcement fine-tuning data uses it)
    role = SHAREGPT_ROLES.get(speaker) if sharegpt or "from" in msg else "system" if speaker == "developer" else speaker
    if role not in ROLES:
        known = SHAREGPT_ROLES if sharegpt or "from" in msg else (*ROLES, "developer")
        return f"{at}: unknown role {speaker!r}; expected one of {', '.join(known)}"
    raw = msg.get("value") if "from" in msg and "role" not in msg else msg.get("content")
    out: dict[str, Any] = {"role": role}
    if speaker == "function_call":  # ShareGPT: the call as JSON text
        try:
            call = json.loads(raw) if isinstance(raw, str) else raw
            out["tool_calls"] = [_tool_call(call, 0)]
        except (ValueError, TypeError, KeyError):
            return f"{at} (function_call): value must be JSON with name and arguments"
        out["content"] = None
        return out
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant" or not isinstance(tool_calls, list) or not tool_calls:
            return f"{at}: tool_calls must be a non-empty list on an assistant message"
        try:
            out["tool_calls"] = [_tool_call(c, k) for k, c in enumerate(tool_calls)]
        except (ValueError, TypeError, KeyError) as exc:
            return f"{at}: tool_calls: {exc}"
    if raw is None and tool_calls is None:
        return f"{at} ({role}) has no {'value' if 'from' in msg else 'content'!r}"
    content = _text(raw) if raw is not None else None
    if isinstance(content, Problem):
        return f"{at} ({role}): {content.message}"
    if training and role == "assistant" and tool_calls is None and not (content or "").strip() \
            and not msg.get("reasoning_content"):
        return f"{at}: empty assistant message (nothing to learn from)"
    out["content"] = content
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if msg.get(key) is not None:
                out[key] = str(msg[key])
    if role == "assistant":
        if isinstance(msg.get("reasoning_content"), str):
            out["reasoning_content"] = msg["reasoning_content"]
        weight = msg.get("weight", 1)
        if weight not in (0, 1):
            return f"{at}: weight must be 0 or 1 (OpenAI's fine-tuning format), got {weight!r}"
        if weight == 0:
            out["weight"] = 0
    return out


def _text(content: Any) -> str | Problem:
    """A string, or OpenAI content parts joined; image or audio parts are an error (a text-only run)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "image", "input_image", "input_audio", "audio", "video"):
                return Problem("", f"a {kind!r} part is not text: this is a text-only run (drop the part or the row)")
            else:
                return Problem("", f"content part {part!r} is not {{'type': 'text', 'text': ...}}")
        return "".join(texts)
    return Problem("", f"content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, k: int) -> dict[str, Any]:
    """OpenAI's {id, type: function, function: {name, arguments}}, arguments kept as the object the
    templates expect (OpenAI files carry them as a JSON string)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"call {k} has no function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise ValueError(f"call {k}: arguments must be a JSON object")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = str(call["id"])
    return out
