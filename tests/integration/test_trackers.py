"""tracking.report_to for real: TensorBoard event files read back with TensorBoard's own reader, and
a W&B run in offline mode read back from its .wandb record log — each with the training loss per
step and the final eval metrics (base and tuned) of the same run."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import run_kubetune

pytestmark = pytest.mark.integration


def test_tensorboard_gets_loss_per_step_and_the_eval_metrics(write_spec, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = write_spec(name="tb", train={"max_steps": 8, "logging_steps": 2},
                      tracking={"report_to": ["tensorboard"]}, eval={"metrics": ["loss", "rouge"], "num_samples": 4,
                                                                     "max_new_tokens": 8})
    res = run_kubetune("train", str(spec), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "tb"
    assert json.loads((run / "trackers.json").read_text())["tensorboard_dir"] == "tensorboard"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for folder in {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert [s for s, _ in sorted(scalars["train/loss"])] == [2, 4, 6, 8]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for model in ("base", "tuned"):
        for key in ("loss", "rougeL"):
            ((step, value),) = scalars[f"eval/{model}/{key}"]
            assert step == 8 and value == pytest.approx(metrics[model][key], rel=1e-5)


def wandb_records(path: Path) -> Iterator[object]:
    """The records of a .wandb file (W&B's LevelDB-style log of protobuf Records: a 7-byte file
    header, then 32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # block trailer
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_gets_loss_per_step_and_the_eval_metrics(write_spec, tmp_path: Path) -> None:
    spec = write_spec(name="wb", train={"max_steps": 6, "logging_steps": 2},
                      tracking={"report_to": ["wandb"], "experiment": "kubetune-tests"},
                      eval={"metrics": ["loss", "exact_match"], "num_samples": 4, "max_new_tokens": 8})
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path / "home")}
    res = run_kubetune("train", str(spec), timeout=300, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "wb"
    run_id = json.loads((run / "trackers.json").read_text())["wandb_run_id"]
    (log,) = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history: dict[str, list[float]] = {}
    summary: dict[str, float] = {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in row:
                history.setdefault("train/global_step", []).append(row["train/global_step"])
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    assert history["train/global_step"] == [2, 4, 6]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for model in ("base", "tuned"):
        assert summary[f"eval/{model}/exact_match"] == pytest.approx(metrics[model]["exact_match"])
        assert summary[f"eval/{model}/loss"] == pytest.approx(metrics[model]["loss"], rel=1e-5)


def test_a_tracker_that_is_not_configured_is_exit_2_at_validate(write_spec, tmp_path: Path, cli,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc from `wandb login`
    spec = write_spec(name="trk", tracking={"report_to": ["tensorboard", "wandb", "mlflow"]})
    code, out, err = cli("validate", str(spec))
    assert code == 2 and "Traceback" not in err
    assert "tracking.report_to[1]: wandb has no API key: set WANDB_API_KEY" in err
    assert "kubernetes.secrets.wandb" in err
    assert "tracking.report_to[2]: mlflow needs a tracking server: set tracking.mlflow_uri" in err
    assert "report_to[0]" not in err  # tensorboard is installed and needs no configuration
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    code, out, err = cli("validate", str(spec))
    assert code == 0, err
