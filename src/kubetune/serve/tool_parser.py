"""Which vLLM `--tool-call-parser` a run is served with, decided before anything is deployed.

`serve.tool_parser` says it outright, or `auto` reads the format from the chat template training
uses (model.chat_template, else the base model's own: a local folder, or the Hugging Face cache —
rendering never downloads). Where the template cannot be read here (a Hub model not in the cache,
a model in object storage), the base model's name decides by family.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kubetune.data.tool_calls import format_for
from kubetune.spec.models import RunSpec
from kubetune.uris import has_scheme, is_hub

# model-name patterns → the parser of the family's own tool-use template
_BY_NAME = (
    (re.compile(r"qwen(2\.5|3)|qwq|hermes", re.I), "hermes"),
    (re.compile(r"llama-?3\.[123]", re.I), "llama3_json"),
    (re.compile(r"mistral|mixtral|ministral|codestral|devstral", re.I), "mistral"),
    (re.compile(r"deepseek-(v3|r1)", re.I), "deepseek_v3"),
)


def reasoning_parser(template: str | None) -> str | None:
    """vLLM's --reasoning-parser for a template that writes reasoning in <think> tags (ChatML-style
    Qwen3 and QwQ: qwen3; others: deepseek_r1), as kubetune's own server splits it off."""
    if not template or "<think>" not in template or "</think>" not in template:
        return None
    return "qwen3" if "<|im_start|>" in template else "deepseek_r1"


def resolve_reasoning_parser(spec: RunSpec) -> str | None:
    return reasoning_parser(template_text(spec))


def resolve_tool_parser(spec: RunSpec) -> str | None:
    """The parser name, or None (answers stay text: no tool flags)."""
    choice = spec.serve.tool_parser
    template = template_text(spec) if choice == "auto" else None
    if choice != "auto" or template is not None:
        fmt = format_for(template, choice)
        return fmt.parser if fmt else None
    name = spec.model.base.removeprefix("hf://")
    return next((parser for pattern, parser in _BY_NAME if pattern.search(name)), None)


def template_text(spec: RunSpec) -> str | None:
    """The chat template training uses, if it can be read without a download."""
    choice = spec.model.chat_template
    if choice == "chatml":
        return ""
    if choice != "auto":
        path = Path(choice)
        return path.read_text() if path.is_file() else None
    base = spec.model.base
    if is_hub(base):
        return _cached_hub_template(base, spec.model.revision)
    if has_scheme(base):
        return None
    return folder_template(Path(base))


def folder_template(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    own = config.get("chat_template")
    if isinstance(own, list):
        own = next((t.get("template") for t in own if t.get("name") == "default"), None)
    if own:
        return str(own)
    jinja = folder / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def _cached_hub_template(repo: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    from kubetune.uris import hub_ref

    repo, revision = hub_ref(repo, revision)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            text = folder_template(Path(found).parent)
            if text:
                return text
    return None
