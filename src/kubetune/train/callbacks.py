"""Trainer callbacks: events.jsonl + progress, and checkpoint completion markers with retention."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.runs.checkpoints import mark_complete, prune
from kubetune.runs.layout import CHECKPOINT_PREFIX, RUN_KEYS
from kubetune.artifacts.events import CheckpointEvent, EvalEvent, EventLog, FirstStepEvent, StepEvent
from kubetune.train.progress import Progress


# Trainer log keys the step event has fields for; any other number is the objective's own metric.
_STANDARD = {"loss", "learning_rate", "grad_norm", "epoch", "num_tokens", "num_input_tokens_seen"}


class EventsCallback(TrainerCallback):
    """Turns Trainer logs into `step`/`eval` events with tokens/s and ETA (main process only)."""

    def __init__(self, events: EventLog, progress: Progress | None, flops_per_token: float = 0.0,
                 peak_flops: float = 0.0) -> None:
        self.events = events
        self.progress = progress
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._t0 = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self.tokens_seen = 0.0  # real (non-pad) tokens trained by this process's run, all ranks
        self._first_step_seen = False
        self.trainer: Any = None  # set by the runner: padding counts live on the trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.monotonic()
        self._start_step = state.global_step
        self._last_time = self._t0
        if self.progress and state.is_world_process_zero:
            self.progress.start(state.max_steps, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        is_step_log = "loss" in logs and not any(k.startswith("eval_") for k in logs)
        # Token counts are a collective under DDP: every rank takes them at the same (step) logs.
        real, positions = self.trainer.take_token_counts() if is_step_log and self.trainer else (0.0, 0.0)
        if not state.is_world_process_zero:
            return
        now = time.monotonic()
        if any(k.startswith("eval_") for k in logs):
            metrics = {k.removeprefix("eval_"): float(v) for k, v in logs.items()
                       if k.startswith("eval_") and isinstance(v, (int, float))}
            loss = metrics.pop("loss", None)
            self.events.emit(EvalEvent(step=state.global_step, loss=loss, metrics=metrics))
            if self.progress:
                shown = f"loss {loss:.4f}" if loss is not None else "  ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith(("runtime", "per_second")))
                self.progress.message(f"eval at step {state.global_step}: {shown}")
            return
        if "loss" not in logs:
            return  # the train summary at the end; the runner writes the end event
        self.tokens_seen += real
        tokens_per_s = real / (now - self._last_time) if now > self._last_time and real else None
        self._last_time = now
        padding = 1 - real / positions if positions else None
        done = state.global_step - self._start_step
        rate = (now - self._t0) / done if done else None
        eta = rate * (state.max_steps - state.global_step) if rate else None
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if tokens_per_s and self.peak_flops else None
        rec = StepEvent(
            step=state.global_step, total_steps=state.max_steps, epoch=round(state.epoch or 0, 4),
            loss=logs.get("loss"), learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_s=round(tokens_per_s, 1) if tokens_per_s else None, tokens_seen=int(self.tokens_seen),
            mfu=round(mfu, 4) if mfu is not None else None, padding=round(padding, 4) if padding is not None else None,
            eta_s=round(eta, 1) if eta is not None else None,
            metrics={k: float(v) for k, v in logs.items() if k not in _STANDARD and isinstance(v, (int, float))} or None,
        )
        self.events.emit(rec)
        if self.progress:
            self.progress.update(rec)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps and getattr(args.logging_strategy, "value",
                                                            args.logging_strategy) != "no":
            # the last step is always logged: the final loss (and a results file's last row) is the
            # model's, not the one logging_steps happened to land on before it (every rank sets it)
            control.should_log = True
        if not self._first_step_seen and state.is_world_process_zero:
            self._first_step_seen = True
            from kubetune.train.measure import held_bytes, peak_memory_bytes

            model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
            self.events.emit(FirstStepEvent(step=state.global_step, peak_memory_bytes=peak_memory_bytes("cpu" if args.use_cpu else "auto"),
                                            held_bytes=held_bytes(model, optimizer) if model is not None else None))
        if self.progress:
            self.progress.tick(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress and state.is_world_process_zero:
            self.progress.stop()


class CheckpointCallback(TrainerCallback):
    """After the Trainer saved checkpoint-N on every rank, mark it COMPLETE and apply retention."""

    def __init__(self, folder: Path, keep: int, events: EventLog, uploader: Any = None, store: Any = None) -> None:
        self.folder = folder
        self.keep = keep
        self.events = events
        self.uploader = uploader  # runs.sync.Uploader for object-storage outputs (rank 0)
        self.store = store        # the remote output (every rank), for other nodes' own files

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank's files (rng_state_<rank>.pth) are written before the marker
        if self.store is not None and not state.is_world_process_zero and _first_on_node():
            # Several nodes, each with its own disk: what this node's ranks wrote (their RNG states and,
            # under FSDP, their shards) exists only here. Rank 0 writes nothing on this node, so every
            # file is theirs; they are stored before rank 0 marks the checkpoint COMPLETE (the barrier below).
            path = self.folder / f"{CHECKPOINT_PREFIX}{state.global_step}"
            for file in sorted(f for f in path.rglob("*") if f.is_file()):
                self.store.put(file, f"{RUN_KEYS.checkpoint(state.global_step)}/{file.relative_to(path).as_posix()}")
            _barrier()
        elif self.store is not None and _multi_node():
            _barrier()
        if state.is_world_process_zero:
            path = self.folder / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if path.is_dir():
                mark_complete(path, state.global_step)
                if self.uploader is not None:
                    self.uploader.checkpoint(path, state.global_step)  # background; COMPLETE uploaded last
                # a checkpoint still being uploaded is not deleted locally
                protect = self.uploader.pending_steps() if self.uploader is not None else set()
                removed = prune(self.folder, self.keep, protect)
                self.events.emit(CheckpointEvent(step=state.global_step, path=str(path),
                                                 removed=[str(p) for p in removed]))
                if self.uploader is not None:
                    self.uploader.files(self.events.path)
        _barrier()


def _first_on_node() -> bool:
    import os

    return _multi_node() and os.environ.get("LOCAL_RANK", "0") == "0"


def _multi_node() -> bool:
    """More than one node: torchrun's world is larger than one node's processes."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get(
        "WORLD_SIZE", "1")))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class LeaseWatch(TrainerCallback):
    """Stops at the next step when the run's lease was lost (another trainer took it over): from
    then on this process must not write a checkpoint or an event."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lease.lost:
            from kubetune.errors import LeaseHeld

            raise LeaseHeld(f"stopped at step {state.global_step}: another trainer took over this run's lease",
                            "nothing was written after the lease was lost; the other trainer continues the run")
