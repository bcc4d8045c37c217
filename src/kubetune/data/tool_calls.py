"""Tool calls in a model's answer, in the format its chat template trains: found, parsed back into
OpenAI's `tool_calls`, and named as vLLM's `--tool-call-parser`.

The format is read from the template itself (the markers it writes around a call), so a run is
served with the parser that matches what it was trained on:

- hermes (Qwen2.5, Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated
- llama3_json (Llama 3.1-3.3): the whole answer is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`; several separated by `;`)
- mistral (Mistral, Mixtral, Nemo): `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]`
- deepseek_v3 (DeepSeek V3, R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>...`
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3_json", "mistral", "deepseek_v3")
_DS_CALLS, _DS_CALL, _DS_SEP, _DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
_DS_RE = re.compile(re.escape(_DS_CALL) + r"(\w+)" + re.escape(_DS_SEP) + r"(.*?)\n```json\n(.*?)\n```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str                 # JSON text, as OpenAI's API carries it
    id: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Parsed:
    content: str                   # text before the calls (the whole answer when there are none)
    calls: tuple[ToolCall, ...]
    failed: bool = False           # a call section that is not valid calls: left in content


@dataclass(frozen=True)
class ToolCallFormat:
    parser: str                    # vLLM's --tool-call-parser of this format

    @property
    def markers(self) -> tuple[str, ...]:
        """Text that opens the call section of an answer."""
        return {"hermes": ("<tool_call>",), "llama3_json": ("<|python_tag|>", "{"), "mistral": ("[TOOL_CALLS]",),
                "deepseek_v3": (_DS_CALLS, _DS_CALL)}[self.parser]

    def section_start(self, text: str) -> int | None:
        """Where the call section starts in `text`, if it has started (llama3_json: only at the start)."""
        if self.parser == "llama3_json":
            stripped = text.lstrip()
            return len(text) - len(stripped) if stripped.startswith(self.markers) else None
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def may_start(self, text: str) -> int:
        """How many characters at the end of `text` could still become a marker (held back from a stream)."""
        if self.parser == "llama3_json":  # a call is the whole answer: hold back while it may open one
            stripped = text.lstrip()
            return len(text) if not stripped or any(m.startswith(stripped) for m in self.markers) else 0
        return max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)

    def parse(self, text: str, id_style: str = "openai") -> Parsed:
        start = self.section_start(text)
        if start is None:
            return Parsed(text, ())
        content, section = text[:start].rstrip(), text[start:]
        try:
            raw = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral,
                   "deepseek_v3": _deepseek}[self.parser](section)
            calls = tuple(ToolCall(name, _arguments(args), given or new_call_id(id_style)) for name, args, given in raw)
        except (ValueError, TypeError, KeyError, AttributeError):
            return Parsed(text, (), failed=True)
        if not calls:
            return Parsed(text, (), failed=True)
        return Parsed(content, calls)


def tool_call_format(template: str) -> ToolCallFormat | None:
    """The format the template writes tool calls in (by the markers it renders), or None."""
    if "<tool_call>" in template:
        return ToolCallFormat("hermes")
    if "[TOOL_CALLS]" in template:
        return ToolCallFormat("mistral")
    if _DS_CALLS in template:
        return ToolCallFormat("deepseek_v3")
    if '"parameters": ' in template and ("ipython" in template or "python_tag" in template):
        return ToolCallFormat("llama3_json")
    return None


def format_for(template: str | None, choice: str = "auto") -> ToolCallFormat | None:
    """serve.tool_parser applied: none → None, a parser name → that format, auto → the template's."""
    if choice == "none":
        return None
    if choice != "auto":
        if choice not in PARSERS:
            raise ValueError(f"unknown tool-call format {choice!r}; one of {', '.join(PARSERS)}")
        return ToolCallFormat(choice)
    return tool_call_format(template or "")


def new_call_id(style: str = "openai") -> str:
    """An id for a parsed call: OpenAI's shape, or Mistral's nine alphanumerics (its template checks)."""
    if style == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


def _arguments(args: Any) -> str:
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    return json.dumps(args, ensure_ascii=False)


def _objects(text: str, separators: str = "") -> list[Any]:
    """The JSON values one after another in `text` (whitespace and `separators` between them)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at >= len(text):
            return out
        value, at = decoder.raw_decode(text, at)
        out.append(value)


def _hermes(section: str) -> list[tuple[str, Any, str | None]]:
    out = []
    for block in section.split("<tool_call>")[1:]:
        body = block.split("</tool_call>")[0]
        (call,) = _objects(body)
        out.append((call["name"], call.get("arguments", {}), None))
    return out


def _llama3_json(section: str) -> list[tuple[str, Any, str | None]]:
    body = section.strip().removeprefix("<|python_tag|>")
    return [(c["name"], c.get("parameters", c.get("arguments", {})), None) for c in _objects(body, ";")]


def _mistral(section: str) -> list[tuple[str, Any, str | None]]:
    out = []
    for value in _objects(section.split("[TOOL_CALLS]", 1)[1]):
        for call in value if isinstance(value, list) else [value]:
            given = call.get("id")
            out.append((call["name"], call.get("arguments", {}), str(given) if given else None))
    return out


def _deepseek(section: str) -> list[tuple[str, Any, str | None]]:
    return [(name.strip(), args, None) for _, name, args in _DS_RE.findall(section)]
