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
_PROBE_TOOL_NAME, _PROBE_ARG = "kubetune_probe_tool", "kubetune_probe_argument"
_PROBE_TOOL = {"type": "function", "function": {"name": _PROBE_TOOL_NAME, "description": "probe", "parameters": {
    "type": "object", "properties": {_PROBE_ARG: {"type": "integer"}}}}}
# nine alphanumerics: Mistral's templates refuse other ids
_PROBE_CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "kt0probe0", "type": "function", "function": {
    "name": _PROBE_TOOL_NAME, "arguments": {_PROBE_ARG: 1}}}]}


@dataclass(frozen=True)
class ToolSupport:
    offered: bool | None   # `tools` appear in the prompt (None: the template raises on them)
    called: bool | None    # assistant tool calls are rendered (None: the template raises on them)


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
        self._variant = 0  # how tool-call messages are given to this template (see text())

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

        variants = (_as_given, _arguments_as_text, _null_content_as_empty, _both)
        if self._variant or any(m.get("tool_calls") or m.get("content", "") is None for m in messages):
            # Templates differ on tool-call messages: most take arguments as an object (| tojson), some
            # (DeepSeek) concatenate a JSON string; some (Qwen3) cannot take OpenAI's null content beside
            # tool calls and get "" (what vLLM gives them too). Try in that order, and remember.
            order = [self._variant] + [k for k in range(len(variants)) if k != self._variant]
        else:
            order = [0]
        failure: Exception | None = None
        for k in order:
            try:
                out = attempt(variants[k](messages))
            except (TemplateError, TypeError) as exc:
                failure = failure or exc
                continue
            if k:
                self._variant = k
            return out
        assert failure is not None
        raise _TemplateRefused(f"{type(failure).__name__}: {failure}") from None

    @cached_property
    def tool_support(self) -> ToolSupport:
        """Whether the template renders `tools` and assistant tool calls at all (some ignore them)."""
        user = {"role": "user", "content": "Hi"}
        offered: bool | None
        called: bool | None
        try:
            offered = _PROBE_TOOL_NAME in self.text([user], add_generation_prompt=True, tools=[_PROBE_TOOL])
        except _TemplateRefused:
            offered = None
        try:
            called = _PROBE_TOOL_NAME in self.text([user, _PROBE_CALL], tools=[_PROBE_TOOL])
        except _TemplateRefused:
            called = None
        return ToolSupport(offered, called)

    def check_tools(self, tools: Sequence[dict[str, Any]] | None, calls: bool) -> None:
        """TemplateMismatch when the conversation has tools or tool calls the template would silently drop."""
        if not tools and not calls:
            return
        support = self.tool_support
        if tools and support.offered is False:
            raise TemplateMismatch(
                f"the chat template ({self.template_source}) does not render `tools` (it has no tool support): the "
                "model would learn to call tools it is never shown; use model.chat_template: a template file with "
                "tool support (for example the family's own tool-use template)")
        if calls and support.called is False:
            raise TemplateMismatch(
                f"the chat template ({self.template_source}) does not render assistant `tool_calls`: those turns "
                "would be trained as empty answers; use model.chat_template: a template file with tool support")

    def tool_call_prefix(self, name: str | None) -> str | None:
        """The start of an answer that calls a tool (the function `name`, or any when None), as this
        template writes it: appended to a prompt, it makes generation call a tool (tool_choice). It ends
        on a token boundary of the template's rendering, so the prompt's last tokens are the ones
        training had there (a prefix ending in a space would be a token training never saw)."""
        probe = name or _PROBE_TOOL_NAME
        tool = {**_PROBE_TOOL, "function": {**_PROBE_TOOL["function"], "name": probe}}
        call = {**_PROBE_CALL, "tool_calls": [{**_PROBE_CALL["tool_calls"][0], "function": {
            "name": probe, "arguments": {_PROBE_ARG: 1}}}]}
        user = {"role": "user", "content": "Hi"}
        try:
            context = self.text([user], add_generation_prompt=True, tools=[tool])
            upto = self.text([user, call], tools=[tool])
        except _TemplateRefused:
            return None
        if not upto.startswith(context) or probe not in upto[len(context):]:
            return None
        at_name = upto.index(probe, len(context))
        if name is None:
            cut = at_name
        else:
            at_arg = upto.find(f'"{_PROBE_ARG}"', at_name)
            cut = upto.rfind("{", at_name, at_arg) if at_arg >= 0 else -1
            if cut < 0:
                return None
        offsets = self.tokenizer.encode(upto, add_special_tokens=False).offsets
        boundary = max((start for start, _ in offsets if len(context) <= start <= cut), default=len(context))
        return upto[len(context):boundary]

    def encode_prompt(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                      add_generation_prompt: bool = True, prefix: str = "") -> list[int]:
        """Token ids a server sends the model: the conversation with the generation prompt, rendered and
        tokenised exactly as training rendered its contexts (plus `prefix`, the forced start of the answer)."""
        try:
            text = self.text(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        except _TemplateRefused as exc:
            raise TemplateMismatch(f"the chat template refuses this conversation ({exc})") from None
        return list(self.tokenizer.encode(text + prefix, add_special_tokens=False).ids)

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
        self.check_tools(tools, any(m.get("tool_calls") for m in messages))
        try:
            full = self.text(plain, tools=tools)
        except _TemplateRefused as exc:
            raise TemplateMismatch(f"the chat template refuses this conversation ({exc})") from None
        if loss_on == "all":
            ids = list(self.tokenizer.encode(full, add_special_tokens=False).ids)
            return [TurnSample(ids, list(ids), None)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        spans: list[Span] = []
        texts: list[str] = []
        stable = True
        for i in turns:
            context, target, direct = self._turn(plain, i, tools)
            text = context + target
            spans.append(Span(len(context), len(text), _reasoning_hole(messages[i], text, len(context), reasoning)))
            texts.append(text)
            stable = stable and direct and full.startswith(text)
        if stable:
            return [self._masked(full, spans, None)]
        if not split:
            raise TemplateMismatch("the template renders earlier turns differently once a later turn is added "
                                   "(not prefix-stable)")
        return [self._masked(text, [span], i) for i, span, text in zip(turns, spans, texts)]

    def _turn(self, plain: Sequence[dict[str, Any]], i: int,
              tools: Sequence[dict[str, Any]] | None = None) -> tuple[str, str, bool]:
        """(context, target, direct) of assistant turn i: the context is what inference sends (messages[:i]
        with the generation prompt), the target what the rendering through turn i adds after it.

        `direct`: that rendering starts with the context. A template that renders the last user turn
        differently (Mistral writes the system prompt and the tools only into the last user message)
        does not: then the target is what follows, in the rendering through turn i, the longest tail of
        the context it contains (that tail must hold the context's last message)."""
        try:
            context = self.text(plain[:i], add_generation_prompt=True, tools=tools)
            upto = self.text(plain[: i + 1], tools=tools)
        except _TemplateRefused as exc:
            raise TemplateMismatch(f"the template refuses the conversation up to turn {i}: {exc}") from None
        if upto.startswith(context):
            return context, upto[len(context):], True
        target = _after_common_tail(context, upto)
        last = _content_text(plain[i - 1]) if i else ""
        answer = _content_text(plain[i])
        if target is None or (last and last not in context[len(context) - target[1]:]) or answer not in target[0]:
            raise TemplateMismatch(
                f"turn {i}: the template's rendering of this assistant turn does not continue the context a server "
                "would send (the generation prompt after the conversation before it), so its tokens cannot be "
                "trained after that context")
        return context, target[0], False

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


def _after_common_tail(context: str, upto: str) -> tuple[str, int] | None:
    """(what follows in `upto` the longest tail of `context` that `upto` contains, that tail's length).
    A tail that occurs implies every shorter one does, so the length is found by bisection."""
    low, high = 0, len(context)  # context[-low:] occurs (trivially for 0); find the largest
    while low < high:
        mid = (low + high + 1) // 2
        if context[len(context) - mid:] in upto:
            low = mid
        else:
            high = mid - 1
    if low == 0:
        return None
    at = upto.rfind(context[len(context) - low:]) + low
    return (upto[at:], low) if at < len(upto) else None


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content.strip() if isinstance(content, str) else ""


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


def _as_given(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(messages)


def _null_content_as_empty(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "content": ""} if m.get("content", "") is None else m for m in messages]


def _both(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return _null_content_as_empty(_arguments_as_text(messages))


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
