"""`kubetune export CHECKPOINT`: a sharded (FSDP) checkpoint as a normal Hugging Face folder.

An FSDP checkpoint holds each rank's shards in torch.distributed.checkpoint's format, readable only
by a run with the same sharding. Exported, it is what merge, eval, serve and `model.base` load: the
full model (safetensors, with the base's config) or, for LoRA, the adapter — plus the run's tokenizer
and chat template. One process, no process group: torch reads the shards back into one state dict.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from kubetune.data.tokenizer_files import readable, save_tokenizer_and_config
from kubetune.errors import KubetuneError, UsageError
from kubetune.hf import quiet_progress_bars
from kubetune.storage import resolve_model
from kubetune.runs.checkpoints import verify
from kubetune.runs.layout import RUN_KEYS
from kubetune.runs.run import read_run_spec

SHARDS = "pytorch_model_fsdp_0"


def export_checkpoint(checkpoint: Path, out: Path | None = None) -> Path:
    """Write RUN/exported/checkpoint-N (or `out`) from the checkpoint's shards; returns the folder."""
    checkpoint = checkpoint.resolve()
    why = verify(checkpoint)
    if why is not None:
        raise UsageError(f"{checkpoint} is not a complete checkpoint ({why})",
                         "pass a folder RUN/checkpoints/checkpoint-N whose COMPLETE marker matches its files")
    if not (checkpoint / SHARDS).is_dir():
        raise UsageError(f"{checkpoint} is not sharded: its model files are already a Hugging Face folder",
                         "load it directly (model.safetensors or adapter_model.safetensors are in it)")
    run = checkpoint.parent.parent
    spec = read_run_spec(str(run))
    if spec is None:
        raise UsageError(f"{run} has no spec.yaml: cannot tell which base model the shards belong to",
                         "export a checkpoint inside its run folder (RUN/checkpoints/checkpoint-N)")
    out = (out or run / RUN_KEYS.exported / checkpoint.name).resolve()
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty; kubetune does not overwrite it",
                         "remove it, or pass another --to folder")
    quiet_progress_bars()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft's
    state = _read_shards(checkpoint / SHARDS)
    base_dir = resolve_model(spec.model.base, spec.model.revision)
    model = _full(base_dir, state) if spec.method.type == "full" else _adapter(spec, base_dir, state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _tokenizer(spec, base_dir, out)
    readable(out)
    return out


def _read_shards(folder: Path) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(folder), str(target))
        state = torch.load(target, map_location="cpu", weights_only=True)
    return state.get("model", state)


def _full(base_dir: Path, state: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise KubetuneError(f"the shards do not fit {base_dir}'s architecture (missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})", "export with the base model the run trained")
    if tied:
        model.tie_weights()
    return model


def _adapter(spec: Any, base_dir: Path, state: dict[str, Any]) -> Any:
    from peft import set_peft_model_state_dict

    from kubetune.train.model import load_model

    model = load_model(spec, base_dir)  # the base with the run's LoRA config, fresh adapter weights
    lora = {k: v for k, v in state.items() if "lora_" in k}
    if not lora:
        raise KubetuneError("the shards hold no LoRA weights", "export a checkpoint of a lora run")
    result = set_peft_model_state_dict(model, lora)  # keys as peft saves them (no adapter name)
    if result.unexpected_keys:
        raise KubetuneError(f"the shards do not fit the run's LoRA config (unexpected {result.unexpected_keys[:3]})",
                            "export with the spec the run trained")
    return model


def _tokenizer(spec: Any, base_dir: Path, out: Path) -> None:
    from kubetune.data.template import ChatFormatter

    formatter = ChatFormatter(base_dir, spec.model.chat_template)
    try:
        stop = formatter.stop
    except KubetuneError:
        stop = None  # a base model without a chat template: text data
    save_tokenizer_and_config(base_dir, formatter.template, stop, formatter.pad_id, out)
