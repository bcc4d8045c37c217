"""Reading a generated answer back as OpenAI returns it: <think> reasoning, content, tool calls —
the same whether the text arrives whole or a few characters at a time (as a stream does)."""

from __future__ import annotations

import json

import pytest

from kubetune.data.tool_calls import ToolCallFormat, tool_call_format
from kubetune.serve.answer import AnswerReader, Delta, whole_answer
from kubetune.serve.tools import ToolPlan

HERMES = ToolPlan(ToolCallFormat("hermes"))


def streamed(plan: ToolPlan | None, think: bool, text: str, step: int = 1) -> Delta:
    reader, out = AnswerReader(plan, think), Delta()
    for k in range(0, len(text), step):
        out += reader.feed(text[k:k + step])
    out += reader.finish()
    return out


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_reasoning_is_split_off_the_answer(step: int) -> None:
    got = streamed(None, True, "<think>\nThree threes are nine.\n</think>\n\n9", step)
    assert (got.reasoning, got.content) == ("Three threes are nine.", "9")
    plain = streamed(None, True, "No thinking here.", step)
    assert (plain.reasoning, plain.content) == ("", "No thinking here.")
    cut = streamed(None, True, "<think>\nStill going", step)  # max_tokens hit while thinking
    assert (cut.reasoning, cut.content) == ("Still going", "")


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_calls_after_content_are_read_and_content_is_not_held_back_for_good(step: int) -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    got = streamed(HERMES, False, text, step)
    assert got.content.strip() == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c.id.startswith("call_") for c in got.calls) and len({c.id for c in got.calls}) == 2
    one = streamed(ToolPlan(ToolCallFormat("hermes"), parallel=False), False, text, step)
    assert [c.name for c in one.calls] == ["get_weather"]  # parallel_tool_calls: false


def test_streamed_content_goes_out_before_the_answer_ends() -> None:
    reader = AnswerReader(HERMES, False)
    assert reader.feed("Hello there").content == "Hello there"
    assert reader.feed(" <tool").content == " "  # "<tool" may become <tool_call>: held back
    assert reader.feed("s are fun").content == "<tools are fun"


def test_a_malformed_call_is_returned_as_content_not_lost() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    got = whole_answer(HERMES, False, text)
    assert got.calls == [] and got.content == text


@pytest.mark.parametrize("parser, text, calls", [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
     [("a", {}), ("b", {"x": 1})]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
     [("get_weather", {"city": "Paris"})]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', [("get_weather", {"city": "Paris"})]),
])
def test_each_family_format(parser: str, text: str, calls: list[tuple[str, dict]]) -> None:
    plan = ToolPlan(ToolCallFormat(parser))
    for got in (whole_answer(plan, False, text), streamed(plan, False, text, 2)):
        assert [(c.name, json.loads(c.arguments)) for c in got.calls] == calls and not got.content.strip()
    if parser == "mistral":
        assert whole_answer(plan, False, text).calls[0].id == "abcDEF123"  # the model's own id is kept


def test_an_answer_in_json_that_is_not_a_call_stays_content() -> None:
    text = '{"answer": 42}'
    got = whole_answer(ToolPlan(ToolCallFormat("llama3_json")), False, text)
    assert got.calls == [] and got.content == text


def test_the_format_is_read_from_the_template() -> None:
    assert tool_call_format("{{ '<tool_call>' }}").parser == "hermes"  # type: ignore[union-attr]
    assert tool_call_format("{{ '[TOOL_CALLS]' }}").parser == "mistral"  # type: ignore[union-attr]
    assert tool_call_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
