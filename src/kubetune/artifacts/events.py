"""events.jsonl: the typed record of a run, one JSON object per line, appended (a resumed run
continues the same file).

One schema for every writer (train, merge, eval, uploads, the lease) and every reader (`status`,
progress lines, reports, sweeps, anything later that shows runs): each kind of event is a pydantic
model, `EventLog.emit` takes only those, and `read_events`/`parse_events` give them back. The JSON
Schema (`kubetune schema --events`) is in docs/events.md.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "CheckpointEvent", "CheckpointStoredEvent", "EndEvent", "ErrorEvent", "EvalEvent", "EvalReportEvent", "Event",
    "EventLog", "FirstStepEvent", "LeaseEvent", "MergeEvent", "PreemptedEvent", "StartEvent", "StepEvent",
    "events_schema", "format_eta", "parse_events", "read_events",
]


class _Event(BaseModel):
    # forbid: a writer that misspells a field fails in the tests, instead of a reader seeing None
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # NaN stays NaN, as json.loads reads it

    time: float = Field(default_factory=lambda: round(time.time(), 3), description="Unix time of the event.")


class StartEvent(_Event):
    """Training (re)started; written once per process that trains."""

    event: Literal["start"] = "start"
    name: str
    resumed_from: Optional[str] = Field(None, description="Checkpoint this start continues from (URI or path).")
    train_rows: int
    eval_rows: int
    total_steps: int = Field(description="Optimizer steps of the whole run.")
    per_device_batch: int
    accumulation: int
    world_size: int
    mixed_precision: Literal["bf16", "fp16", "fp32"]
    strategy: Optional[Literal["single", "ddp", "fsdp"]] = Field(
        None, description="How the processes share the model: one process, replicas (ddp), or shards (fsdp).")
    truncated: int = 0
    dropped: int = 0
    skipped_rows: int = 0


class FirstStepEvent(_Event):
    event: Literal["first_step"] = "first_step"
    step: int
    held_bytes: Optional[int] = Field(
        None, description="Parameters and optimizer state held by the main process after its first step, "
        "measured (under fsdp its shards: about 1/world_size of the whole).")
    peak_memory_bytes: Optional[int] = Field(
        None, description="The main process's peak memory so far: CUDA memory allocated on a GPU, resident set on a CPU.")


class StepEvent(_Event):
    """Progress at a logging step."""

    event: Literal["step"] = "step"
    step: int
    total_steps: int
    epoch: float = 0.0
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens_per_s: Optional[float] = Field(None, description="Real (non-padding) tokens per second, all ranks.")
    tokens_seen: int = 0
    mfu: Optional[float] = Field(None, description="Model FLOPs utilisation estimate (0..1).")
    padding: Optional[float] = Field(None, description="Fraction of batch positions that were padding.")
    eta_s: Optional[float] = Field(None, description="Seconds to the last step at the current rate.")
    metrics: Optional[dict[str, float]] = Field(
        None, description="The objective's own training metrics (dpo: rewards/accuracies, rewards/margins, ...).")


class EvalEvent(_Event):
    """Eval loss during training (train.eval_every_steps, or at the end)."""

    event: Literal["eval"] = "eval"
    step: int
    loss: Optional[float] = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Everything else the evaluation reported.")


class CheckpointEvent(_Event):
    """checkpoint-N is complete on local disk (its COMPLETE marker written)."""

    event: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str
    removed: list[str] = Field(default_factory=list, description="Older checkpoints deleted by retention.")


class CheckpointStoredEvent(_Event):
    """checkpoint-N is complete in the run's object storage (every file, then COMPLETE)."""

    event: Literal["checkpoint_stored"] = "checkpoint_stored"
    step: int
    uri: str


class PreemptedEvent(_Event):
    event: Literal["preempted"] = "preempted"
    step: int
    checkpoint: str


class ErrorEvent(_Event):
    event: Literal["error"] = "error"
    error: str
    exit_code: int = 1


class EndEvent(_Event):
    event: Literal["end"] = "end"
    step: int
    final: str
    train_loss: Optional[float] = None
    tokens_seen: int = 0
    train_runtime: Optional[float] = None
    peak_memory_bytes: Optional[int] = Field(
        None, description="The main process's peak memory over training: CUDA memory allocated on a GPU, resident set on a CPU.")


class MergeEvent(_Event):
    event: Literal["merge"] = "merge"
    path: str
    max_logit_diff: Optional[float] = Field(
        None, description="Whole model: largest |logit difference| from adapter-on-base (fp32); null when the model "
                          "did not fit in memory for it and only its layers were checked.")
    layer_diff: Optional[float] = Field(
        None, description="Worst merged layer against PEFT's LoRA forward, beyond its dtype's rounding, as a fraction "
                          "of the layer's outputs' scale.")
    largest_weight_bytes: Optional[int] = Field(
        None, description="The largest merged weight in fp32: the merge holds one weight at a time, not the model.")


class EvalReportEvent(_Event):
    """`kubetune eval` (or eval after train) wrote eval/: metrics by model (base, tuned)."""

    event: Literal["eval_report"] = "eval_report"
    path: str
    metrics: dict[str, dict[str, float]]


class LeaseEvent(_Event):
    """This trainer became the run's only writer (taking over an expired or abandoned lease)."""

    event: Literal["lease"] = "lease"
    holder: str
    taken_over_from: Optional[str] = None


Event = Annotated[
    Union[StartEvent, FirstStepEvent, StepEvent, EvalEvent, CheckpointEvent, CheckpointStoredEvent, PreemptedEvent,
          ErrorEvent, EndEvent, MergeEvent, EvalReportEvent, LeaseEvent],
    Field(discriminator="event"),
]
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
_KINDS: dict[str, type[_Event]] = {cls.model_fields["event"].default: cls for cls in _Event.__subclasses__()}


class EventLog:
    """Appends events to a run's events.jsonl (no-op when disabled: torchrun ranks other than 0)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def emit(self, event: Event) -> Event:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one write of one line in append mode: concurrent writers (the upload reporter) never interleave
            with self.path.open("a") as fh:
                fh.write(event.model_dump_json() + "\n")
        return event


def parse_events(lines: Iterable[str]) -> list[Event]:
    """Events from JSON lines. A line cut by a killed process, or of a kind this version does not
    know, is skipped; fields a newer writer added are ignored (writers are strict, readers tolerant)."""
    out: list[Event] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            cls = _KINDS.get(record.get("event")) if isinstance(record, dict) else None
            if cls is not None:
                out.append(cls.model_validate({k: v for k, v in record.items() if k in cls.model_fields}))
        except (ValueError, ValidationError):
            continue
    return out


def read_events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    return parse_events(path.read_text().splitlines())


def format_eta(seconds: float | None) -> str:
    """H:MM:SS, or ? when unknown: how progress lines, `status` and the pod log show an ETA."""
    return "?" if seconds is None else str(timedelta(seconds=int(seconds)))


def events_schema() -> dict[str, object]:
    """JSON Schema of one line of events.jsonl."""
    return _ADAPTER.json_schema()
