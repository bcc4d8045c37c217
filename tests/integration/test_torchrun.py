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
    assert start.world_size == 2 and start.per_device_batch == 2 and start.accumulation == 2
    # Each rank saves its own RNG state into every checkpoint: proof that both ranks reached the save.
    ckpt = out / "checkpoints" / "checkpoint-6"
    assert (ckpt / "COMPLETE").exists()
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    adapters = list(out.rglob("final/adapter/adapter_model.safetensors"))
    assert len(adapters) == 1
    ends = [e for e in read_events(out / "events.jsonl") if e.event == "end"]
    assert len(ends) == 1 and ends[0].step == 6  # events come from rank 0 only


@pytest.mark.long
def test_sigterm_under_torchrun_saves_on_every_rank_and_resumes(write_spec, tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    from tests.conftest import ROOT, kubetune_cmd, quiet_env

    spec = write_spec(name="ddpterm", data={"eval": None},
                      train={"max_steps": 400, "save_every_steps": 1000, "logging_steps": 10,
                             "total_batch_size": 8, "max_per_device_batch_size": 4},
                      resources={"accelerator": "cpu", "devices_per_node": 2})
    out = tmp_path / "runs" / "ddpterm"
    proc = subprocess.Popen(kubetune_cmd("train", str(spec)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=quiet_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not any(e.event == "step" for e in read_events(out / "events.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    (pre,) = [e for e in read_events(out / "events.jsonl") if e.event == "preempted"]
    saved = Path(pre.checkpoint)
    # both ranks stopped at the same step and wrote their part before the marker
    assert (saved / "COMPLETE").exists() and (saved / "rng_state_0.pth").exists() and (saved / "rng_state_1.pth").exists()
    res = run_kubetune("train", str(spec), timeout=400)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if any(w in ln for w in ("rror", "terminate", "abort"))]
    assert res.returncode == 0, "\n".join(errors[:40])
    assert f"resuming from {saved}" in res.stdout
    assert read_events(out / "events.jsonl")[-1].step == 400
