"""`kubetune sweep`: one run per combination of grid values, named deterministically
(NAME-r4-lr1e-4), each with its own output; run here (sequentially or N at a time) or submitted
as Kubernetes Jobs that Kueue queues. `sweep status` ranks the runs by an eval metric."""

from __future__ import annotations

import hashlib
import itertools
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import yaml

from kubetune.artifacts.events import ErrorEvent, EvalReportEvent, StepEvent
from kubetune.errors import UsageError
from kubetune.runs.layout import RUN_KEYS
from kubetune.spec.load import load_spec
from kubetune.spec.models import RunSpec

_SHORT = {"learning_rate": "lr", "r": "r", "alpha": "a", "dropout": "do", "total_batch_size": "bs",
          "max_steps": "steps", "epochs": "ep", "weight_decay": "wd", "warmup_ratio": "wu", "max_length": "len",
          "seed": "seed", "lr_scheduler": "sched", "type": "m", "base": ""}
LOWER_IS_BETTER = {"loss", "perplexity"}


@dataclass(frozen=True)
class Grid:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: tuple[str, ...]   # --set items: the grid values plus name and output


def parse_grid(items: Sequence[str]) -> list[Grid]:
    grids = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--grid {item}: expected KEY=V1,V2,...", "e.g. --grid method.lora.r=4,8,16")
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if len(set(vals)) != len(vals):
            raise UsageError(f"--grid {item}: repeated value")
        grids.append(Grid(key.strip(), vals))
    if not grids:
        raise UsageError("sweep needs at least one --grid KEY=V1,V2", "e.g. --grid method.lora.r=4,8,16")
    return grids


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "", value.lower().replace(".", "p").replace("_", "-")).strip("-") or "x"


MAX_NAME = 52  # RunSpec.name: it names Kubernetes objects (a Job's pods add their own suffix)


def _value_slug(value: str) -> str:
    """A URI or Hub id by its last part (hf://mistralai/Mistral-7B-v0.3 → mistral-7b-v0p3)."""
    if "/" in value:
        from kubetune.uris import uri_basename

        value = uri_basename(value)
    return _slug(value)


def run_name(base: str, combo: Sequence[tuple[str, str]]) -> str:
    """NAME-r4-lr1e-4: readable where it fits; past MAX_NAME characters cut, with a hash of the whole
    combination so that two runs never share a name."""
    parts = [f"{_SHORT.get(key.rsplit('.', 1)[-1], _slug(key.rsplit('.', 1)[-1]))}{_value_slug(value)}"
             for key, value in combo]
    name = "-".join([base, *parts])
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(repr(list(combo)).encode()).hexdigest()[:6]
    return f"{name[:MAX_NAME - 7].rstrip('-')}-{digest}"


def _output_for(spec: RunSpec, name: str) -> str:
    if spec.output is None:
        return f"runs/{name}"
    out = spec.output.rstrip("/")
    parent, _, last = out.rpartition("/")
    return f"{parent}/{name}" if last == spec.name and parent else f"{out}/{name}"


def plan_sweep(spec_path: str, grids: Sequence[Grid], overrides: Sequence[str] = ()) -> tuple[RunSpec, list[SweepRun]]:
    spec = load_spec(spec_path, list(overrides))
    runs = []
    for combo in itertools.product(*[[(g.key, v) for v in g.values] for g in grids]):
        name = run_name(spec.name, combo)
        sets = (*overrides, *(f"{k}={v}" for k, v in combo), f"name={name}", f"output={_output_for(spec, name)}",
                f"kubernetes.sweep={spec.name}")
        load_spec(spec_path, list(sets))  # every combination is a valid spec before anything starts
        runs.append(SweepRun(name, sets))
    return spec, runs


