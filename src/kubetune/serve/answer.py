"""An answer as OpenAI returns it: reasoning, content and tool calls, read from the generated text
as it streams.

Templates that write reasoning in `<think>…</think>` (Qwen3, DeepSeek-R1 style) train the model to
open its answer with it: that part is returned as `reasoning_content` (as vLLM's reasoning parsers
do), the rest as content; with tools, the content is read for tool calls (serve.tools)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.data.tool_calls import ToolCall
from kubetune.serve.tools import CallReader, ToolPlan

OPEN, CLOSE = "<think>", "</think>"


def thinks(template: str) -> bool:
    """Whether the chat template writes reasoning in <think> tags."""
    return OPEN in template and CLOSE in template


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: Delta) -> Delta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        return self


class ThinkSplitter:
    """Splits a leading <think>…</think> off a streamed answer; holds back what may still be a tag."""

    def __init__(self) -> None:
        self.buf, self.state = "", "start"  # start → thinking → answer_start → answer
        self.thought = False  # some reasoning went out

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            stripped = self.buf.lstrip()
            if stripped.startswith(OPEN):
                self.state, self.buf = "thinking", stripped[len(OPEN):]
            elif OPEN.startswith(stripped):
                return "", ""  # may still open a <think>
            else:
                self.state = "answer"
        if self.state == "thinking":
            if not self.thought:  # the blank line a template writes after <think>
                self.buf = self.buf.lstrip("\n")
            if CLOSE in self.buf:
                reasoning, rest = self.buf.split(CLOSE, 1)
                reasoning = reasoning.rstrip("\n")  # the template's newline before </think>
                self.state, self.buf = "answer_start", rest
            else:  # hold back what may still be </think>, and the newlines that may precede it
                partial = max((k for k in range(1, len(CLOSE)) if self.buf.endswith(CLOSE[:k])), default=0)
                body = self.buf[:len(self.buf) - partial].rstrip("\n")
                reasoning, self.buf = body, self.buf[len(body):]
                self.thought = self.thought or bool(reasoning)
                return reasoning, ""
        if self.state == "answer_start":  # the blank lines a template writes after </think>
            self.buf = self.buf.lstrip("\n")
            if not self.buf:
                return reasoning, ""
            self.state = "answer"
        if self.state == "answer":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        if self.state == "thinking":  # cut off while thinking (max_tokens): what came is reasoning
            out, self.buf = self.buf, ""
            return out, ""
        if self.state == "start":
            out, self.buf = self.buf, ""
            return "", out
        return "", ""


class AnswerReader:
    """Generated text in, OpenAI deltas out. `prefix`: the forced start of the answer (tool_choice),
    read like generated text but not sent again as content."""

    def __init__(self, plan: ToolPlan | None, think: bool, prefix: str = "") -> None:
        self.splitter = ThinkSplitter() if think else None
        self.calls = CallReader(plan) if plan else None
        if prefix:
            self.feed(prefix)  # read, not returned: the prefix is the prompt's, not news to the client

    @property
    def made_calls(self) -> bool:
        return bool(self.calls and self.calls.calls)

    @property
    def sent_calls(self) -> int:
        return len(self.calls.calls) if self.calls else 0

    def feed(self, text: str) -> Delta:
        reasoning, content = self.splitter.feed(text) if self.splitter else ("", text)
        return self._content(reasoning, content)

    def finish(self) -> Delta:
        out = Delta()
        if self.splitter:
            out += self._content(*self.splitter.finish())
        if self.calls:
            content, calls = self.calls.finish()
            out += Delta("", content, calls)
        return out

    def _content(self, reasoning: str, content: str) -> Delta:
        if self.calls is None or not content:
            return Delta(reasoning, content)
        text, calls = self.calls.feed(content)
        return Delta(reasoning, text, calls)


def whole_answer(plan: ToolPlan | None, think: bool, text: str, prefix: str = "") -> Delta:
    """Reasoning, content and calls of a finished answer."""
    reader = AnswerReader(plan, think, prefix)
    out = reader.feed(text)
    out += reader.finish()
    return out
