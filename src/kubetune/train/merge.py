"""`kubetune merge RUN`: fold the LoRA adapter into the base weights → final/merged, and prove it.

The merge streams the base one weight at a time (train/shard_merge.py): memory is bounded by the
largest merged weight, and the merged weights keep the base's dtype, keys and shards. Every merged layer is
checked exactly against W + delta rounded to its dtype, and W + delta against PEFT's LoRA forward on
random inputs. When the whole model fits in memory twice over in fp32 (`check="auto"`), PEFT merges
the whole model in memory too: its logits on a few prompts must match adapter-on-base's within the
tolerance of their scale, and every weight written must equal PEFT's merged weight in the base's
dtype (within one unit in the last place). The merge is refused (nothing written) otherwise.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune.artifacts.events import EventLog, MergeEvent
from kubetune.data.tokenizer_files import readable
from kubetune.errors import TrainingError, UsageError
from kubetune.hf import PARITY_PROBES, Parity, merge_with_parity, quiet_progress_bars
from kubetune.storage import resolve_model
from kubetune.runs.layout import RUN_KEYS
from kubetune.runs.run import Run
from kubetune.train.shard_merge import merge_shards

Check = Literal["auto", "logits", "layers"]


@dataclass(frozen=True)
class MergeResult:
    path: Path
    max_diff: float | None     # whole-model |logit diff|; None when only the layers were checked
    layer_diff: float          # worst layer against PEFT's LoRA forward, of its outputs' scale
    largest_weight: int        # fp32 bytes of the largest merged weight: what the merge held at once


def merge_run(run: str, tolerance: float = 1e-4, check: Check = "auto") -> MergeResult:
    from transformers import AutoTokenizer

    quiet_progress_bars()
    opened = Run.open(run)
    layout, spec = opened.layout, opened.spec
    assert spec is not None
    if spec.method.type == "full":
        raise UsageError(f"{run} is a full fine-tune: {layout.merged} already holds the whole model")
    opened.materialise(RUN_KEYS.adapter)  # what a merge reads: the adapter, not the rest of the run
    if not (layout.adapter / "adapter_config.json").exists():
        raise UsageError(f"{run} has no adapter yet ({layout.adapter})", "run `kubetune train` first")
    base_dir = resolve_model(spec.model.base, spec.model.revision)
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter)
    whole = _whole_model_check(check, base_dir)
    parity, peft_merged = _logit_parity(base_dir, layout.adapter, tokenizer, tolerance) if whole else (None, None)
    tmp = layout.merged.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        streamed = merge_shards(base_dir, layout.adapter, tmp, tolerance)
        if peft_merged is not None:
            _same_weights(peft_merged, tmp)
            del peft_merged
        tokenizer.save_pretrained(tmp)  # carries the training chat template
        shutil.copy(layout.adapter / "generation_config.json", tmp / "generation_config.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused or failed merge leaves nothing behind
        raise
    readable(tmp)
    shutil.rmtree(layout.merged, ignore_errors=True)
    tmp.rename(layout.merged)  # a reader never sees a half-written merged model
    EventLog(layout.events).emit(MergeEvent(path=str(layout.merged), max_logit_diff=parity.max_diff if parity else None,
                                            layer_diff=streamed.worst, largest_weight_bytes=streamed.largest_weight))
    opened.publish(layout.merged)
    return MergeResult(opened.where(layout.merged), parity.max_diff if parity else None, streamed.worst,
                       streamed.largest_weight)


def _whole_model_check(check: Check, base_dir: Path) -> bool:
    """Whether the whole-model logits check runs: asked for, or (auto) the model fits twice in fp32."""
    if check != "auto":
        return check == "logits"
    import psutil

    return 2 * fp32_bytes(base_dir) <= available_memory(psutil.virtual_memory().available)


def available_memory(free: int, root: Path = Path("/sys/fs/cgroup")) -> int:
    """Free memory, capped by this cgroup's limit less its usage (cgroup v2): in a pod, /proc/meminfo
    is the node's, and the kubelet kills the pod at its own limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return free
    return free if limit == "max" else min(free, max(0, int(limit) - used))


def fp32_bytes(base_dir: Path) -> int:
    """The base's weights in fp32, from its safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    from kubetune.train.shard_merge import base_shards

    total = 0
    for shard, keys in base_shards(base_dir).items():
        with safe_open(str(base_dir / shard), "pt") as f:
            for key in keys:
                shape = f.get_slice(key).get_shape()
                count = 1
                for n in shape:
                    count *= n
                total += 4 * count
    return total


def _logit_parity(base_dir: Path, adapter: Path, tokenizer: Any, tolerance: float) -> tuple[Parity, Any]:
    """Adapter-on-base against PEFT's merge of it, both in fp32 (the tolerance is meaningful only
    without bf16 rounding noise): the adapter means on the whole model what its layers say."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PARITY_PROBES]
    merged, parity = merge_with_parity(model.eval(), [tokenizer(p, add_special_tokens=False)["input_ids"]
                                                      for p in prompts])
    if not parity.within(tolerance):
        raise TrainingError(f"merged model differs from adapter-on-base ({parity.describe()}; more than "
                            f"{tolerance:g}); nothing was written", "report this with the run's manifest.json")
    return parity, merged


def _same_weights(peft_merged: Any, folder: Path) -> None:
    """Every weight written equals PEFT's merge of the whole model, in the written dtype (one unit in the
    last place: the two round the same fp32 sums): the files are the model the logits check passed."""
    import torch
    from safetensors import safe_open

    from kubetune.train.shard_merge import base_shards, loaded_names

    state = peft_merged.state_dict()
    keys = [k for ks in base_shards(folder).values() for k in ks]
    # some families' files name weights otherwise than the loaded model (Gemma 3): compare under its names
    renamed = {stored: name for name, (stored, _) in loaded_names(folder, keys).items()} \
        if any(k not in state for k in keys) else {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = renamed.get(key, key)
                if name not in state:
                    continue
                stored = f.get_tensor(key)
                ulp = (torch.nextafter(stored.abs(), torch.tensor(float("inf"), dtype=stored.dtype)) - stored.abs())
                if bool(((stored.float() - state[name].float()).abs() > ulp.float()).any()):
                    raise TrainingError(f"{path.name}: {key} differs from PEFT's merge of the whole model; nothing "
                                        "was written", "report this with the run's manifest.json")
