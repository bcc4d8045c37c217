"""Reading a run never changes it. A run trains into S3 with a checkpoint every 2 steps while a
reader opens it in a loop (as eval, serve, chat and status do): no checkpoint marked COMPLETE may lack
a file. Then a trainer is SIGKILLed, its newest checkpoint is truncated in the bucket after its
COMPLETE was written, and the next run skips it (saying why) and resumes from the one before."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kubetune.runs.checkpoints import listing
from kubetune.runs.run import Run
from kubetune.runs.view import RunView
from kubetune.storage.store import Store
from tests.conftest import kubetune_cmd
from tests.s3_runs import BUCKET, assert_complete_means_complete, fresh_env, run, spec_file
from tests.servers import S3Server

pytestmark = pytest.mark.integration

TRAIN = {"total_batch_size": 8, "max_per_device_batch_size": 8, "logging_steps": 10, "learning_rate": 3e-3}


@pytest.mark.long
def test_readers_of_a_training_run_never_delete_its_checkpoints(
        tmp_path: Path, s3: S3Server, staged: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    name = "hammered"
    # every checkpoint kept: retention would otherwise delete the evidence before the check at the end
    spec = spec_file(tmp_path, name, staged, 60, train={**TRAIN, "max_steps": 60, "save_every_steps": 2,
                                                          "keep_checkpoints": 1000})
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_WORKDIR", str(tmp_path / "reader"))
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "reader-cache"))
    uri = f"s3://{BUCKET}/runs/{name}"
    trainer = subprocess.Popen(kubetune_cmd("train", str(spec)), env=fresh_env(s3, tmp_path / "trainer"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reads, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                Run.open(uri)             # eval, serve, chat: what they load
                view = RunView(uri)       # status, sweep status, the dashboard and the control plane
                view.events(), view.checkpoints(), view.eval_metrics()
                reads.append(time.time())
            except Exception:  # noqa: BLE001 - before the trainer wrote spec.yaml
                time.sleep(0.05)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        out, _ = trainer.communicate(timeout=600)
    finally:
        stop.set()
        for reader in readers:
            reader.join(60)
    assert trainer.returncode == 0, out
    assert len(reads) > 10, len(reads)  # the run was read all along
    assert_complete_means_complete(s3, name)
    ckpts = listing(Store(uri))
    assert len(ckpts) == 30 and all(c.ok for c in ckpts), [c for c in ckpts if not c.ok]


def test_a_checkpoint_that_does_not_match_its_marker_is_skipped_on_resume(
        tmp_path: Path, s3: S3Server, staged: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    name = "corrupted"
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    spec = spec_file(tmp_path, name, staged, 100_000, train={**TRAIN, "max_steps": 100_000, "save_every_steps": 10,
                                                              "keep_checkpoints": 3})
    env = fresh_env(s3, tmp_path / "first", KUBETUNE_LEASE_SECONDS="3")
    trainer = subprocess.Popen(kubetune_cmd("train", str(spec)), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    store = Store(f"s3://{BUCKET}/runs/{name}")
    try:
        deadline = time.time() + 300
        while len([c for c in listing(store) if c.ok]) < 2:
            assert time.time() < deadline and trainer.poll() is None, "no two checkpoints stored"
            time.sleep(0.2)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    complete = [c.step for c in listing(store) if c.ok]
    newest, before = complete[-1], complete[-2]
    s3.client().put_object(Bucket=BUCKET, Key=f"runs/{name}/checkpoints/checkpoint-{newest}/adapter_model.safetensors",
                           Body=b"truncated")
    again = run(["train", str(spec), "--wait", "--set", f"train.max_steps={newest + 10}"], s3, tmp_path / "second",
                KUBETUNE_LEASE_SECONDS="3")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert f"checkpoint-{newest}" in said and "is skipped" in said and "adapter_model.safetensors has 9 bytes" in said
    assert f"checkpoint-{before} (complete)" in said  # resumed from the one before, the corrupted one never loaded
    assert s3.keys(BUCKET, f"runs/{name}/final/COMPLETE")


def test_a_verb_that_writes_into_a_remote_run_takes_its_lease_and_appends_its_events(
        tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # eval and merge publish into a finished run; the copy they opened may miss the trainer's last lines
    # (its final upload lands after the copy was pulled): the stored log keeps them, and this verb's
    # event is appended; while a trainer still holds the lease, the verb waits for it
    import yaml

    from kubetune.artifacts.events import EventLog, EvalReportEvent
    from kubetune.runs.lease import lease_for

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_WORKDIR", str(tmp_path / "reader"))
    monkeypatch.setenv("KUBETUNE_LEASE_SECONDS", "30")
    uri = f"s3://{BUCKET}/runs/published"
    store = Store(uri)
    store.write_text("spec.yaml", yaml.safe_dump({"name": "published", "model": {"base": "hf://org/m"},
                                                  "data": {"train": "d.jsonl"}, "output": uri}))
    trainer_lines = ['{"event": "start", "time": "2026-12-06T00:00:00Z", "run": "published", "spec_hash": "x"}']
    store.write_text("events.jsonl", "\n".join(trainer_lines) + "\n")
    opened = Run.open(uri)
    trainer = lease_for(uri, Store(uri), "trainer-pod", 30, lambda _: None)
    trainer.acquire(wait=False)
    late = '{"event": "note", "time": "2026-12-06T00:00:09Z", "message": "the trainer\'s last line"}'
    store.write_text("events.jsonl", "\n".join(trainer_lines + [late]) + "\n")  # after the copy was pulled
    (opened.layout.eval).mkdir(parents=True, exist_ok=True)
    (opened.layout.eval / "metrics.json").write_text('{"rougeL": 0.5}')
    EventLog(opened.layout.events).emit(EvalReportEvent(path="eval/report.md", metrics={"tuned": {"rougeL": 0.5}}))
    done = threading.Event()
    writer = threading.Thread(target=lambda: (opened.publish(opened.layout.eval), done.set()))
    writer.start()
    time.sleep(3)
    waited = not done.is_set() and not store.exists("eval/metrics.json")
    trainer.release()
    writer.join(60)
    assert waited and done.is_set()
    stored = store.read_text("events.jsonl").splitlines()
    assert stored[:2] == trainer_lines + [late] and len(stored) == 3  # nothing of the trainer's lost
    assert '"event":"eval_report"' in stored[2].replace(" ", "")
    assert store.read_text("eval/metrics.json") == '{"rougeL": 0.5}'
    assert not store.exists(".lease") or "trainer-pod" not in store.read_text(".lease")
