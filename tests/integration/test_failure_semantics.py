"""Failure semantics a cluster can rely on, tried as it happens there: storage that does not answer
(exit 75, retried by the Job), two trainers on one output (one writer), a killed holder's lease taken
over after it lapses, a device that is not there (exit 2), and a chaos run killed five times."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kubetune.artifacts.events import LeaseEvent, StartEvent, StepEvent, parse_events
from kubetune.errors import EXIT_TRANSIENT, EXIT_USAGE
from tests.conftest import kubetune_cmd
from tests.s3_runs import (
    BUCKET, CKPT_FILES, assert_complete_means_complete, fresh_env, remote_checkpoints, run, spec_file,
)
from tests.servers import S3Server, start_s3

pytestmark = pytest.mark.integration


def bucket_events(s3: S3Server, name: str) -> list:
    body = s3.client().get_object(Bucket=BUCKET, Key=f"runs/{name}/events.jsonl")["Body"].read().decode()
    return parse_events(body.splitlines())


def start_training(spec: Path, s3: S3Server, home: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """`kubetune train` in its own process group (so the whole trainer, uploads included, can be killed)."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(kubetune_cmd("train", str(spec), *args), cwd=home, env=fresh_env(s3, home, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen[str] | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the trainer exited ({proc.returncode}) first:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_preflight_against_storage_that_does_not_answer_is_transient_75(staged: dict[str, str], tmp_path: Path) -> None:
    dead = start_s3()  # a real server, then stopped: its port refuses connections
    dead.stop()
    spec = spec_file(tmp_path, "blip", staged, 10)
    started = time.time()
    res = run(["train", str(spec)], dead, tmp_path / "m", KUBETUNE_PREFLIGHT_RETRIES="3")
    assert res.returncode == EXIT_TRANSIENT, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"output s3://{BUCKET}/runs/blip" in res.stderr and "cannot connect to the storage endpoint" in res.stderr
    assert res.stdout.count("retrying in") == 2  # 3 attempts with backoff, then the transient code
    assert "Traceback" not in res.stderr and "step " not in res.stdout and time.time() - started < 60
    res = run(["validate", str(spec)], dead, tmp_path / "m", KUBETUNE_PREFLIGHT_RETRIES="1")
    assert res.returncode == EXIT_TRANSIENT and "Traceback" not in res.stderr


def test_two_trainers_on_one_output_exactly_one_trains(s3: S3Server, staged: dict[str, str], tmp_path: Path) -> None:
    name = "onewriter"
    spec = spec_file(tmp_path, name, staged, 150)
    a = start_training(spec, s3, tmp_path / "a", KUBETUNE_LEASE_HOLDER="trainer-a")
    try:
        wait_for(lambda: any(k.endswith(f"runs/{name}/.lease") for k in s3.keys(BUCKET, f"runs/{name}/")), a)
        b = run(["train", str(spec)], s3, tmp_path / "b", KUBETUNE_LEASE_HOLDER="trainer-b")
        assert b.returncode == EXIT_TRANSIENT, b.stdout[-2000:] + b.stderr[-2000:]
        assert f"run s3://{BUCKET}/runs/{name} is being written by trainer-a" in b.stderr
        assert "--wait" in b.stderr and "Traceback" not in b.stderr
        waiter = start_training(spec, s3, tmp_path / "c", "--wait", KUBETUNE_LEASE_HOLDER="trainer-c")
        out_a, _ = a.communicate(timeout=300)
        assert a.returncode == 0, out_a[-3000:]
        out_c, _ = waiter.communicate(timeout=300)
    finally:
        for p in (a,):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert waiter.returncode == 0, out_c[-3000:]
    assert "waiting for trainer-a to finish writing" in out_c and "already finished" in out_c
    events = bucket_events(s3, name)
    assert sum(isinstance(e, StartEvent) for e in events) == 1  # nobody else ever started training it
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert steps == sorted(set(steps)) and steps[-1] == 150
    assert not any(k.endswith("/.lease") for k in s3.keys(BUCKET, f"runs/{name}/"))  # released at the end


@pytest.mark.long
def test_a_killed_holders_lease_is_taken_over_after_it_lapses(s3: S3Server, staged: dict[str, str],
                                                              tmp_path: Path) -> None:
    import json

    name = "takeover"
    spec = spec_file(tmp_path, name, staged, 120)
    a = start_training(spec, s3, tmp_path / "a", KUBETUNE_LEASE_HOLDER="node-a", KUBETUNE_LEASE_SECONDS="6")
    wait_for(lambda: any("COMPLETE" in f for f in remote_checkpoints(s3, name).values()), a)
    os.killpg(a.pid, signal.SIGKILL)  # like an OOM kill: no chance to release anything
    a.wait()
    lease = json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"runs/{name}/.lease")["Body"].read())
    assert lease["name"] == "node-a"
    res = run(["train", str(spec), "--wait"], s3, tmp_path / "b", KUBETUNE_LEASE_HOLDER="node-b",
              KUBETUNE_LEASE_SECONDS="6")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "took over the run's lease from node-a" in res.stdout
    assert f"resuming from s3://{BUCKET}/runs/{name}/checkpoints/checkpoint-" in res.stdout
    events = bucket_events(s3, name)
    (taken,) = [e for e in events if isinstance(e, LeaseEvent)]
    assert taken.holder == "node-b" and taken.taken_over_from == "node-a"
    assert taken.time >= lease["expires"]  # not before the holder's lease had lapsed
    assert [e for e in events if isinstance(e, StepEvent)][-1].step == 120


