"""Batch plan arithmetic and checkpoint completion/retention rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.runs.checkpoints import latest_complete, list_checkpoints, mark_complete, prune, remove_incomplete
from kubetune.errors import SpecError
from kubetune.train.batching import optimizer_steps, batch_shape


@pytest.mark.parametrize("total,max_dev,world,expect", [
    (16, 8, 1, (8, 2)), (16, 16, 1, (16, 1)), (8, 2, 1, (2, 4)), (16, 4, 2, (4, 2)),
    (12, 5, 1, (4, 3)), (7, 4, 1, (1, 7)), (32, 64, 4, (8, 1)),
])
def test_batch_shape(total: int, max_dev: int, world: int, expect: tuple[int, int]) -> None:
    plan = batch_shape(total, max_dev, world)
    assert (plan.per_device, plan.accumulation) == expect
    assert plan.total == total


def test_batch_shape_refuses_indivisible_world() -> None:
    with pytest.raises(SpecError) as info:
        batch_shape(10, 4, 3)
    assert str(info.value.problems[0]) == "train.total_batch_size: 10 is not divisible by the world size 3"


def test_optimizer_steps() -> None:
    assert optimizer_steps(100, 16, 1, -1) == 7
    assert optimizer_steps(100, 16, 2.5, -1) == 18
    assert optimizer_steps(100, 16, 1, 5) == 5


def _ckpt(folder: Path, step: int, complete: bool) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x")
    if complete:
        mark_complete(path, step)
    return path


def test_incomplete_checkpoints_do_not_exist_for_resume(tmp_path: Path) -> None:
    _ckpt(tmp_path, 10, True)
    _ckpt(tmp_path, 20, True)
    _ckpt(tmp_path, 30, False)  # killed mid-save
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-20"
    assert [p.name for p in remove_incomplete(tmp_path)] == ["checkpoint-30"]
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [10, 20]


def test_prune_keeps_newest_complete_and_never_a_newer_partial(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _ckpt(tmp_path, step, True)
    _ckpt(tmp_path, 5, False)   # old leftover: removed
    _ckpt(tmp_path, 40, False)  # being written right now: kept
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-5"]
    assert [(s, ok) for s, _, ok in list_checkpoints(tmp_path)] == [(20, True), (30, True), (40, False)]
    assert prune(tmp_path / "none", keep=1) == []
