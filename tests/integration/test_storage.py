"""Object-storage runs against a real S3 server on 127.0.0.1 (moto_server; MinIO when
KUBETUNE_TEST_S3_ENDPOINT is set): stage, resume on a fresh machine after SIGKILL, an outage
during training, an endpoint that never comes back, pre-flight errors, no leaked credentials."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kubetune.artifacts.events import parse_events
from kubetune.errors import EXIT_TRANSIENT
from tests.conftest import QUICKSTART_DATA, kubetune_cmd
from tests.s3_runs import (
    BUCKET, assert_complete_means_complete, fresh_env, remote_checkpoints, run, spec_file,
)
from tests.servers import Relay, S3Server, start_s3_with_auth

pytestmark = pytest.mark.integration


def train_behind_relay(s3: S3Server, staged: dict[str, str], tmp: Path, name: str, steps: int,
                       separate_stderr: bool = False, **env: str) -> tuple[Relay, subprocess.Popen[str], Path]:
    """Start training with the S3 endpoint behind a relay the test can cut; return once a complete
    checkpoint is in the bucket."""
    if s3.proc is None:
        pytest.skip("outages are simulated with a relay in front of a local moto_server")
    relay = Relay(int(s3.endpoint.rsplit(":", 1)[1]))
    spec = spec_file(tmp, name, staged, steps)
    home = tmp / "m"
    home.mkdir()
    proc = subprocess.Popen(kubetune_cmd("train", str(spec)), cwd=home, env=fresh_env(s3, home, relay.endpoint, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not any("COMPLETE" in f for f in remote_checkpoints(s3, name).values()):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    return relay, proc, home


def test_stage_copied_the_inputs_skips_identical_and_excluded_files(s3: S3Server, staged: dict[str, str]) -> None:
    keys = s3.keys(BUCKET, "inputs/")
    assert "inputs/models/tiny-llama/config.json" in keys and "inputs/data/train.jsonl" in keys
    assert not any("original/" in k for k in keys)  # excluded by default
    tmp = Path(staged["stage_dir"])
    res = run(["stage", "--model", staged["local_model"], "--data", str(QUICKSTART_DATA / "train.jsonl"),
               "--to", f"s3://{BUCKET}/inputs"], s3, tmp)
    assert res.returncode == 0 and "copied 0 file(s)" in res.stdout, res.stdout + res.stderr


def test_stage_from_a_spec_with_a_data_script(s3: S3Server, staged: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "make_data.py"
    script.write_text("import json, os, sys\n"
                      "with open(os.environ['KUBETUNE_OUTPUT'], 'w') as f:\n"
                      "    for i in range(int(sys.argv[1])):\n"
                      "        f.write(json.dumps({'messages': [{'role': 'user', 'content': f'{i}+1?'},"
                      " {'role': 'assistant', 'content': str(i + 1)}]}) + '\\n')\n")
    spec = spec_file(tmp_path, "scripted", staged, 1, stage={"data": [{"script": str(script), "args": ["25"]}]})
    body = yaml.safe_load(spec.read_text())
    body["data"]["train"] = f"s3://{BUCKET}/inputs/data/generated.jsonl"
    spec.write_text(yaml.safe_dump(body))
    res = run(["stage", str(spec)], s3, tmp_path)
    assert res.returncode == 0, res.stderr
    text = s3.client().get_object(Bucket=BUCKET, Key="inputs/data/generated.jsonl")["Body"].read().decode()
    assert len(text.splitlines()) == 25
    res = run(["validate", str(spec)], s3, tmp_path)  # the run reads it straight from the bucket
    assert res.returncode == 0 and "25" in res.stdout, res.stdout + res.stderr


@pytest.mark.long
def test_sigkill_then_resume_on_a_fresh_machine(s3: S3Server, staged: dict[str, str], tmp_path: Path) -> None:
    name = "resume-anywhere"
    spec = spec_file(tmp_path, name, staged, 120)
    first = tmp_path / "machine-1"
    proc = subprocess.Popen(kubetune_cmd("train", str(spec)), cwd=first if first.mkdir() is None else first,
                            env=fresh_env(s3, first), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.time() + 180, []
    while time.time() < deadline and proc.poll() is None:
        seen = [c for c, files in remote_checkpoints(s3, name).items() if "COMPLETE" in files]
        if seen:
            break
        time.sleep(0.1)
    assert seen and proc.poll() is None, "no checkpoint reached the bucket while training ran"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_complete_means_complete(s3, name)
    reached = max(int(c.split("-")[1]) for c, f in remote_checkpoints(s3, name).items() if "COMPLETE" in f)

    second = tmp_path / "machine-2"
    res = run(["train", str(spec)], s3, second)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    resumed = [line for line in res.stdout.splitlines() if line.startswith("resuming from ")]
    assert resumed, res.stdout
    step = int(resumed[0].rsplit("-", 1)[1])
    assert resumed[0] == f"resuming from s3://{BUCKET}/runs/{name}/checkpoints/checkpoint-{step}" and step >= reached
    assert "step 120/120" in res.stdout
    keys = s3.keys(BUCKET, f"runs/{name}/")
    for key in ("final/adapter/adapter_model.safetensors", "final/adapter/chat_template.jinja", "final/COMPLETE",
                "events.jsonl", "spec.yaml", "manifest.json"):
        assert f"runs/{name}/{key}" in keys
    assert_complete_means_complete(s3, name)
    assert len(remote_checkpoints(s3, name)) <= 2  # keep_checkpoints applies in the bucket
    events = parse_events(s3.client().get_object(
        Bucket=BUCKET, Key=f"runs/{name}/events.jsonl")["Body"].read().decode().splitlines())
    starts = [e for e in events if e.event == "start"]
    assert starts[-1].resumed_from and events[-1].event == "end" and events[-1].step == 120
    # the global step continued: no step of the second start is at or below the resume point
    after = events[events.index(starts[-1]):]
    assert min(e.step for e in after if e.event == "step") > step

    # credentials appear nowhere the run writes or prints
    written = res.stdout + res.stderr + "".join(
        s3.client().get_object(Bucket=BUCKET, Key=f"runs/{name}/{k}")["Body"].read().decode()
        for k in ("events.jsonl", "spec.yaml", "manifest.json"))
    assert s3.secret not in written and s3.key_id not in written

    # a run in the bucket is evaluated from its URI, on yet another machine; eval/ lands in the bucket
    res = run(["eval", f"s3://{BUCKET}/runs/{name}", "--no-base"], s3, tmp_path / "machine-3", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"written: s3://{BUCKET}/runs/{name}/eval/metrics.json" in res.stdout
    assert f"runs/{name}/eval/metrics.json" in s3.keys(BUCKET, f"runs/{name}/eval/")
    res = run(["merge", f"s3://{BUCKET}/runs/{name}"], s3, tmp_path / "machine-4", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"merged into s3://{BUCKET}/runs/{name}/final/merged" in res.stdout
    assert f"runs/{name}/final/merged/model.safetensors" in s3.keys(BUCKET, f"runs/{name}/final/merged/")


def test_outage_during_training_retries_and_every_checkpoint_completes(s3: S3Server, staged: dict[str, str],
                                                                       tmp_path: Path) -> None:
    name = "outage"
    relay, proc, _ = train_behind_relay(s3, staged, tmp_path, name, 80)
    relay.cut()
    time.sleep(10)
    alive_during_outage = proc.poll() is None
    relay.restore()
    out, _ = proc.communicate(timeout=300)
    relay.cut()
    assert proc.returncode == 0, out[-3000:]
    assert "retrying with backoff" in out and "reachable again" in out
    assert alive_during_outage or "step 80/80" in out
    assert_complete_means_complete(s3, name)
    assert f"runs/{name}/final/COMPLETE" in s3.keys(BUCKET, f"runs/{name}/")


@pytest.mark.long
def test_storage_that_never_comes_back_is_a_clear_error_and_local_checkpoints_stay(
        s3: S3Server, staged: dict[str, str], tmp_path: Path) -> None:
    name = "gone"
    relay, proc, home = train_behind_relay(s3, staged, tmp_path, name, 40, separate_stderr=True,
                                           KUBETUNE_UPLOAD_RETRY_SECONDS="4")
    relay.cut()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_TRANSIENT, out[-2000:] + err[-2000:]  # infrastructure: the Job retries it
    assert f"uploading to s3://{BUCKET}/runs/{name} failed" in err and "Traceback" not in err
    work = list((home / "work").iterdir())[0]
    local = sorted((work / "checkpoints").glob("checkpoint-*"))
    assert local and all((c / "COMPLETE").exists() for c in local)
    assert (work / "final" / "COMPLETE").exists()


@pytest.mark.parametrize("case", ["missing-bucket", "missing-model", "wrong-credentials"])
def test_preflight_names_the_uri_before_training(case: str, s3: S3Server, staged: dict[str, str],
                                                 tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "preflight", staged, 10)
    body = yaml.safe_load(spec.read_text())
    server, endpoint, extra = s3, None, {}
    if case == "missing-bucket":
        body["output"] = "s3://no-such-bucket-here/runs/x"
        expected = "output s3://no-such-bucket-here/runs/x"
    elif case == "missing-model":
        body["model"]["base"] = f"s3://{BUCKET}/inputs/models/not-there"
        expected = f"model.base s3://{BUCKET}/inputs/models/not-there: not found"
    else:
        server = start_s3_with_auth("guarded")
        body["output"] = "s3://guarded/runs/x"
        expected = "output s3://guarded/runs/x: the storage credentials were rejected"
        extra = {"AWS_SECRET_ACCESS_KEY": "planted-wrong-secret-value"}
    spec.write_text(yaml.safe_dump(body))
    started = time.time()
    try:
        res = run(["train", str(spec)], server, tmp_path, endpoint, **extra)
    finally:
        if server is not s3:
            server.stop()
    assert res.returncode == 2, res.stdout + res.stderr  # not 1: a configuration error, not a training failure
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert "step " not in res.stdout and time.time() - started < 60
    assert "planted-wrong-secret-value" not in res.stdout + res.stderr


def test_fetch_reuses_the_cache_and_verifies(s3: S3Server, staged: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.storage.fetch import fetch

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    seen: list[tuple[str, bool]] = []
    first = fetch(staged["model"], on_file=lambda key, fresh: seen.append((key, fresh)))
    assert (first / "config.json").exists() and all(fresh for _, fresh in seen)
    seen.clear()
    assert fetch(staged["model"], on_file=lambda key, fresh: seen.append((key, fresh))) == first
    assert seen and not any(fresh for _, fresh in seen)  # nothing downloaded the second time


def test_push_publishes_the_adapter_to_the_hub_and_a_bucket(s3: S3Server, tmp_path: Path, tiny_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub is not reachable here: HfApi is replaced by a recorder with its real method signatures."""
    from kubetune.runs.push import push

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "runs" / "p"
    adapter = run_dir / "final" / "adapter"
    adapter.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump({"name": "p", "model": {"base": str(tiny_model)},
                                                       "data": {"train": "x.jsonl"}}))
    for f in ("tokenizer_config.json", "tokenizer.json", "adapter_config.json"):
        (adapter / f).write_text("{}")

    class RecordingApi:
        calls: list[tuple[str, dict]] = []

        def create_repo(self, repo_id: str, **kw: object) -> None:
            self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw: object) -> object:
            self.calls.append(("upload_folder", kw))
            return type("Commit", (), {"commit_url": "https://huggingface.co/org/p/commit/abc"})()

        def upload_file(self, *, path_or_fileobj: object, path_in_repo: str, repo_id: str, **kw: object) -> None:
            self.calls.append(("upload_file", {"path_in_repo": path_in_repo, "repo_id": repo_id,
                                               "content": path_or_fileobj}))

    api = RecordingApi()
    assert push(str(run_dir), "hf://org/p", api=api, log=lambda _m: None) == "https://huggingface.co/org/p/commit/abc"
    assert api.calls[0] == ("create_repo", {"repo_id": "org/p", "repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][1]["folder_path"] == str(adapter) and api.calls[1][1]["repo_id"] == "org/p"
    card = api.calls[2][1]
    assert card["path_in_repo"] == "README.md" and b"library_name: peft" in card["content"]  # type: ignore[operator]
    push(str(run_dir), f"s3://{BUCKET}/published/p", log=lambda _m: None)
    assert {"published/p/adapter_config.json", "published/p/README.md"} <= set(s3.keys(BUCKET, "published/p/"))
