"""`kubetune eval RUN`: eval loss/perplexity and generation metrics, base vs tuned, on the same samples.

Writes eval/metrics.json, eval/samples.jsonl (prompt, reference, base and tuned output),
eval/loss.png and eval/report.md. The eval rows are the run's own eval split, re-derived from its
saved spec (through the data cache), so `eval` needs nothing but the run folder.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from kubetune.artifacts.events import EndEvent, EvalReportEvent, EventLog, read_events
from kubetune.runs.layout import RunLayout
from kubetune.runs.trackers import TrackerRuns
from kubetune.runs.run import Run
from kubetune.data.prepare import prepare
from kubetune.errors import KubetuneError, TrainingError, UsageError
from kubetune.evaluate.generate import generate, load_for_generation
from kubetune.evaluate.metrics import exact_match, rouge
from kubetune.evaluate.report import loss_plot, write_report

ALL_METRICS = ["loss", "rouge", "exact_match"]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    folder: Any


def evaluate_run(run: str, compare_base: bool = True, log: Callable[[str], None] = print) -> EvalResult:
    opened = Run.open(run)
    layout, spec = opened.layout, opened.spec
    assert spec is not None
    wanted = spec.eval.metrics or ALL_METRICS
    data = prepare(spec)
    if not data.eval.rows and not data.samples.eval:
        raise UsageError(f"{run} has no eval data (data.eval is null)",
                         "set data.eval to a source or {split_ratio: 0.05} and train again")
    chats = [s for s in data.samples.eval if s.messages and s.messages[-1]["role"] == "assistant"
             and isinstance(s.messages[-1].get("content"), str) and not s.tools]  # plain answers to compare
    chats = chats[: spec.eval.num_samples]
    prompts = [list(s.messages[:-1]) for s in chats]
    references = [s.messages[-1]["content"] for s in chats]
    generation = bool(chats) and any(m in wanted for m in ("rouge", "exact_match"))

    metrics: dict[str, Any] = {"num_samples": len(chats) if generation else 0, "num_loss_rows": len(data.eval.rows)}
    outputs: dict[str, list[str]] = {}
    for which in (["base"] if compare_base else []) + ["tuned"]:
        model, tokenizer, gen = load_for_generation(opened, base=which == "base")
        scores: dict[str, float] = {}
        if "loss" in wanted and data.eval.rows:
            loss = eval_loss(model, data.eval.rows, data.formatter.pad_id)
            scores["loss"], scores["perplexity"] = loss, math.exp(min(loss, 50.0))
        if generation:
            outputs[which] = generate(model, tokenizer, gen, prompts, max_new_tokens=spec.eval.max_new_tokens)
            if "rouge" in wanted:
                scores.update(rouge(outputs[which], references))
            if "exact_match" in wanted:
                scores["exact_match"] = exact_match(outputs[which], references)
        metrics[which] = scores
        del model
        gc.collect()

    folder = layout.eval
    folder.mkdir(parents=True, exist_ok=True)
    samples = [{"prompt": p[-1]["content"], "messages": p, "reference": r,
                **{w: outputs[w][i] for w in outputs}} for i, (p, r) in enumerate(zip(prompts, references))]
    layout.eval_metrics.write_text(json.dumps(metrics, indent=2))
    with layout.eval_samples.open("w") as fh:
        for s in samples:
            fh.write(json.dumps(s) + "\n")
    plot = loss_plot(layout.events, layout.eval_plot)
    write_report(layout.eval_report, spec.name, metrics, samples, plot)
    by_model = {w: metrics[w] for w in ("base", "tuned") if w in metrics}
    EventLog(layout.events).emit(EvalReportEvent(path=str(folder), metrics=by_model))
    if spec.tracking.report_to:
        ends = [e for e in read_events(layout.events) if isinstance(e, EndEvent)]
        trackers = TrackerRuns(spec, layout, log)
        trackers.log_eval(by_model, layout.eval_report, ends[-1].step if ends else None)
        trackers.finish()
    log(format_table(metrics))
    opened.publish(folder)  # a run in object storage gets its eval/ there too
    return EvalResult(metrics, opened.where(folder))


def eval_loss(model: Any, rows: list[Any], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean loss over the trained tokens of ``rows`` (the same tokens training scores)."""
    import torch

    from kubetune.data.collate import PadCollator

    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": r.input_ids, "labels": r.labels} for r in rows[k:k + batch_size]])
            n = int((batch["labels"][:, 1:] != -100).sum())  # causal shift: the first token is never a target
            if n:
                total += float(model(**batch).loss) * n
                count += n
    return total / count if count else float("nan")


def format_table(metrics: dict[str, Any]) -> str:
    models = [m for m in ("base", "tuned") if m in metrics]
    keys = [k for k in ("loss", "perplexity", "rouge1", "rouge2", "rougeL", "exact_match")
            if any(k in metrics[m] for m in models)]
    lines = [f"{'metric':<12}" + "".join(f"{m:>10}" for m in models)]
    for key in keys:
        lines.append(f"{key:<12}" + "".join(f"{metrics[m].get(key, float('nan')):>10.4f}" for m in models))
    return "\n".join(lines)


def evaluate_after_training(layout: RunLayout, say: Callable[[str], None]) -> None:
    """eval.metrics at the end of `kubetune train` (the launcher hands this to train): a failure of
    the evaluation keeps the trained run and says how to evaluate it again."""
    say("evaluating base vs tuned (eval.metrics)")
    try:
        evaluate_run(str(layout.root), log=say)
    except KubetuneError:
        raise
    except Exception as exc:
        raise TrainingError(f"training finished, but evaluation failed: {type(exc).__name__}: {exc}",
                            f"the trained run is complete in {layout.root}; rerun `kubetune eval {layout.root}`") from exc
