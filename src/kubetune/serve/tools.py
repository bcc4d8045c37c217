"""Tool calling for /v1/chat/completions: what a request's `tools` and `tool_choice` mean for the
prompt, and the answer read back into OpenAI `tool_calls`, whole or as a stream.

`tool_choice`: auto (the default with tools) reads calls from the answer; required and a named
function also start the answer with the template's own opening of a call (of that function), so
generation continues a call; none renders the tools but leaves the answer as text (as vLLM does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.data.tool_calls import ToolCall, ToolCallFormat
from kubetune.serve.engine import ServedModel
from kubetune.serve.errors import ApiError
from kubetune.serve.protocol import ChatRequest


@dataclass(frozen=True)
class ToolPlan:
    format: ToolCallFormat
    prefix: str = ""               # the forced start of the answer ("" for auto)
    parallel: bool = True
    finish: str = "tool_calls"     # finish_reason when calls were made (OpenAI: "stop" for a named function)

    @property
    def id_style(self) -> str:
        return "mistral" if self.format.parser == "mistral" else "openai"


def plan_tools(req: ChatRequest, served: ServedModel) -> ToolPlan | None:
    """None: the answer stays text (no tools, tool_choice none, or a template without a call format)."""
    choice = req.choice
    function = req.forced_function()
    if choice == "none":
        return None
    fmt = served.tool_format
    if fmt is None:
        if choice == "auto":
            return None
        raise ApiError(400, f"tool_choice {choice!r}: the model `{served.name}` has no tool-call format kubetune "
                            "reads (its chat template writes none of hermes, llama3_json, mistral, deepseek_v3)",
                       param="tool_choice")
    if choice == "auto":
        return ToolPlan(fmt, parallel=req.parallel_tool_calls)
    prefix = served.formatter.tool_call_prefix(function)
    if prefix is None:
        raise ApiError(400, f"tool_choice {choice!r}: the chat template of `{served.name}` does not render a tool "
                            "call kubetune can start", param="tool_choice")
    return ToolPlan(fmt, prefix, req.parallel_tool_calls and function is None,
                    "stop" if function else "tool_calls")


@dataclass
class CallReader:
    """Reads an answer as it streams: content before the call section goes out as it comes (less what
    may still become a marker); each call goes out once it is complete; at the end, a section that is
    not valid calls (and made none) goes out as content, so a malformed call is seen, not lost."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.text += delta
        fmt = self.plan.format
        start = fmt.section_start(self.text)
        if start is None:
            end = len(self.text) - fmt.may_start(self.text)
            return self._content(end), []
        content = self._content(start)
        parsed = fmt.parse(self.text, self.plan.id_style)
        return content, ([] if parsed.failed else self._new(parsed.calls))

    def finish(self) -> tuple[str, list[ToolCall]]:
        parsed = self.plan.format.parse(self.text, self.plan.id_style)
        if parsed.failed or not parsed.calls:
            if self.calls:  # complete calls went out; an unfinished one after them (cut by max_tokens) is dropped
                return "", []
            return self._content(len(self.text)), []
        start = self.plan.format.section_start(self.text)
        return self._content(start if start is not None else len(self.text)), self._new(parsed.calls)

    def _content(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def _new(self, calls: tuple[ToolCall, ...]) -> list[ToolCall]:
        limit = len(calls) if self.plan.parallel else 1
        new = list(calls[len(self.calls):limit])
        self.calls.extend(new)
        return new
