"""Loss masks by prefix diffing, on three template styles without {% generation %} markers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubetune.data.template import IGNORE, ChatFormatter

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-style: the system prompt is folded into the first user turn; turns end with </s>.
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns_sys = m['content'] %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "Spell cat."},
    {"role": "assistant", "content": "cat is spelled c-a-t."},
]


def _with_template(tiny_model: Path, tmp_path: Path, template: str | None) -> ChatFormatter:
    if template is None:
        return ChatFormatter(tiny_model)
    path = tmp_path / "t.jinja"
    path.write_text(template)
    return ChatFormatter(tiny_model, str(path))


def _trained_runs(fmt: ChatFormatter, ids: list[int], labels: list[int]) -> list[str]:
    runs, cur = [], []
    for tid, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(fmt.decode(cur))
            cur = []
    if cur:
        runs.append(fmt.decode(cur))
    return runs


@pytest.mark.parametrize("template,eot", [(None, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (MISTRAL, "</s>")],
                         ids=["chatml", "llama3", "mistral"])
def test_only_assistant_turns_are_trained_and_end_with_the_stop_token(tiny_model, tmp_path, template, eot) -> None:
    fmt = _with_template(tiny_model, tmp_path, template)
    ids, labels = fmt.encode_chat(CONV)
    runs = _trained_runs(fmt, ids, labels)
    sep = " " if template is MISTRAL else ""
    assert [r.strip() for r in runs] == [f"2 plus 2 is 4.{eot}", f"cat is spelled c-a-t.{eot}"]
    assert fmt.stop.eot_token == eot
    # Nothing from the system or user turns, and no template text after the stop token, is trained.
    trained_text = "".join(runs)
    assert "What is" not in trained_text and "Be brief" not in trained_text and sep + "[INST]" not in trained_text


def test_loss_on_all_trains_every_token(tiny_model) -> None:
    fmt = ChatFormatter(tiny_model)
    ids, labels = fmt.encode_chat(CONV, loss_on="all")
    assert labels == ids


def test_tokens_match_transformers_apply_chat_template(tiny_model) -> None:
    from transformers import AutoTokenizer

    fmt = ChatFormatter(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids, _ = fmt.encode_chat(CONV)
    assert ids == list(tok.apply_chat_template(CONV, tokenize=True)["input_ids"])


def test_generation_config_that_would_not_stop_is_detected_and_fixed(tiny_model) -> None:
    fmt = ChatFormatter(tiny_model)  # the tiny base stops at </s> only; ChatML ends turns with <|im_end|>
    stop = fmt.stop
    assert not stop.consistent
    assert stop.fixed_eos_ids[0] == fmt.tokenizer.token_to_id("<|im_end|>")
    assert fmt.tokenizer.token_to_id("</s>") in stop.fixed_eos_ids


def test_template_without_end_of_turn_token_is_refused(tiny_model, tmp_path) -> None:
    from kubetune.errors import UsageError

    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    fmt = _with_template(tiny_model, tmp_path, plain)
    with pytest.raises(UsageError, match="would never stop"):
        _ = fmt.stop


def test_template_that_rewrites_history_is_refused(tiny_model, tmp_path) -> None:
    from kubetune.data.template import TemplateMismatch

    # Renders the turn count at the top: adding a turn changes the prefix.
    unstable = "{{ messages|length }}\n" + (tiny_model / "chat_template.jinja").read_text()
    fmt = _with_template(tiny_model, tmp_path, unstable)
    with pytest.raises(TemplateMismatch, match="not prefix-stable"):
        fmt.encode_chat(CONV)


def test_tokenizer_without_template_falls_back_to_chatml(tiny_model, tmp_path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    (copy / "chat_template.jinja").unlink()
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    fmt = ChatFormatter(copy)
    assert fmt.template_source.startswith("chatml")
    assert fmt.stop.eot_token == "<|im_end|>"
