"""What a job's run folder says, in OpenAI's shapes: its typed events as `fine_tuning.job.event`s,
its complete checkpoints as `fine_tuning.job.checkpoint`s, and the tokens trained so far. The run may
be a local folder or an object-storage prefix; nothing here writes to it."""

from __future__ import annotations

from typing import Any

from kubetune.artifacts.events import (CheckpointEvent, CheckpointStoredEvent, EndEvent, ErrorEvent, EvalEvent,
                                       EvalReportEvent, Event, PreemptedEvent, StartEvent, StepEvent)
from kubetune.control.redact import redact
from kubetune.runs.view import RunView

__all__ = ["checkpoints", "openai_events", "trained_tokens"]


def trained_tokens(events: list[Event]) -> int | None:
    seen = [e.tokens_seen for e in events if isinstance(e, (StepEvent, EndEvent)) and e.tokens_seen]
    return max(seen) if seen else None


def openai_events(job_id: str, control: list[dict[str, Any]], events: list[Event]) -> list[dict[str, Any]]:
    """The server's own events and the run's, oldest first, as fine_tuning.job.event objects."""
    out = [_event(f"ftevent-c{e['n']}", e["created_at"], e["level"], e["message"], "message", None)
           for e in control]
    for k, e in enumerate(events):
        said = _describe(e)
        if said is not None:
            level, message, kind, data = said
            out.append(_event(f"ftevent-r{k}", e.time, level, message, kind, data))
    out.sort(key=lambda ev: ev["_t"])
    for ev in out:
        ev["created_at"] = int(ev.pop("_t"))
    return out


def _event(eid: str, t: float, level: str, message: str, kind: str, data: dict[str, Any] | None) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": eid, "_t": t, "level": level, "message": redact(message),
            "type": kind, "data": data}


def _graders(metrics: dict[str, float], prefix: str, suffix: str = "") -> list[dict[str, Any]]:
    """Per-grader scores of a GRPO step or eval (TRL's rewards/NAME/mean, a multi grader's
    grader/NAME/mean) in OpenAI's `scores.graders` shape."""
    out = []
    for key, value in metrics.items():
        base = key.removesuffix(suffix) if suffix else key
        if suffix and not key.endswith(suffix):
            continue
        for head in ("rewards/", "grader/"):
            if base.startswith(head) and base.endswith("/mean") and base.count("/") == 2:
                out.append({"name": base[len(head):-5], f"{prefix}_reward_mean": value})
        if base.startswith("reward/"):  # the held-out scoring's per-function means
            out.append({"name": base[len("reward/"):], f"{prefix}_reward_mean": value})
    return out


def _reward_event(e: StepEvent | EvalEvent) -> tuple[str, str, str, dict[str, Any]] | None:
    """A GRPO (reinforcement) step or held-out scoring as OpenAI's reward metrics event."""
    m = e.metrics or {}
    if isinstance(e, StepEvent) and "reward" in m:
        mean = m["reward"]
        data = {"step": e.step, "total_steps": e.total_steps, "train_mean_reward": mean, "train_reward_mean": mean,
                "scores": {"train_reward_mean": mean, "graders": _graders(m, "train")},
                "errors": {"train_error_mean": m.get("rewards/error_mean", m.get("grader/error_mean"))},
                "mean_unresponsive_rewards": m.get("grader/unresponsive_mean", 0.0),
                "completion_tokens_mean": m.get("completions/mean_length"), "learning_rate": e.learning_rate}
        return "info", f"Step {e.step}/{e.total_steps}: train mean reward={mean:.4f}", "metrics", data
    if isinstance(e, EvalEvent) and ("reward" in m or "reward_start" in m):
        suffix = "_start" if "reward_start" in m else ""
        mean = m["reward" + suffix]
        data = {"step": e.step, "full_valid_mean_reward": mean, "valid_reward_mean": mean,
                "scores": {"valid_reward_mean": mean, "graders": _graders(m, "valid", suffix)},
                "errors": {"valid_error_mean": m.get("grader/error_mean" + suffix)},
                "before_training": bool(suffix)}
        when = " (before training)" if suffix else ""
        return "info", f"Step {e.step}{when}: full validation mean reward={mean:.4f}", "metrics", data
    return None


