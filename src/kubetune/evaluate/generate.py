"""Batched greedy generation for a run's tuned model or its base, with the run's own chat
template and generation config (so both stop at the end-of-turn token the run trained)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from kubetune.hf import quiet_progress_bars
from kubetune.storage import resolve_model
from kubetune.runs.run import Run


def load_for_generation(run: Run, base: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, generation_config) for the tuned run or its base model, in fp32 eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    quiet_progress_bars()
    final = run.final_model()
    tokenizer = AutoTokenizer.from_pretrained(final.folder)
    gen = GenerationConfig.from_pretrained(final.folder)
    if base or final.adapter is not None:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(final.base, final.revision), dtype=torch.float32)
        if not base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, final.folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(final.folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer, gen


def generate(model: Any, tokenizer: Any, gen: Any, conversations: Sequence[Sequence[dict[str, str]]],
             max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # decoder-only batches: pad on the left so answers start aligned
    gen = copy.deepcopy(gen)
    gen.max_new_tokens, gen.do_sample = max_new_tokens, False
    gen.temperature = gen.top_p = gen.top_k = None
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    out: list[str] = []
    for i in range(0, len(conversations), batch_size):
        chunk = [list(c) for c in conversations[i:i + batch_size]]
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, generation_config=gen)
        for row in ids[:, enc["input_ids"].shape[1]:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def answer_locally(run: str | Path, messages: Sequence[str], base: bool = False, system: str | None = None,
                   max_new_tokens: int = 64) -> list[str]:
    """One answer per message, from the run's tuned model (or its base)."""
    model, tokenizer, gen = load_for_generation(Run.open(str(run)), base)
    convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": m}]
             for m in messages]
    return generate(model, tokenizer, gen, convs, max_new_tokens=max_new_tokens)


def compare_answers(run: str, messages: Sequence[str], which: Sequence[str], system: str | None = None,
                    max_new_tokens: int = 64) -> list[str]:
    """Lines to print: one answer per message from one model (`which` = ["tuned"] or ["base"]), or
    each message with the answers of several side by side (["base", "tuned"])."""
    answers = {w: answer_locally(run, messages, base=(w == "base"), system=system, max_new_tokens=max_new_tokens)
               for w in which}
    if len(which) == 1:
        return list(answers[which[0]])
    lines = []
    for i, msg in enumerate(messages):
        lines.append(f"> {msg}")
        lines += [f"  {w:>5}: {answers[w][i]}" for w in which]
    return lines