def run_local(spec_path: str, runs: Sequence[SweepRun], parallel: int = 1,
              log: Callable[[str], None] = print) -> dict[str, int]:
    """Train each run here, at most `parallel` at a time; returns run → exit code."""
    pending = list(runs)
    active: dict[str, subprocess.Popen[bytes]] = {}
    codes: dict[str, int] = {}
    while pending or active:
        while pending and len(active) < max(1, parallel):
            r = pending.pop(0)
            cmd = [sys.executable, "-m", "kubetune", "train", spec_path]
            for item in r.overrides:
                cmd += ["--set", item]
            log(f"start {r.name}")
            active[r.name] = subprocess.Popen(cmd, stdout=None if parallel == 1 else subprocess.DEVNULL)
        for name, proc in list(active.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                log(f"{'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}: {name}")
                del active[name]
        time.sleep(0.2)
    return codes


def submit_k8s(spec_path: str, runs: Sequence[SweepRun], log: Callable[[str], None] = print) -> None:
    from kubetune.launch import Launch, launcher_for

    for r in runs:
        spec = load_spec(spec_path, list(r.overrides))
        launcher_for(spec, "k8s").launch(Launch(spec, spec_path, tuple(r.overrides), log=log))


def ranking(spec_path: str, runs: Sequence[SweepRun], metric: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Rows (run, metric value, all tuned metrics, state), best first; runs without metrics last."""
    from kubetune.runs.view import RunView

    rows = []
    for r in runs:
        spec = load_spec(spec_path, list(r.overrides))
        row: dict[str, Any] = {"run": r.name, "value": None, "metrics": {}, "state": "not found"}
        view = RunView(spec.output_uri)  # read where it lives: nothing is pulled, cleaned or locked
        if not view.exists(RUN_KEYS.spec):
            rows.append(row)
            continue
        events = view.events()
        reports = [e for e in events if isinstance(e, EvalReportEvent)]
        steps = [e for e in events if isinstance(e, StepEvent)]
        if reports:
            row["metrics"], row["state"] = reports[-1].metrics.get("tuned", {}), "evaluated"
        elif view.is_finished():
            row["state"] = "finished"
        elif events and isinstance(events[-1], ErrorEvent):
            row["state"] = f"failed: {events[-1].error}"[:80]
        elif steps:
            row["state"] = f"step {steps[-1].step}/{steps[-1].total_steps}"
        else:
            row["state"] = "not started"
        rows.append(row)
    names = {k for row in rows for k in row["metrics"]}
    chosen = metric or ("rougeL" if "rougeL" in names else "loss")
    if names and chosen not in names:
        raise UsageError(f"--metric {chosen}: the runs have {', '.join(sorted(names))}")
    for row in rows:
        row["value"] = row["metrics"].get(chosen)
    sign = 1 if chosen in LOWER_IS_BETTER else -1
    rows.sort(key=lambda row: (row["value"] is None, sign * (row["value"] or 0), row["run"]))
    return chosen, rows


def format_ranking(metric: str, rows: list[dict[str, Any]]) -> str:
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"ranked by {metric} ({better} is better)", f"{'#':>2}  {'RUN':<40} {metric:>10}  STATE"]
    for i, row in enumerate(rows, 1):
        value = "-" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(f"{i:>2}  {row['run']:<40} {value:>10}  {row['state']}")
    return "\n".join(lines)


def parse_command(words: Sequence[str]) -> tuple[bool, str]:
    """`sweep SPEC` or `sweep status SPEC` → (status?, SPEC)."""
    words = list(words)
    status = bool(words) and words[0] == "status"
    if status:
        words = words[1:]
    if len(words) != 1:
        raise UsageError("usage: kubetune sweep [status] SPEC --grid KEY=V1,V2 ...")
    return status, words[0]


def dump_plan(runs: Sequence[SweepRun]) -> str:
    return yaml.safe_dump([{"name": r.name, "set": list(r.overrides)} for r in runs], sort_keys=False)


__all__ = ["Grid", "SweepRun", "parse_command", "parse_grid", "plan_sweep", "ranking", "run_local", "submit_k8s"]