def _describe(e: Event) -> tuple[str, str, str, dict[str, Any] | None] | None:
    if isinstance(e, (StepEvent, EvalEvent)):
        rewarded = _reward_event(e)
        if rewarded is not None:
            return rewarded
    if isinstance(e, StepEvent):
        data = {"step": e.step, "total_steps": e.total_steps, "train_loss": e.loss,
                "train_mean_token_accuracy": (e.metrics or {}).get("mean_token_accuracy"),
                "learning_rate": e.learning_rate, "tokens_per_s": e.tokens_per_s, "tokens_seen": e.tokens_seen,
                "epoch": e.epoch}
        loss = f"{e.loss:.4f}" if e.loss is not None else "?"
        return "info", f"Step {e.step}/{e.total_steps}: training loss={loss}", "metrics", data
    if isinstance(e, EvalEvent):
        scores = {k: v for k, v in e.metrics.items() if not k.endswith(("runtime", "_per_second"))}
        said = [f"validation loss={e.loss:.4f}"] if e.loss is not None else []
        said += [f"{k}={v:.4g}" for k, v in scores.items()]
        return "info", f"Step {e.step}: {', '.join(said) or 'evaluated'}", "metrics", \
            {"step": e.step, "valid_loss": e.loss, "valid_mean_token_accuracy": scores.pop("mean_token_accuracy", None),
             **scores}
    if isinstance(e, StartEvent):
        how = f" (resumed from {e.resumed_from.rsplit('/', 1)[-1]})" if e.resumed_from else ""
        return "info", f"Training started{how}: {e.train_rows} rows, {e.total_steps} steps", "message", None
    if isinstance(e, CheckpointEvent):
        return "info", f"Checkpoint saved at step {e.step}", "message", None
    if isinstance(e, CheckpointStoredEvent):
        return "info", f"Checkpoint of step {e.step} stored", "message", None
    if isinstance(e, PreemptedEvent):
        return "warn", f"Stopped at step {e.step}; it resumes from {e.checkpoint.rsplit('/', 1)[-1]}", "message", None
    if isinstance(e, ErrorEvent):
        return "error", f"Training failed: {e.error}", "message", None
    if isinstance(e, EndEvent):
        return "info", f"Training finished at step {e.step}", "message", {"train_loss": e.train_loss}
    if isinstance(e, EvalReportEvent):
        return "info", "Evaluation report written", "message", e.metrics
    return None


def checkpoints(job: dict[str, Any], events: list[Event]) -> list[dict[str, Any]]:
    """Complete checkpoints still in the run, newest first, with the loss logged at their step."""
    steps = RunView(job["run_uri"]).complete_steps()
    losses = {e.step: e for e in events if isinstance(e, StepEvent)}
    valid = {e.step: e for e in events if isinstance(e, EvalEvent)}
    made = {e.step: e.time for e in events if isinstance(e, (CheckpointEvent, CheckpointStoredEvent))}
    name = job.get("fine_tuned_model") or job["id"]
    out = []
    for step in sorted(steps, reverse=True):
        logged = losses.get(step) or max((s for s in losses.values() if s.step <= step), key=lambda s: s.step,
                                         default=None)
        metrics = _checkpoint_metrics(step, logged, valid.get(step))
        out.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job['id'].split('-', 1)[1][:12]}-{step}",
                    "created_at": int(made.get(step, job["created_at"])), "fine_tuning_job_id": job["id"],
                    "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}", "step_number": step,
                    "metrics": metrics})
    return out


def _checkpoint_metrics(step: int, logged: StepEvent | None, valid: EvalEvent | None) -> dict[str, Any]:
    """OpenAI's checkpoint metrics: the training loss and token accuracy last logged at or before the
    step; the validation figures of the evaluation at that step. An evaluation reads the whole
    validation file, so `full_valid_*` are the same numbers (OpenAI's valid_* are of one batch)."""
    train_acc = (logged.metrics or {}).get("mean_token_accuracy") if logged else None
    valid_acc = valid.metrics.get("mean_token_accuracy") if valid else None
    out = {"step": step, "train_loss": logged.loss if logged else None, "train_mean_token_accuracy": train_acc,
           "valid_loss": valid.loss if valid else None, "valid_mean_token_accuracy": valid_acc,
           "full_valid_loss": valid.loss if valid else None, "full_valid_mean_token_accuracy": valid_acc}
    if logged is not None and "reward" in (logged.metrics or {}):  # reinforcement: the grader's mean reward
        out["train_reward_mean"] = logged.metrics["reward"]
        out["valid_reward_mean"] = valid.metrics.get("reward") if valid else None
    return out
