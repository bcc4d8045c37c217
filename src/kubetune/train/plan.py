"""`kubetune plan`: what a run will do, computed without torch and without training."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.data.encode import Encoded
from kubetune.data.prepare import Prepared
from kubetune.data.template import IGNORE
from kubetune.spec.models import RunSpec
from kubetune.train.batching import BatchShape, optimizer_steps, batch_shape
from kubetune.storage import read_model_config
from kubetune.train.flops import device_peak, flops_per_token

# Rough by design: the estimate answers "minutes or days?", not billing.
ASSUMED_MFU = {"nvidia": 0.35, "amd": 0.30, "gaudi": 0.30, "cpu": 0.15}
STEP_OVERHEAD_S = {"nvidia": 0.05, "amd": 0.05, "gaudi": 0.05, "cpu": 0.01}


@dataclass
class PlanReport:
    spec: RunSpec
    data: Prepared
    batches: BatchShape
    steps: int
    params: int
    est_seconds: float
    sample: Encoded | None

    def as_dict(self) -> dict[str, Any]:
        tr = self.data.train
        return {
            "train_rows": len(tr.rows), "eval_rows": len(self.data.eval.rows),
            "tokens": tr.stats(),
            "truncated_pct": _pct(tr.truncated, tr.total), "dropped_pct": _pct(tr.dropped, tr.total),
            "optimizer_steps": self.steps, "per_device_batch": self.batches.per_device,
            "accumulation": self.batches.accumulation, "world_size": self.batches.world_size,
            "params": self.params, "estimated_seconds": round(self.est_seconds, 1),
        }


def make_plan(spec: RunSpec, data: Prepared) -> PlanReport:
    world = spec.resources.world_size
    batches = batch_shape(spec.train.total_batch_size, spec.train.max_per_device_batch_size, world)
    from kubetune.train.objectives import objective_for  # (objectives import this module's helpers)

    answers = len(data.train.rows) * objective_for(spec).answers_per_row(spec)  # the batch counts answers
    steps = optimizer_steps(answers, batches.total, spec.train.epochs, spec.train.max_steps)
    params = count_params(data.model_dir)
    mean_tokens = data.train.stats()["mean"] or 1
    tokens = steps * batches.total * min(mean_tokens, spec.data.max_length)
    acc = _accelerator(spec)
    cfg = read_model_config(data.model_dir)
    per_token = flops_per_token(params, spec.method.type == "full", cfg.get("num_hidden_layers", 0),
                                cfg.get("hidden_size", 0), mean_tokens / 2)
    peak = device_peak(acc, devices=world)
    est = tokens * per_token / (peak * ASSUMED_MFU[acc]) + steps * batches.accumulation * STEP_OVERHEAD_S[acc]
    sample = next((r for r in data.train.rows if any(x == IGNORE for x in getattr(r, "labels", ()))), None)
    sample = sample or (data.train.rows[0] if data.train.rows else None)
    return PlanReport(spec, data, batches, steps, params, est, sample)


def _accelerator(spec: RunSpec) -> str:
    acc = spec.resources.accelerator
    if acc == "auto":
        return "nvidia" if Path("/dev/nvidia0").exists() else "cpu"
    return acc


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def count_params(model_dir: Path) -> int:
    """Parameters from safetensors headers (exact, no torch), else estimated from config.json."""
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        total = 0
        for f in files:
            with f.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for name, meta in header.items():
                if name != "__metadata__":
                    n = 1
                    for d in meta["shape"]:
                        n *= d
                    total += n
        return total
    cfg = read_model_config(model_dir)
    h, layers = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0)
    inter, vocab = cfg.get("intermediate_size", 4 * h), cfg.get("vocab_size", 0)
    return layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h


def segments(row: Encoded, fmt: Any) -> list[dict[str, Any]]:
    """A sample as its runs of trained and masked tokens: [{"text": ..., "trained": bool, "ids": [...]}, ...]
    (the token ids too: what a server must send the model for the same context)."""
    runs: list[tuple[bool, list[int]]] = []
    for tid, label in zip(map(int, row.input_ids), map(int, row.labels)):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tid)
        else:
            runs.append((trained, [tid]))
    return [{"text": fmt.decode(ids), "trained": trained, "ids": ids} for trained, ids in runs]


def pair_segments(row: Any, fmt: Any) -> dict[str, list[dict[str, Any]]]:
    """A preference pair as the prompt (masked) and each answer (trained) — what DPO compares."""
    return {"chosen": [{"text": fmt.decode(row.prompt_ids), "trained": False, "ids": row.prompt_ids},
                       {"text": fmt.decode(row.chosen_ids), "trained": True, "ids": row.chosen_ids}],
            "rejected": [{"text": fmt.decode(row.prompt_ids), "trained": False, "ids": row.prompt_ids},
                         {"text": fmt.decode(row.rejected_ids), "trained": True, "ids": row.rejected_ids}]}


def show_pair(row: Any, fmt: Any, color: bool) -> Any:
    from rich.text import Text

    text = Text()
    text.append(fmt.decode(row.prompt_ids), style="dim" if color else None)
    for label, ids, style in (("chosen", row.chosen_ids, "bold green"), ("rejected", row.rejected_ids, "bold red")):
        answer = fmt.decode(ids)
        text.append(f"\n  [{label}] ")
        text.append(answer, style=style) if color else text.append(f"⟦{answer}⟧")
    return text


def show_sample(row: Encoded | None, fmt: Any, color: bool) -> Any:
    """A sample as rich Text: trained tokens green, masked tokens dim (or ⟦trained⟧ without colour)."""
    from rich.text import Text

    text = Text()
    for seg in segments(row, fmt) if row is not None else []:
        if color:
            text.append(seg["text"], style="bold green" if seg["trained"] else "dim")
        else:
            text.append(f"⟦{seg['text']}⟧" if seg["trained"] else seg["text"])
    return text


def shown_rows(prepared: Prepared, n: int) -> list[Encoded]:
    """The first n training samples in data order (a split conversation gives one per assistant turn)."""
    return prepared.train.rows[:max(0, n)]


def sample_lines(spec: RunSpec, n: int) -> list[str]:
    """`kubetune plan --show N --json`: one JSON line per sample, {"where", "segments"}."""
    from kubetune.train.objectives import objective_for

    objective = objective_for(spec)
    prepared = objective.prepare(spec)
    return objective.sample_json(prepared, shown_rows(prepared, n))


def validate(spec: RunSpec, source: str = "spec") -> list[str]:
    """`kubetune validate`: pre-flight (storage, trackers, resume point) and every data row; the report."""
    from kubetune.train.objectives import objective_for
    from kubetune.train.runner import preflight

    output = preflight(spec)
    prepared = objective_for(spec).prepare(spec)
    lines = [f"ok: {source} (run {spec.name} → {output.uri})", *prepared.summary()]
    if prepared.samples.skipped:
        lines.append(f"  skipped {len(prepared.samples.skipped)} bad rows (data.bad_rows: skip)")
    return lines


def plan_report(spec: RunSpec, color: bool, show: int | None = None, local: bool = True) -> list[Any]:
    """`kubetune plan`: lines (str, or rich Text for samples with their loss masks) to print; `show`
    samples in data order, else the first one with masked tokens. `local`: the memory plan is for this
    machine's devices, else for the cluster's (resources.device_memory, the node selector)."""
    from kubetune.train.memory import fixes, plan_for_run
    from kubetune.train.objectives import objective_for

    objective = objective_for(spec)
    prepared = objective.prepare(spec)
    p = make_plan(spec, prepared)
    d = p.as_dict()
    lines: list[Any] = [f"plan for {spec.name}  (nothing is trained)", *prepared.summary(),
                        f"  truncated {d['truncated_pct']}%  dropped {d['dropped_pct']}%",
                        f"  method {spec.method.type} ({spec.method.objective}); {p.params:,} parameters; "
                        f"world size {p.batches.world_size}",
                        f"  batch: {p.batches.per_device} per device x {p.batches.accumulation} accumulation x "
                        f"{p.batches.world_size} devices = {p.batches.total}",
                        f"  optimizer steps: {p.steps}",
                        f"  rough time: {duration(p.est_seconds)}"]
    memory = plan_for_run(spec, prepared, local)
    lines += memory.lines()
    if not memory.fits:
        found = fixes(spec, memory)
        lines.append("  does not fit: `train` and `submit` refuse it. " +
                     (f"Fixes: {'; or '.join(found)}" if found else "Use a device with more memory or a smaller model"))
    rows = shown_rows(prepared, show) if show is not None else [p.sample] if p.sample is not None else []
    return lines + objective.show(spec, prepared, rows, color)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
