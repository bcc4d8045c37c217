"""Typed events: writers are strict, readers tolerant, and docs/events.md carries the schema.

Refresh the schema in the docs after an intended change:  KUBETUNE_REFRESH_GOLDEN=1 pytest tests/unit/test_events.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune.artifacts.events import (
    EvalReportEvent, EventLog, StartEvent, StepEvent, events_schema, parse_events, read_events,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"
FENCE = "```json\n"


def test_a_writer_cannot_misspell_a_field() -> None:
    with pytest.raises(ValidationError):
        StepEvent(step=1, total=10)  # type: ignore[call-arg]  # the bug this schema exists for: total vs total_steps


def test_round_trip_and_tolerant_reading(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.emit(StepEvent(step=3, total_steps=9, loss=1.5, eta_s=12.0))
    log.emit(EvalReportEvent(path="eval", metrics={"tuned": {"loss": float("nan"), "rougeL": 0.5}}))
    with (tmp_path / "events.jsonl").open("a") as fh:
        fh.write(json.dumps({"event": "step", "step": 4, "total_steps": 9, "added_by_a_newer_version": 1}) + "\n")
        fh.write(json.dumps({"event": "from_the_future", "x": 1}) + "\n")
        fh.write('{"event": "step", "step": 5, "tot')  # a line cut by a killed process
    events = read_events(tmp_path / "events.jsonl")
    assert [type(e).__name__ for e in events] == ["StepEvent", "EvalReportEvent", "StepEvent"]
    assert events[0].total_steps == 9 and events[0].eta_s == 12.0 and events[2].step == 4
    assert math.isnan(events[1].metrics["tuned"]["loss"])


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    EventLog(tmp_path / "e.jsonl", enabled=False).emit(StartEvent(
        name="x", train_rows=1, eval_rows=0, total_steps=1, per_device_batch=1, accumulation=1, world_size=2,
        mixed_precision="fp32"))
    assert not (tmp_path / "e.jsonl").exists() and parse_events([]) == []


def test_the_docs_carry_the_schema_of_every_event() -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(FENCE)
    schema = json.dumps(events_schema(), indent=2) + "\n"
    if os.environ.get("KUBETUNE_REFRESH_GOLDEN"):
        DOC.write_text(head + FENCE + schema + "```\n")
        text = DOC.read_text()
        head, _, rest = text.partition(FENCE)
    assert rest.removesuffix("```\n") == schema, f"{DOC} is stale: KUBETUNE_REFRESH_GOLDEN=1 pytest {__file__}"
    for kind in events_schema()["discriminator"]["mapping"]:
        assert f"`{kind}`" in head, f"docs/events.md does not describe the {kind} event"
