"""Chat templates and loss masks that are right by construction.

The mask does not rely on `{% generation %}` markers (most templates lack them). For each
assistant turn i we render the conversation up to the turn's start (messages[:i] plus the
generation prompt) and up to its end (messages[:i+1]); the characters in between are the
assistant's. The full conversation is tokenised once with offsets, and a token is trained when it
starts inside such a span, up to and including the end-of-turn token — the token generation stops
at. Whitespace a template writes after that token is not trained.

Rendering uses transformers' own Jinja renderer (torch-free), so serving renders the same text;
tokenising uses the `tokenizers` library directly, so `validate` and `plan` never import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from kubetune.errors import UsageError

IGNORE = -100

# ChatML, as used by Qwen and many others; the fallback when a tokenizer has no template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_PROBE = [{"role": "user", "content": "Say OK."}, {"role": "assistant", "content": "OK."}]


@dataclass(frozen=True)
class StopCheck:
    """How assistant turns end, versus what generation stops at."""

    eot_id: int
    eot_token: str
    generation_eos_ids: tuple[int, ...]

    @property
    def consistent(self) -> bool:
        return self.eot_id in self.generation_eos_ids

    @property
    def fixed_eos_ids(self) -> list[int]:
        """generation_config.eos_token_id that stops at the end of an assistant turn."""
        return list(self.generation_eos_ids) if self.consistent else [self.eot_id, *self.generation_eos_ids]


class ChatFormatter:
    """Renders and tokenises samples for one tokenizer + template, with loss masks."""

    def __init__(self, model_dir: Path, choice: str = "auto") -> None:
        import tokenizers  # light: the Rust tokenizer, no torch

        self.model_dir = Path(model_dir)
        tok_file = self.model_dir / "tokenizer.json"
        if not tok_file.exists():
            raise UsageError(
                f"{self.model_dir}: no tokenizer.json (a fast tokenizer is required)",
                "convert the tokenizer once with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...))",
            )
        self.tokenizer = tokenizers.Tokenizer.from_file(str(tok_file))
        self.config: dict[str, Any] = _read_json(self.model_dir / "tokenizer_config.json")
        self.template, self.template_source = self._choose_template(choice)
        self.special_tokens = {
            name: _token_text(self.config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if self.config.get(name) is not None
        }
        self.special_ids = {tid for tid, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special}

    # -- templates ---------------------------------------------------------------------------
    def _choose_template(self, choice: str) -> tuple[str, str]:
        own = self.config.get("chat_template")
        jinja_file = self.model_dir / "chat_template.jinja"
        if not own and jinja_file.exists():
            own = jinja_file.read_text()
        if isinstance(own, list):  # named templates: use "default"
            own = next((t["template"] for t in own if t.get("name") == "default"), None)
        if choice == "auto":
            return (own, "tokenizer") if own else (CHATML, "chatml (tokenizer has no template)")
        if choice == "chatml":
            return CHATML, "chatml"
        path = Path(choice)
        if not path.is_file():
            raise UsageError(f"model.chat_template: {choice!r} is not auto, chatml or a template file that exists")
        return path.read_text(), str(path)

    def text(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template  # torch-free

        try:
            rendered, _ = render_jinja_template(
                [list(messages)], chat_template=self.template,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )
        except TemplateError as exc:
            raise _TemplateRefused(str(exc)) from None
        return rendered[0]

    # -- tokens ------------------------------------------------------------------------------
    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def pad_id(self) -> int:
        for name in ("pad_token", "eos_token", "unk_token"):
            tid = self.token_id(self.special_tokens.get(name))
            if tid is not None:
                return tid
        return 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def stop(self) -> StopCheck:
        """The token that ends an assistant turn, checked against the generation config."""
        full = self.text(_PROBE)
        start = len(self.text(_PROBE[:1], add_generation_prompt=True))
        end = full.index("OK.", start) + len("OK.")
        enc = self.tokenizer.encode(full, add_special_tokens=False)
        after = [tid for tid, (s, _) in zip(enc.ids, enc.offsets) if s >= end]
        eot = next((tid for tid in after if tid in self.special_ids), None)
        if eot is None:
            raise UsageError(
                f"chat template ({self.template_source}) ends an assistant turn without a special token "
                f"(it renders {full[end:]!r} after the answer): the tuned model would never stop",
                "use model.chat_template: chatml (if the tokenizer has <|im_end|>) or a template that ends "
                "assistant turns with the EOS token",
            )
        return StopCheck(eot, self.tokenizer.id_to_token(eot), tuple(self._generation_eos_ids()))

    def _generation_eos_ids(self) -> list[int]:
        for name in ("generation_config.json", "config.json"):
            value = _read_json(self.model_dir / name).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
        return [self.eos_id] if self.eos_id is not None else []

    # -- encoding with masks -------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, str]], loss_on: str = "assistant") -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE where no loss) for one conversation."""
        full = self.text(messages)
        enc = self.tokenizer.encode(full, add_special_tokens=False)
        ids = list(enc.ids)
        if loss_on == "all":
            return ids, list(ids)
        spans = self.assistant_spans(messages, full)
        labels = [IGNORE] * len(ids)
        span_k = 0
        eot = self.stop.eot_id
        for k, (tid, (start, _)) in enumerate(zip(ids, enc.offsets)):
            while span_k < len(spans) and start >= spans[span_k][1]:
                span_k += 1
            if span_k < len(spans) and spans[span_k][0] <= start:
                labels[k] = tid
        # Stop training at the end-of-turn token: what a template writes after it (a newline) is
        # the next turn's business, and the model must learn to emit exactly the stop token.
        in_span = False
        for k, tid in enumerate(ids):
            if labels[k] == IGNORE:
                in_span = False
                continue
            if in_span:
                labels[k] = IGNORE
            elif tid == eot:
                in_span = True
        return ids, labels

    def assistant_spans(self, messages: Sequence[dict[str, str]], full: str | None = None) -> list[tuple[int, int]]:
        """Character spans of assistant turns in the rendered conversation (prefix diffing)."""
        full = self.text(messages) if full is None else full
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            try:
                before = self.text(messages[:i], add_generation_prompt=True)
                upto = self.text(messages[: i + 1])
            except _TemplateRefused as exc:
                raise TemplateMismatch(f"the template refuses the prefix ending at turn {i}: {exc}") from None
            if not (full.startswith(upto) and upto.startswith(before)):
                raise TemplateMismatch(
                    f"the template renders earlier turns differently once turn {i} is added "
                    "(not prefix-stable), so assistant tokens cannot be located"
                )
            spans.append((len(before), len(upto)))
        return spans

    def encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=True).ids)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def fingerprint(self) -> dict[str, Any]:
        """What determines tokenisation: used as part of the data cache key."""
        return {"template": self.template, "special": self.special_tokens, "vocab": self.tokenizer.get_vocab_size()}


class TemplateMismatch(ValueError):
    """The template cannot be diffed prefix by prefix for this conversation."""


class _TemplateRefused(ValueError):
    """The template raised (e.g. raise_exception on role order)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
