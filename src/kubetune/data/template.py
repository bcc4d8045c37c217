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
        self._arguments_as_text = False

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

    def text(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
             tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The template's rendering (with the tools offered, through the template's own tool support)."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template  # torch-free

        def attempt(msgs: Sequence[dict[str, Any]]) -> str:
            rendered, _ = render_jinja_template(
                [list(msgs)], chat_template=self.template, tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )
            return rendered[0]

        try:
            if self._arguments_as_text:
                return attempt(_arguments_as_text(messages))
            try:
                return attempt(messages)
            except TypeError:
                # Templates differ on tool-call arguments: most take the object (| tojson), some
                # (DeepSeek) concatenate a JSON string. Retry once with strings, and remember.
                if not any(m.get("tool_calls") for m in messages):
                    raise
                text = attempt(_arguments_as_text(messages))
                self._arguments_as_text = True
                return text
        except (TemplateError, TypeError) as exc:
            raise _TemplateRefused(f"{type(exc).__name__}: {exc}") from None

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
    def encode_chat(self, messages: Sequence[dict[str, Any]], loss_on: str = "assistant",
                    tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE where no loss) for one conversation rendered as one sample;
        TemplateMismatch when the template does not render its history the same way at every length
        (use `encode_conversation`, which splits such a conversation per assistant turn)."""
        encoded = self.encode_conversation(messages, loss_on, split=False, tools=tools)
        return encoded[0].ids, encoded[0].labels

    def encode_conversation(self, messages: Sequence[dict[str, Any]], loss_on: str = "assistant",
                            split: bool = True, tools: Sequence[dict[str, Any]] | None = None,
                            reasoning: str = "train") -> list[TurnSample]:
        """The samples that train this conversation on exactly what inference asks for.

        For assistant turn i the context is the rendering of messages[:i] with the generation
        prompt, and the target is what the rendering through turn i adds to it, up to and including
        the end-of-turn token. A template that renders the history the same way at every length
        gives one sample with every (weighted) turn trained; one that does not (thinking templates
        that strip earlier reasoning, templates that move the system prompt) gives one sample per
        assistant turn, each trained only on its last turn, so training sees what inference sees."""
        plain = [_renderable(m) for m in messages]
        try:
            full = self.text(plain, tools=tools)
        except _TemplateRefused as exc:
            raise TemplateMismatch(f"the chat template refuses this conversation ({exc})") from None
        if loss_on == "all":
            ids = list(self.tokenizer.encode(full, add_special_tokens=False).ids)
            return [TurnSample(ids, list(ids), None)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        spans: list[Span] = []
        renderings: list[str] = []
        stable = True
        for i in turns:
            context, upto = self._turn(plain, i, tools)
            spans.append(Span(len(context), len(upto), _reasoning_hole(messages[i], upto, len(context), reasoning)))
            renderings.append(upto)
            stable = stable and full.startswith(upto)
        if stable:
            return [self._masked(full, spans, None)]
        if not split:
            raise TemplateMismatch("the template renders earlier turns differently once a later turn is added "
                                   "(not prefix-stable)")
        return [self._masked(upto, [span], i) for i, span, upto in zip(turns, spans, renderings)]

    def _turn(self, plain: Sequence[dict[str, Any]], i: int,
              tools: Sequence[dict[str, Any]] | None = None) -> tuple[str, str]:
        """(context, rendering through turn i) of assistant turn i; the context is a prefix of it."""
        try:
            context = self.text(plain[:i], add_generation_prompt=True, tools=tools)
            upto = self.text(plain[: i + 1], tools=tools)
        except _TemplateRefused as exc:
            raise TemplateMismatch(f"the template refuses the conversation up to turn {i}: {exc}") from None
        if not upto.startswith(context):
            raise TemplateMismatch(
                f"turn {i}: not prefix-stable even within the turn: the template's rendering of this assistant "
                "turn does not start with the generation prompt inference sends, so its tokens cannot be trained "
                "after the context a server would give")
        return context, upto

    def _masked(self, text: str, spans: Sequence[Span], turn: int | None) -> TurnSample:
        """Tokenise `text` once; train the tokens that start inside a span (outside its hole), up to
        and including the end-of-turn token (what a template writes after it is the next turn's)."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        labels = [IGNORE] * len(ids)
        eot = self.stop.eot_id
        span_k, closed = 0, False
        for k, (tid, (start, _)) in enumerate(zip(ids, enc.offsets)):
            while span_k < len(spans) and start >= spans[span_k].end:
                span_k, closed = span_k + 1, False
            if span_k < len(spans) and spans[span_k].start <= start and not closed:
                hole = spans[span_k].hole
                if hole is None or not hole[0] <= start < hole[1]:
                    labels[k] = tid
                closed = tid == eot
        return TurnSample(ids, labels, turn)

    def encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=True).ids)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def fingerprint(self) -> dict[str, Any]:
        """What determines tokenisation: used as part of the data cache key."""
        return {"template": self.template, "special": self.special_tokens, "vocab": self.tokenizer.get_vocab_size()}


@dataclass(frozen=True)
class Span:
    """Characters of one trained turn in a rendering; `hole`: characters in it that stay context."""

    start: int
    end: int
    hole: tuple[int, int] | None = None


def _reasoning_hole(message: dict[str, Any], upto: str, start: int, reasoning: str) -> tuple[int, int] | None:
    """data.reasoning: context — where the turn's reasoning text is in its rendering (if rendered)."""
    text = (message.get("reasoning_content") or "").strip()
    if reasoning != "context" or not text:
        return None
    at = upto.find(text, start)
    return (at, at + len(text)) if at >= 0 else None


@dataclass
class TurnSample:
    """One training sample of a conversation: ids and labels; `turn` is the assistant turn it trains
    when the conversation had to be split per turn (None: the whole conversation in one sample)."""

    ids: list[int]
    labels: list[int]
    turn: int | None


def _arguments_as_text(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call arguments as JSON text, for templates that concatenate them."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]}
        out.append(m)
    return out


def _renderable(message: dict[str, Any]) -> dict[str, Any]:
    """What the template sees: kubetune's own keys (the per-message training weight) left out."""
    return {k: v for k, v in message.items() if k != "weight"}


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
