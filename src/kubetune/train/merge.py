"""`kubetune merge RUN`: fold the LoRA adapter into the base weights → final/merged, and prove it.

The merged model must compute what adapter-on-base computes: logits on a few prompts are compared
in fp32, and the merge is refused (nothing written) when they differ by more than the tolerance of
the logits' own scale. The merged weights are saved in the base's dtype.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.artifacts.events import EventLog, MergeEvent
from kubetune.data.export import readable
from kubetune.errors import TrainingError, UsageError
from kubetune.hf import PARITY_PROBES, merge_with_parity, quiet_progress_bars
from kubetune.storage import resolve_model
from kubetune.storage.runs import Run



@dataclass(frozen=True)
class MergeResult:
    path: Path
    max_diff: float


def merge_run(run: str, tolerance: float = 1e-4) -> MergeResult:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_progress_bars()
    opened = Run.open(run)
    layout, spec = opened.layout, opened.spec
    assert spec is not None
    if spec.method.type == "full":
        raise UsageError(f"{run} is a full fine-tune: {layout.merged} already holds the whole model")
    if not (layout.adapter / "adapter_config.json").exists():
        raise UsageError(f"{run} has no adapter yet ({layout.adapter})", "run `kubetune train` first")
    base_dir = resolve_model(spec.model.base, spec.model.revision)
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter)
    # fp32 for the check: the tolerance is meaningful only without bf16 rounding noise.
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, layout.adapter)
    model.eval()
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PARITY_PROBES]
    merged, parity = merge_with_parity(model, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts])
    if not parity.within(tolerance):
        raise TrainingError(f"merged model differs from adapter-on-base ({parity.describe()}; more than "
                            f"{tolerance:g}); nothing was written", "report this with the run's manifest.json")
    saved_dtype = base_dtype(base_dir)
    if saved_dtype is not None:
        merged = merged.to(saved_dtype)  # checked in fp32, stored as the base is (a bf16 7B: 14 GB, not 28)
    tmp = layout.merged.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # carries the training chat template
    shutil.copy(layout.adapter / "generation_config.json", tmp / "generation_config.json")
    readable(tmp)
    shutil.rmtree(layout.merged, ignore_errors=True)
    tmp.rename(layout.merged)  # a reader never sees a half-written merged model
    EventLog(layout.events).emit(MergeEvent(path=str(layout.merged), max_logit_diff=parity.max_diff))
    opened.publish(layout.merged)
    return MergeResult(opened.where(layout.merged), parity.max_diff)


def base_dtype(base_dir: Path) -> Any:
    """The dtype the base model's weights are stored in (config.json's dtype / torch_dtype), or None."""
    import json

    import torch

    config = json.loads((Path(base_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None
