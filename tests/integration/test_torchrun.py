"""devices_per_node: 2 on CPU → torchrun with two gloo processes; both train, one adapter is saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from tests.conftest import run_kubetune

pytestmark = pytest.mark.integration


def test_two_processes_train_one_adapter(write_spec, tmp_path: Path) -> None:
    spec = write_spec(name="ddp", train={"max_steps": 6, "save_every_steps": 3, "logging_steps": 3,
                                         "total_batch_size": 8, "max_per_device_batch_size": 2},
                      resources={"accelerator": "cpu", "devices_per_node": 2})
    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "launching 2 processes with torchrun" in res.stdout
    out = tmp_path / "runs" / "ddp"
    start = read_events(out / "events.jsonl")[0]
    assert start["world_size"] == 2 and start["per_device_batch"] == 2 and start["accumulation"] == 2
    # Each rank saves its own RNG state into every checkpoint: proof that both ranks reached the save.
    ckpt = out / "checkpoints" / "checkpoint-6"
    assert (ckpt / "COMPLETE").exists()
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    adapters = list(out.rglob("final/adapter/adapter_model.safetensors"))
    assert len(adapters) == 1
    ends = [e for e in read_events(out / "events.jsonl") if e["event"] == "end"]
    assert len(ends) == 1 and ends[0]["step"] == 6  # events come from rank 0 only
