"""Tool calling end to end with the real tokenizers and templates of Qwen3 (hermes calls, <think>
reasoning), Llama 3.2 (JSON calls) and Mistral Nemo ([TOOL_CALLS]): a tiny random model with the
family's tokenizer learns one tool-calling conversation, is served by `kubetune serve`, and the
official `openai` client gets the call back as `tool_calls` (whole and streamed), then the answer
after the tool's result. The server renders each context to exactly the token ids training used
(`/tokenize` against `plan --show --json`). Families whose templates have no tool support (Gemma 3,
DeepSeek-V3's, the short Llama 3.1 one) train and serve with the same parity, and answer a request
with tools with a 400 that names `tools`, not a silent prompt without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml

from tests.conftest import run_kubetune
from tests.families import tiny_model_dir
from tests.integration.test_serve import start_server, stop

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call12345", "type": "function",  # nine alphanumerics: Mistral's template checks
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
]


def train(family: str, tmp: Path, row: dict[str, Any], steps: int = 80) -> tuple[Path, Path]:
    data = tmp / "data.jsonl"
    data.write_text(json.dumps(row) + "\n")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": f"tools-{family.replace('_', '-')}", "model": {"base": str(tiny_model_dir(family))},
        "data": {"train": str(data), "eval": None, "max_length": 1024},
        "method": {"type": "full"},
        # one conversation, learned by heart: greedy decoding then reproduces it exactly
        "train": {"max_steps": steps, "total_batch_size": 2, "max_per_device_batch_size": 2,
                  "save_every_steps": steps, "logging_steps": 20, "learning_rate": 1e-2, "lr_scheduler": "constant",
                  "warmup_ratio": 0.0},
        "output": str(tmp / "run"), "resources": {"accelerator": "cpu"}, "tracking": {"report_to": []}}))
    res = run_kubetune("train", str(spec), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return spec, tmp / "run"


def training_contexts(spec: Path, messages: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Assistant turn → the token ids training put before its target (from `plan --show --json`)."""
    res = run_kubetune("plan", str(spec), "--show", "10", "--json")
    assert res.returncode == 0, res.stderr
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    contexts: dict[int, list[int]] = {}
    for sample in map(json.loads, res.stdout.splitlines()):
        segments = sample["segments"]
        trained = [k for k, s in enumerate(segments) if s["trained"]]
        split = "#turn" in sample["where"]
        for k, turn in zip(trained, [int(sample["where"].rsplit("#turn", 1)[1])] if split else turns):
            contexts[turn] = [i for s in segments[:k] for i in s["ids"]]
    assert set(contexts) == set(turns), contexts
    return contexts


def assert_served_prompts_are_training_contexts(url: str, family: str, spec: Path, messages: list[dict[str, Any]],
                                                tools: Any = None) -> None:
    for turn, ids in training_contexts(spec, messages).items():
        res = httpx.post(f"{url}/tokenize", json={"model": f"tools-{family.replace('_', '-')}",
                                                  "messages": messages[:turn], **({"tools": tools} if tools else {})})
        assert res.status_code == 200, res.text
        assert res.json()["tokens"] == ids, f"{family}: turn {turn} renders differently from training"


@pytest.mark.parametrize("family, parser", [("qwen3", "hermes"), ("llama3_2", "llama3_json"),
                                            ("mistral_nemo", "mistral")])
@pytest.mark.long
def test_a_tool_call_is_trained_served_and_parsed_back(family: str, parser: str, tmp_path: Path) -> None:
    spec, run = train(family, tmp_path, {"tools": TOOLS, "messages": MESSAGES})
    proc, url = start_server(run)
    try:
        # the server's prompt for each assistant turn is exactly the context training used
        assert_served_prompts_are_training_contexts(url, family, spec, MESSAGES, TOOLS)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        ask: dict[str, Any] = {"model": model, "messages": MESSAGES[:1], "tools": TOOLS, "temperature": 0,
                               "max_tokens": 64}
        whole = client.chat.completions.create(**ask)
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
        assert not choice.message.content  # Qwen3's empty <think> block is not content
        if family == "mistral_nemo":
            assert len(call.id) == 9 and call.id.isalnum()  # an id Mistral's template takes back

        streamed: dict[int, dict[str, str]] = {}
        reasons, content = [], ""
        for chunk in client.chat.completions.create(**ask, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
            for part in delta.tool_calls or []:
                slot = streamed.setdefault(part.index, {"name": "", "arguments": "", "id": ""})
                slot["id"] += part.id or ""
                slot["name"] += part.function.name or "" if part.function else ""
                slot["arguments"] += part.function.arguments or "" if part.function else ""
        assert list(streamed) == [0] and streamed[0]["name"] == "get_weather", streamed
        assert json.loads(streamed[0]["arguments"]) == {"city": "Paris"} and streamed[0]["id"]
        assert reasons[-1] == "tool_calls" and not content.strip()

        # the tool's result goes back in; the model answers in words
        after = client.chat.completions.create(**{**ask, "messages": MESSAGES[:3]})
        assert after.choices[0].message.content == MESSAGES[3]["content"] and not after.choices[0].message.tool_calls

        # tool_choice naming the function: the answer starts as that call (the template's own opening)
        named = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (forced,) = named.choices[0].message.tool_calls or []
        assert forced.function.name == "get_weather" and json.loads(forced.function.arguments) == {"city": "Paris"}
        assert named.choices[0].finish_reason == "stop"  # as OpenAI answers a named tool_choice
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "nope"}})
        assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
        # tool_choice none: the tools are shown, the answer stays text
        plain = client.chat.completions.create(**ask, tool_choice="none")
        assert not plain.choices[0].message.tool_calls and plain.choices[0].finish_reason in ("stop", "length")
    finally:
        stop(proc)


CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue"}, {"role": "user", "content": "Grass?"},
        {"role": "assistant", "content": "Green"}]


@pytest.mark.parametrize("family", ["gemma3", "llama3_1", "deepseek_v3"])
def test_families_without_tool_calls_train_serve_and_refuse_tools_by_name(family: str, tmp_path: Path) -> None:
    spec, run = train(family, tmp_path, {"messages": CHAT}, steps=4)
    proc, url = start_server(run)
    try:
        assert_served_prompts_are_training_contexts(url, family, spec, CHAT)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        ok = client.chat.completions.create(model=model, messages=CHAT[:4], max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason in ("stop", "length")
        # a template that ignores tools (or raises on them) is not sent a prompt without them
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=CHAT[:2], tools=TOOLS, max_tokens=4)
        body: Any = info.value.body
        assert body["param"] == "tools" and "does not render `tools`" in body["message"], body
    finally:
        stop(proc)
