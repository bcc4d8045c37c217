"""`kubetune merge RUN`: fold the LoRA adapter into the base weights → final/merged, and prove it.

The merged model must compute what adapter-on-base computes: logits on a few prompts are
compared in fp32 and the merge is refused (nothing written) above the tolerance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

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
    merged, max_diff = merge_with_parity(model, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts])
    if max_diff > tolerance:
        raise TrainingError(f"merged model differs from adapter-on-base by {max_diff:.2e} (> {tolerance:g}); "
                            "nothing was written", "report this with the run's manifest.json")
    tmp = layout.merged.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # carries the training chat template
    shutil.copy(layout.adapter / "generation_config.json", tmp / "generation_config.json")
    readable(tmp)
    shutil.rmtree(layout.merged, ignore_errors=True)
    tmp.rename(layout.merged)  # a reader never sees a half-written merged model
    EventLog(layout.events).emit(MergeEvent(path=str(layout.merged), max_logit_diff=max_diff))
    opened.publish(layout.merged)
    return MergeResult(opened.where(layout.merged), max_diff)
