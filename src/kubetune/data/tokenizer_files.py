"""What travels with every adapter and merged model: the tokenizer, the exact chat template used
in training, and a generation config that stops at the template's end-of-turn token."""

from __future__ import annotations

from pathlib import Path

from kubetune.data.template import StopCheck


def save_tokenizer_and_config(model_dir: Path, template: str, stop: StopCheck | None, pad_id: int,
                              target: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template
    tok.save_pretrained(target)
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig()
    if stop is not None:
        gen.eos_token_id = stop.fixed_eos_ids
    if gen.pad_token_id is None:
        gen.pad_token_id = pad_id
    gen.save_pretrained(target)
    readable(target)


def readable(folder: Path) -> None:
    """safetensors files are written 0600; a container user or another account must read them."""
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
