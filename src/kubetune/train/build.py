"""The Trainer for a run: the model for its method, the objective's Trainer, and kubetune's
callbacks (events and progress, COMPLETE checkpoints and their upload)."""

from __future__ import annotations

import warnings
from typing import Any

from kubetune.artifacts.events import EventLog
from kubetune.runs.layout import RunLayout
from kubetune.hf import quiet_progress_bars
from kubetune.spec.models import RunSpec
from kubetune.storage import resolve_model
from kubetune.runs.sync import Uploader
from kubetune.train.arguments import training_arguments
from kubetune.train.dist import DistInfo
from kubetune.train.objectives import Objective, objective_for


def build_trainer(spec: RunSpec, data: Any, layout: RunLayout, events: EventLog, batches: Any,
                  args: Any = None, uploader: Uploader | None = None, objective: Objective | None = None,
                  store: Any = None) -> Any:
    """`uploader`: rank 0's background uploads; `store`: the remote output, where the first process of
    every other node puts its ranks' own checkpoint files (they exist only on that node's disk)."""
    from transformers import PrinterCallback, set_seed

    from kubetune.train.callbacks import CheckpointCallback, EventsCallback
    from kubetune.train.model import load_model
    from kubetune.train.start import start_adapter
    from kubetune.train.progress import make_progress

    objective = objective or objective_for(spec)
    quiet_progress_bars()
    # peft still reads a renamed transformers attribute; the warning is theirs to fix, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # ... and TRL still calls the renamed gradient_checkpointing_enable/disable
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_(enable|disable).*", category=FutureWarning)
    # Seed before the model exists: LoRA's A matrices are initialised randomly inside load_model,
    # and the Trainer seeds only later; without this a run is not reproducible from train.seed.
    set_seed(spec.train.seed)
    # data.model_dir may hold only the tokenizer and configs (enough for validate/plan): the weights now
    args = args or training_arguments(spec, layout, batches, bool(data.eval.rows), data.model_dir, "ddp",
                                      *objective.arguments(spec))
    model = load_model(spec, resolve_model(spec.model.base, spec.model.revision), sharded=bool(args.fsdp),
                       start=start_adapter(spec))
    trainer = objective.trainer(spec, data, model, args, batches,
                                [CheckpointCallback(layout.checkpoints, spec.train.keep_checkpoints, events, uploader,
                                                                   store)])
    progress = make_progress() if DistInfo.from_env().rank == 0 else None
    progress_cb = EventsCallback(events, progress, *_flops(spec, model, data))
    progress_cb.trainer = trainer
    trainer.events_callback = progress_cb
    trainer.add_callback(progress_cb)
    trainer.remove_callback(PrinterCallback)  # our EventsCallback prints progress (once, formatted)
    return trainer


def _flops(spec: RunSpec, model: Any, data: Any) -> tuple[float, float]:
    """(FLOPs per trained token, peak FLOP/s of this process's device) for the MFU estimate."""
    from kubetune.train.devices import detect, device_name, device_type
    from kubetune.train.flops import device_peak, flops_per_token

    cfg = getattr(model, "config", None)
    params = sum(p.numel() for p in model.parameters())
    per_token = flops_per_token(params, spec.method.type == "full", getattr(cfg, "num_hidden_layers", 0),
                                getattr(cfg, "hidden_size", 0), data.train.stats()["mean"] / 2)
    device = device_type(spec.resources.accelerator)
    kind = "cpu" if device == "cpu" else detect().kind
    name = device_name(device)
    # tokens/s is gathered over all ranks, so the peak is that of every device (CPU ranks share the cores).
    return per_token, device_peak(kind, name, devices=DistInfo.from_env().world_size)
