"""The eval report (RUN_KEYS.eval_report): the metrics table (base vs tuned), a loss-curve PNG from events.jsonl, samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.artifacts.events import EvalEvent, StepEvent, read_events


def loss_plot(events_path: Path, out: Path) -> bool:
    """Training (and eval) loss by step; False when the run has no step events."""
    events = read_events(events_path)
    steps = [(e.step, e.loss) for e in events if isinstance(e, StepEvent) and e.loss is not None]
    evals = [(e.step, e.loss) for e in events if isinstance(e, EvalEvent) and e.loss is not None]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*steps), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def write_report(path: Path, name: str, metrics: dict[str, Any], samples: list[dict[str, Any]], plot: bool) -> Path:
    models = [m for m in ("base", "tuned") if m in metrics]
    keys = sorted({k for m in models for k in metrics[m]})
    lines = [f"# Evaluation of {name}", "", "| metric | " + " | ".join(models) + " |",
             "| --- |" + " ---: |" * len(models)]
    for key in keys:
        cells = [f"{metrics[m][key]:.4f}" if isinstance(metrics[m].get(key), float) else str(metrics[m].get(key, ""))
                 for m in models]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", f"{metrics.get('num_samples', 0)} generation samples, {metrics.get('num_loss_rows', 0)} rows for loss."]
    if plot:
        lines += ["", "![loss curve](loss.png)"]
    lines += ["", "## Samples", ""]
    for s in samples[:5]:
        lines += [f"**prompt**: {s['prompt']}", "", f"- reference: {s['reference']}"]
        lines += [f"- {m}: {s[m]}" for m in models if m in s]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
