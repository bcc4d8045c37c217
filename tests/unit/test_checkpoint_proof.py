"""A checkpoint proves itself: COMPLETE lists every file with its size, and a checkpoint whose files
do not match it is skipped (with the reason) and never loaded; the writer removes it only once a valid
checkpoint is newer (a cut-short removal), like a save killed before its marker."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.runs.checkpoints import (latest_complete, list_checkpoints, mark_complete, mismatch,
                                            remove_incomplete, skipped, verify)


def checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    (path / "nested").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * (100 + step))
    (path / "nested" / "shard.distcp").write_bytes(b"s" * 7)
    (path / ".metadata").write_text("{}")
    if complete:
        mark_complete(path, step)
    return path


def test_the_marker_lists_every_file_with_its_size(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, 10)
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 10 and marker["files"] == {".metadata": 2, "adapter_model.safetensors": 110,
                                                        "nested/shard.distcp": 7}
    assert verify(path) is None


def test_a_truncated_or_missing_file_is_skipped_with_the_reason_and_kept(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10)
    truncated = checkpoint(tmp_path, 20)
    gone = checkpoint(tmp_path, 30)
    checkpoint(tmp_path, 40, complete=False)  # a killed save: garbage
    (truncated / "adapter_model.safetensors").write_bytes(b"w" * 3)
    (gone / "nested" / "shard.distcp").unlink()
    assert [(s, ok) for s, _, ok in list_checkpoints(tmp_path)] == [(10, True), (20, False), (30, False), (40, False)]
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-10"
    assert skipped(tmp_path) == [(20, "adapter_model.safetensors has 3 bytes, COMPLETE says 120"),
                                 (30, "nested/shard.distcp is missing")]
    # the writer cleans what a killed save or a cut-short removal left behind, once a valid checkpoint is newer
    assert remove_incomplete(tmp_path) == [tmp_path / "checkpoint-40"]  # 20 and 30: no valid checkpoint after them
    checkpoint(tmp_path, 50)
    assert sorted(p.name for p in remove_incomplete(tmp_path)) == ["checkpoint-20", "checkpoint-30"]
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [10, 50]


def test_older_markers_and_unreadable_ones(tmp_path: Path) -> None:
    assert mismatch(json.dumps({"step": 5, "time": 1.0}), {}) is None  # written before markers listed files
    assert mismatch("not json", {}) == "its COMPLETE marker is not readable"
    assert mismatch(json.dumps({"files": {"a": 1}}), {"a": 1, "extra": 9}) is None  # extra files are not loaded


def test_the_control_plane_offers_only_checkpoints_that_prove_themselves(tmp_path: Path) -> None:
    from kubetune.runs.view import RunView

    run = tmp_path / "run"
    checkpoint(run / "checkpoints", 10)
    bad = checkpoint(run / "checkpoints", 20)
    checkpoint(run / "checkpoints", 30, complete=False)
    (bad / "adapter_model.safetensors").write_bytes(b"")
    assert RunView(str(run)).complete_steps() == [10]  # listed by the API, continued by ft:...:ckpt-step-N


def test_the_writers_rules_are_one_for_folders_and_stores() -> None:
    from kubetune.runs.checkpoints import CheckpointState, beyond_retention, garbage_before_resume

    listing = [CheckpointState(s, state) for s, state in
               [(10, "ok"), (20, "mismatch"), (30, "ok"), (40, "unmarked"), (50, "ok"), (60, "mismatch"), (70, "unmarked")]]
    # before resume: every unmarked one; a mismatch only when a valid checkpoint is newer (60 stays, for a person)
    assert garbage_before_resume(listing) == [20, 40, 70]
    # retention (keep 2): complete ones beyond the newest two, and anything not complete older than the newest
    assert beyond_retention(listing, keep=2) == [10, 20, 40]
    assert beyond_retention(listing, keep=2, protect={10}) == [20, 40]
    assert beyond_retention(listing, keep=0) == [10, 20, 30, 40]  # never fewer than the newest complete
    assert beyond_retention([CheckpointState(5, "unmarked")], keep=1) == [] and garbage_before_resume([]) == []


def test_a_stored_key_that_would_leave_the_run_folder_is_refused_with_a_reason(tmp_path: Path) -> None:
    import pytest

    from kubetune.errors import UsageError
    from kubetune.runs.layout import RunLayout

    layout = RunLayout(tmp_path / "run")
    assert layout.path("final/adapter/x") == tmp_path / "run" / "final" / "adapter" / "x"
    for key in ("../elsewhere", "final/../../x", "/etc/passwd"):
        with pytest.raises(UsageError, match="outside the run's folder"):
            layout.path(key)