def test_asking_for_a_device_that_is_not_here_is_exit_2(write_spec, cli) -> None:
    for accelerator, what in (("nvidia", "NVIDIA GPU"), ("gaudi", "Intel Gaudi"), ("amd", "AMD GPU")):
        code, out, err = cli("train", str(write_spec(name=f"dev-{accelerator}")), "--set",
                             f"resources.accelerator={accelerator}")
        assert code == EXIT_USAGE, err
        assert f"resources.accelerator is {accelerator}, but this machine has only a CPU" in err, err
        assert what in err and "Traceback" not in err and "step " not in out


def stored_events(s3: S3Server, name: str) -> list:
    return bucket_events(s3, name) if f"runs/{name}/events.jsonl" in s3.keys(BUCKET, f"runs/{name}/") else []


def starts_in(events: list) -> list[int]:
    return [i for i, e in enumerate(events) if isinstance(e, StartEvent)]


def training_here(home: Path, starts_before: int) -> bool:
    """This attempt (not the one before it, whose events it pulled) has logged a training step."""
    for path in (home / "work").rglob("events.jsonl"):
        events = parse_events(path.read_text().splitlines())
        starts = starts_in(events)
        if len(starts) > starts_before and any(isinstance(e, StepEvent) for e in events[starts[-1]:]):
            return True
    return False


@pytest.mark.long
def test_chaos_five_kills_at_random_moments_then_the_run_finishes(s3: S3Server, staged: dict[str, str],
                                                                  tmp_path: Path) -> None:
    name = "chaos"
    steps = 1500  # ~30 s of training here: no attempt can finish inside its kill window
    seed = int(os.environ.get("KUBETUNE_CHAOS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    spec = spec_file(tmp_path, name, staged, steps)
    body = yaml.safe_load(spec.read_text())
    body["train"].update(save_every_steps=25, logging_steps=5, keep_checkpoints=2)
    spec.write_text(yaml.safe_dump(body))
    moments, befores = [], []
    for attempt in range(5):  # each restart: a new machine (HOME, cache, working folder)
        home = tmp_path / f"machine-{attempt}"
        starts_before = len(starts_in(stored_events(s3, name)))
        befores.append(starts_before)
        proc = start_training(spec, s3, home)
        started = time.time()
        if attempt % 2:  # every other kill lands while training: after its first step, at a random moment
            wait_for(lambda: training_here(home, starts_before), proc, timeout=120)
            moment = time.time() - started + rng.uniform(0.0, 3.0)
        else:  # anywhere from start-up (pre-flight, lease, pull, model load) into training
            moment = rng.uniform(0.5, 14.0)
        moments.append(round(moment, 2))
        try:
            proc.wait(timeout=max(0.0, moment - (time.time() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = run(["train", str(spec)], s3, tmp_path / "machine-last", timeout=600)
    context = f"seed {seed}, kills at {moments} s\n{res.stdout[-3000:]}{res.stderr[-2000:]}"
    assert res.returncode == 0, context

    events = bucket_events(s3, name)
    segment_start, last_step = None, None
    for e in events:
        if isinstance(e, StartEvent):
            segment_start, last_step = e, None
            resumed = int(e.resumed_from.rsplit("-", 1)[1]) if e.resumed_from else 0
            last_step = resumed
        elif isinstance(e, StepEvent):
            assert segment_start is not None, context
            assert e.step > last_step, f"step {e.step} after {last_step} in one segment; {context}"
            last_step = e.step
    assert last_step == steps, context
    # Two kills landed mid-training: each of those machines' own event log shows its start and a step. (The
    # bucket's log need not: a killed attempt's events reach it with its next upload, which a kill can beat.)
    trained = [a for a in range(5) if training_here(tmp_path / f"machine-{a}", befores[a])]
    assert len(trained) >= 2 and {1, 3} <= set(trained), (trained, context)
    print(f"chaos: seed {seed}, kills at {moments} s, {sum(isinstance(e, StartEvent) for e in events)} starts, "
          f"resumed from {[e.resumed_from.rsplit('/', 1)[1] for e in events if isinstance(e, StartEvent) and e.resumed_from]}")
    assert_complete_means_complete(s3, name)
    ckpts = remote_checkpoints(s3, name)
    assert ckpts and all("COMPLETE" in files for files in ckpts.values()), (ckpts, context)
    assert all(CKPT_FILES <= files for files in ckpts.values())
    keys = s3.keys(BUCKET, f"runs/{name}/")
    assert f"runs/{name}/final/adapter/adapter_model.safetensors" in keys and f"runs/{name}/final/COMPLETE" in keys
    assert not any(k.endswith("/.lease") for k in keys)
