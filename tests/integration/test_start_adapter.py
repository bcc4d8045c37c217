"""model.adapter: a run continues an earlier run's adapter — locally and from object storage — and a
mismatched base or method is refused before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from tests.conftest import run_kubetune

pytestmark = pytest.mark.integration


def _steps(run: Path) -> list:
    return [e for e in read_events(run / "events.jsonl") if e.event == "step"]


def test_a_run_continues_an_earlier_runs_adapter(write_spec, tmp_path: Path) -> None:
    first = write_spec(name="sft", data={"eval": None}, method={"type": "lora", "lora": {"r": 4, "dropout": 0.0}},
                       train={"max_steps": 30, "logging_steps": 1, "save_every_steps": 30, "learning_rate": 5e-3})
    res = run_kubetune("train", str(first), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    sft = tmp_path / "runs" / "sft"
    # the second run asks for r=16, but continues the r=4 adapter (and says so)
    second = write_spec(name="more", data={"eval": None}, model={"base": str(tmp_path / "unused")},
                        method={"type": "lora", "lora": {"r": 16, "dropout": 0.0}},
                        train={"max_steps": 3, "logging_steps": 1, "save_every_steps": 3, "learning_rate": 1e-9})
    import yaml

    spec = yaml.safe_load(second.read_text())
    spec["model"] = {"base": yaml.safe_load(first.read_text())["model"]["base"], "adapter": str(sft)}
    second.write_text(yaml.safe_dump(spec))
    res = run_kubetune("train", str(second), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"starting from the adapter of {sft} (r=4" in res.stdout
    before, after = _steps(sft), _steps(tmp_path / "runs" / "more")
    # it starts where the first run ended (learning rate ~0: the loss stays there), far below a fresh adapter's
    assert after[0].loss < 0.8 * before[0].loss
    assert abs(after[0].loss - before[-1].loss) < 0.25 * before[-1].loss
    cfg = (tmp_path / "runs" / "more" / "final" / "adapter" / "adapter_config.json").read_text()
    assert '"r": 4' in cfg


def test_a_mismatched_start_is_refused(write_spec, tmp_path: Path) -> None:
    import yaml

    done = write_spec(name="done", data={"eval": None}, train={"max_steps": 2, "save_every_steps": 2})
    assert run_kubetune("train", str(done), timeout=300).returncode == 0
    run = tmp_path / "runs" / "done"
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    (other_base / "config.json").write_text("{}")
    for change, text in [({"model": {"base": str(other_base), "adapter": str(run)}}, "was trained on"),
                         ({"model": {"adapter": str(tmp_path / "nowhere")}}, "model.adapter"),
                         ({"method": {"type": "full"}}, "method.type is full")]:
        spec = yaml.safe_load(done.read_text())
        spec.update(name="next", output=str(tmp_path / "runs" / "next"))
        spec["model"] = {**spec["model"], "adapter": str(run)}
        for key, value in change.items():
            spec[key] = {**spec.get(key, {}), **value}
        path = tmp_path / "next.yaml"
        path.write_text(yaml.safe_dump(spec))
        res = run_kubetune("train", str(path), timeout=300)
        assert res.returncode == 2 and text in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_the_adapter_of_a_run_in_object_storage_on_another_machine(s3, staged, tmp_path: Path) -> None:
    import yaml

    from tests.s3_runs import BUCKET, run, spec_file

    first = spec_file(tmp_path, "sft-s3", staged, 6)
    res = run(["train", str(first)], s3, tmp_path / "machine-a")
    assert res.returncode == 0, res.stderr[-2000:]
    second = spec_file(tmp_path, "cont", staged, 2)
    spec = yaml.safe_load(second.read_text())
    spec["model"]["adapter"] = f"s3://{BUCKET}/runs/sft-s3"
    second.write_text(yaml.safe_dump(spec))
    res = run(["train", str(second)], s3, tmp_path / "machine-b")  # a fresh machine: nothing local
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"starting from the adapter of s3://{BUCKET}/runs/sft-s3 (r=8" in res.stdout
