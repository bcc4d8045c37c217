"""SIGKILL a training process mid-run; the rerun continues from the newest COMPLETE checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kubetune.runs.checkpoints import latest_complete, list_checkpoints
from kubetune.artifacts.events import read_events
from tests.conftest import ROOT, kubetune_cmd, quiet_env, run_kubetune

pytestmark = pytest.mark.integration


def _wait_for_checkpoint(events: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        done = [e for e in read_events(events) if e.event == "checkpoint"]
        if done:
            return done[0].step
        time.sleep(0.05)
    raise AssertionError("no checkpoint within the timeout")


def test_sigkill_then_resume_continues_from_the_checkpoint(write_spec, tmp_path: Path) -> None:
    spec = write_spec(name="kill", data={"eval": None},
                      train={"max_steps": 300, "save_every_steps": 20, "logging_steps": 10, "keep_checkpoints": 3})
    out = tmp_path / "runs" / "kill"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(kubetune_cmd("train", str(spec)), stdout=log, stderr=subprocess.STDOUT, env=quiet_env(),
                            cwd=ROOT)
    try:
        _wait_for_checkpoint(out / "events.jsonl", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    resume_from = latest_complete(out / "checkpoints")
    assert resume_from is not None
    step_at_kill = int(resume_from.name.split("-")[1])
    assert step_at_kill < 300
    # A checkpoint folder the killed process had begun (no COMPLETE) must be ignored and removed.
    partial = out / "checkpoints" / "checkpoint-9990"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half-written")

    res = run_kubetune("train", str(spec))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming from {resume_from}" in res.stdout
    assert not partial.exists()
    events = read_events(out / "events.jsonl")
    starts = [i for i, e in enumerate(events) if e.event == "start"]
    assert len(starts) == 2 and events[starts[1]].resumed_from == str(resume_from)
    after = [e for e in events[starts[1]:] if e.event == "step"]
    assert after[0].step == step_at_kill + 10 - step_at_kill % 10  # the global step continues
    assert after[-1].step == 300 and events[-1].event == "end" and events[-1].step == 300
    assert all(ok for _, _, ok in list_checkpoints(out / "checkpoints"))
    assert (out / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_resume_never_refuses_to_overwrite(write_spec, tmp_path: Path) -> None:
    spec = write_spec(name="keep", train={"max_steps": 5, "save_every_steps": 5})
    assert run_kubetune("train", str(spec)).returncode == 0
    res = run_kubetune("train", str(spec), "--set", "resume=never")
    assert res.returncode == 2 and "does not overwrite saved work" in res.stderr
    assert (tmp_path / "runs" / "keep" / "final" / "COMPLETE").exists()


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_there(write_spec, tmp_path: Path) -> None:
    spec = write_spec(name="term", data={"eval": None},
                      train={"max_steps": 400, "save_every_steps": 1000, "logging_steps": 10})
    out = tmp_path / "runs" / "term"
    log = (tmp_path / "term.log").open("w")
    proc = subprocess.Popen(kubetune_cmd("train", str(spec)), stdout=log, stderr=subprocess.STDOUT, env=quiet_env(),
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not any(e.event == "step" for e in read_events(out / "events.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what Kubernetes sends before it kills a pod
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (tmp_path / "term.log").read_text()[-2000:]
    preempted = [e for e in read_events(out / "events.jsonl") if e.event == "preempted"]
    assert len(preempted) == 1
    step = preempted[0].step
    assert 10 <= step < 400
    saved = out / "checkpoints" / f"checkpoint-{step}"
    assert (saved / "COMPLETE").exists()  # saved at the signal, not at a save_every_steps boundary
    assert "saving a checkpoint after this step" in (tmp_path / "term.log").read_text()

    res = run_kubetune("train", str(spec))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming from {saved}" in res.stdout
    events = read_events(out / "events.jsonl")
    assert events[-1].event == "end" and events[-1].step == 400
