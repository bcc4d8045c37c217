"""The reader's view of a run reads the same from a local folder and from its copy in S3 — spec,
events, checkpoints with their proofs, eval results, what it serves — through the one checkpoint
lister, and reading it changes nothing: no key added or removed, no working copy made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.artifacts.events import EventLog, StartEvent, StepEvent
from kubetune.runs.checkpoints import CheckpointState, listing, mark_complete
from kubetune.runs.layout import RUN_KEYS, RunLayout
from kubetune.runs.view import RunView
from kubetune.spec.load import load_spec, spec_to_yaml
from kubetune.storage.store import Store
from tests.s3_runs import BUCKET
from tests.servers import S3Server

pytestmark = pytest.mark.integration


def _run_folder(root: Path, spec_path: Path) -> RunLayout:
    """A run as its writers leave it: the resolved spec, events, three checkpoints (one whose file was
    truncated after COMPLETE, one a killed save left unmarked), eval metrics and samples."""
    layout = RunLayout(root)
    root.mkdir(parents=True)
    layout.spec.write_text(spec_to_yaml(load_spec(spec_path)))
    log = EventLog(layout.events)
    log.emit(StartEvent(name="viewed", train_rows=8, eval_rows=0, total_steps=30, per_device_batch=2,
                        accumulation=1, world_size=1, mixed_precision="fp32"))
    for step in (10, 20, 30):
        folder = layout.checkpoint(step)
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"w" * (1000 + step))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if step != 30:
            mark_complete(folder, step)
        log.emit(StepEvent(step=step, total_steps=30, loss=2.0 - step / 30))
    (layout.checkpoint(20) / "adapter_model.safetensors").write_bytes(b"cut")
    layout.eval.mkdir()
    layout.eval_metrics.write_text(json.dumps({"tuned": {"loss": 1.25}}))
    layout.eval_samples.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(3)) + "\n")
    return layout


def test_a_run_reads_the_same_from_a_folder_and_from_s3_and_reading_writes_nothing(
        tmp_path: Path, s3: S3Server, write_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    workdir = tmp_path / "work"
    monkeypatch.setenv("KUBETUNE_WORKDIR", str(workdir))
    layout = _run_folder(tmp_path / "viewed", write_spec(name="viewed"))
    client = s3.client()
    for file in sorted(p for p in layout.root.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"runs/viewed/{file.relative_to(layout.root).as_posix()}",
                          Body=file.read_bytes())
    stored = s3.keys(BUCKET, "runs/viewed/")
    local_files = sorted(p for p in layout.root.rglob("*"))

    expected = [CheckpointState(10, "ok"),
                CheckpointState(20, "mismatch", "adapter_model.safetensors has 3 bytes, COMPLETE says 1,020"),
                CheckpointState(30, "unmarked")]
    for uri in (str(layout.root), f"s3://{BUCKET}/runs/viewed"):
        view = RunView(uri)
        assert listing(Store(uri)) == expected == view.checkpoints(), uri
        assert view.complete_steps() == [10]
        assert view.spec() is not None and view.spec().name == "viewed"
        assert [e.event for e in view.events()] == ["start", "step", "step", "step"]
        assert view.eval_metrics() == {"tuned": {"loss": 1.25}} and len(view.eval_samples(2)) == 2
        assert view.served() == RUN_KEYS.adapter and not view.is_finished()
    # nothing changed where the run lives, and no working copy was made to read it
    assert s3.keys(BUCKET, "runs/viewed/") == stored
    assert sorted(p for p in layout.root.rglob("*")) == local_files
    assert not workdir.exists() or not any(workdir.iterdir())


def test_a_view_of_what_is_not_there_yet_is_empty_not_an_error(tmp_path: Path, s3: S3Server,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    for uri in (str(tmp_path / "nothing"), f"s3://{BUCKET}/runs/nothing-yet"):
        view = RunView(uri)
        assert (view.spec(), view.events(), view.checkpoints(), view.eval_metrics(), view.served()) == \
            (None, [], [], None, None)


def test_a_verb_that_loads_a_remote_run_brings_only_what_it_reads(
        tmp_path: Path, s3: S3Server, write_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.runs.run import Run

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_WORKDIR", str(tmp_path / "work"))
    layout = _run_folder(tmp_path / "loaded", write_spec(name="loaded"))
    for folder, files in ((layout.adapter, ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")),
                          (layout.merged, ("config.json", "model.safetensors", "tokenizer_config.json"))):
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("{}")
    layout.final_complete.write_text("")
    client = s3.client()
    for file in sorted(p for p in layout.root.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"runs/loaded/{file.relative_to(layout.root).as_posix()}",
                          Body=file.read_bytes())
    stored = s3.keys(BUCKET, "runs/loaded/")

    opened = Run.open(f"s3://{BUCKET}/runs/loaded")
    copy = opened.layout.root
    had = lambda: sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())  # noqa: E731
    assert had() == sorted([RUN_KEYS.reader_state, RUN_KEYS.eval_metrics, RUN_KEYS.eval_samples, RUN_KEYS.events,
                            RUN_KEYS.spec])
    served = opened.final_model()  # a LoRA run serves its adapter: only that folder comes down
    assert served.folder == opened.layout.adapter and not served.merged
    assert not opened.layout.merged.exists() and not opened.layout.checkpoints.exists()
    published = opened.final_model(merged_if_present=True)  # what push publishes: the merge
    assert published.merged and (opened.layout.merged / "model.safetensors").exists()
    assert not opened.layout.checkpoints.exists()
    assert s3.keys(BUCKET, "runs/loaded/") == stored


def test_a_run_trained_again_under_the_same_uri_is_never_read_from_the_old_copy(
        tmp_path: Path, s3: S3Server, write_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's copy keeps a file only while the store's fingerprint of it is the one it was fetched
    with: same-size new weights are fetched again, and while the new run has no final/COMPLETE the old
    copy's final/ is not offered as its model."""
    from kubetune.errors import UsageError
    from kubetune.runs.run import Run

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_WORKDIR", str(tmp_path / "work"))
    layout = _run_folder(tmp_path / "again", write_spec(name="again"))
    layout.adapter.mkdir(parents=True)
    for name in ("adapter_config.json", "tokenizer_config.json"):
        (layout.adapter / name).write_text("{}")
    (layout.adapter / "adapter_model.safetensors").write_bytes(b"old weights")
    layout.final_complete.write_text("")
    client, prefix = s3.client(), "runs/again"
    for file in sorted(p for p in layout.root.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{file.relative_to(layout.root).as_posix()}",
                          Body=file.read_bytes())
    uri = f"s3://{BUCKET}/{prefix}"
    first = Run.open(uri).final_model()
    assert (first.folder / "adapter_model.safetensors").read_bytes() == b"old weights"
    # trained again: the new run has not finished yet
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/final/COMPLETE")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/final/adapter/adapter_model.safetensors", Body=b"new weights")
    with pytest.raises(UsageError, match="no trained model yet"):
        Run.open(uri).final_model()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/final/COMPLETE", Body=b"")
    again = Run.open(uri).final_model()  # same size, other content: fetched again
    assert again.folder == first.folder and (again.folder / "adapter_model.safetensors").read_bytes() == b"new weights"
