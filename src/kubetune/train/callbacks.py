"""Trainer callbacks: events.jsonl + progress, and checkpoint completion markers with retention."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.artifacts.checkpoints import mark_complete, prune
from kubetune.artifacts.events import EventLog
from kubetune.train.progress import Progress


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
        self._last: tuple[float, int] | None = None  # (time, tokens seen) at the previous log
        self._first_step_seen = False
        self.trainer: Any = None  # set by the runner: padding counts live on the trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.monotonic()
        self._start_step = state.global_step
        self._last = (self._t0, state.num_input_tokens_seen or 0)
        if self.progress and state.is_world_process_zero:
            self.progress.start(state.max_steps, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        now = time.monotonic()
        if any(k.startswith("eval_") for k in logs):
            metrics = {k.removeprefix("eval_"): v for k, v in logs.items() if k.startswith("eval_")}
            self.events.emit("eval", step=state.global_step, **metrics)
            if self.progress:
                self.progress.message(f"eval at step {state.global_step}: loss {metrics.get('loss', float('nan')):.4f}")
            return
        if "loss" not in logs:
            return  # the train summary at the end; the runner writes the end event
        seen = state.num_input_tokens_seen or 0
        last_t, last_seen = self._last or (now, seen)
        tokens_per_s = (seen - last_seen) / (now - last_t) if now > last_t and seen > last_seen else None
        self._last = (now, seen)
        done = state.global_step - self._start_step
        rate = (now - self._t0) / done if done else None
        eta = rate * (state.max_steps - state.global_step) if rate else None
        padding = self.trainer.take_padding_fraction() if hasattr(self.trainer, "take_padding_fraction") else None
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if tokens_per_s and self.peak_flops else None
        rec = self.events.emit(
            "step", step=state.global_step, total_steps=state.max_steps, epoch=round(state.epoch or 0, 4),
            loss=logs.get("loss"), learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_s=round(tokens_per_s, 1) if tokens_per_s else None, tokens_seen=seen,
            mfu=round(mfu, 4) if mfu is not None else None, padding=round(padding, 4) if padding is not None else None,
            eta_s=round(eta, 1) if eta is not None else None,
        )
        if self.progress:
            self.progress.update(rec)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._first_step_seen and state.is_world_process_zero:
            self._first_step_seen = True
            self.events.emit("first_step", step=state.global_step)
        if self.progress:
            self.progress.tick(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress and state.is_world_process_zero:
            self.progress.stop()


class CheckpointCallback(TrainerCallback):
    """After the Trainer saved checkpoint-N on every rank, mark it COMPLETE and apply retention."""

    def __init__(self, folder: Path, keep: int, events: EventLog) -> None:
        self.folder = folder
        self.keep = keep
        self.events = events

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank's files (rng_state_<rank>.pth) are written before the marker
        if state.is_world_process_zero:
            path = self.folder / f"checkpoint-{state.global_step}"
            if path.is_dir():
                mark_complete(path, state.global_step)
                removed = prune(self.folder, self.keep)
                self.events.emit("checkpoint", step=state.global_step, path=str(path),
                                 removed=[str(p) for p in removed])
        _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
