"""A job's result file, as OpenAI's `fine-tune-results`: step metrics as CSV, one row per logged step.

Columns are OpenAI's (`step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`), read
from the run's typed events: the training loss and mean token accuracy TRL logs at each logging
step, and the validation loss and accuracy of the evaluation at that step (empty between
evaluations, and for objectives that log no token accuracy). Written when the job succeeds, in
the update that marks it so, as one of the owner's files (it counts against the owner's stored bytes, as OpenAI's does).
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from pathlib import Path
from typing import Any

from kubetune.artifacts.events import EvalEvent, Event, StepEvent
from kubetune.control.files import new_file_id
from kubetune.control.records import Records
from kubetune.storage.store import Store

__all__ = ["COLUMNS", "RESULTS_PURPOSE", "publish_results", "step_metrics_csv"]

RESULTS_PURPOSE = "fine-tune-results"
COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def step_metrics_csv(events: list[Event]) -> tuple[str, int]:
    """The CSV text and its number of rows. A step logged twice (a resumed run repeats the steps after
    its checkpoint) keeps its last value: the one the model went on from."""
    steps: dict[int, StepEvent] = {}
    evals: dict[int, EvalEvent] = {}
    for e in events:
        if isinstance(e, StepEvent):
            steps[e.step] = e
        elif isinstance(e, EvalEvent):
            evals[e.step] = e
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for step in sorted(steps.keys() | evals.keys()):
        train, valid = steps.get(step), evals.get(step)
        writer.writerow([step, _num(train.loss if train else None),
                         _num((train.metrics or {}).get("mean_token_accuracy") if train else None),
                         _num(valid.loss if valid else None),
                         _num(valid.metrics.get("mean_token_accuracy") if valid else None)])
    return out.getvalue(), len(steps.keys() | evals.keys())


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def publish_results(records: Records, storage: str, job: dict[str, Any], events: list[Event]) -> dict[str, Any]:
    """Store the job's step metrics as a file of its owner (stored, then recorded); returns its record.
    The caller lists it in the job's result_files in the same update that marks the job succeeded."""
    text, rows = step_metrics_csv(events)
    file_id, name = new_file_id(), "step_metrics.csv"
    prefix = f"{storage.rstrip('/')}/files/{file_id}"
    with tempfile.TemporaryDirectory(prefix="kubetune-results-") as tmp:
        local = Path(tmp) / name
        local.write_text(text)
        Store(prefix).put(local, name)
    return records.add_file(id=file_id, owner=job["owner"], filename=name, purpose=RESULTS_PURPOSE,
                            bytes=len(text.encode()), rows=rows, uri=f"{prefix}/{name}", created_at=int(time.time()))
