"""Shared fixtures: the project's tiny model (built offline once), spec files, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Tests (and the kubetune processes they start) use their own data cache, never the user's.
    import tempfile

    if "KUBETUNE_CACHE" not in os.environ:
        made = tempfile.mkdtemp(prefix="kubetune-test-cache-")
        os.environ["KUBETUNE_CACHE"] = config._kubetune_cache = made  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    made = getattr(config, "_kubetune_cache", None)
    if made:  # only the one this process made (each xdist worker makes its own), never a cache given to it
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop("KUBETUNE_CACHE", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Longest first, then the other integration tests, then the unit tests that fill the gaps: with the
    # workers stealing from each other, the run then ends with short tests on every worker instead of
    # one worker still in a two-minute test while the others idle.
    def weight(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("long") else 1 if item.get_closest_marker("integration") else 2

    items.sort(key=weight)


TINY = ROOT / "examples" / "assets" / "tiny-llama"
QUICKSTART_DATA = ROOT / "examples" / "data" / "quickstart"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY / "config.json").exists():
        from kubetune.quickstart.assets import build_model

        build_model(TINY)
    return TINY


@pytest.fixture
def write_spec(tmp_path: Path, tiny_model: Path):
    """write_spec(**sections) → path of a valid spec (quickstart-like, tiny) with sections replaced."""

    def _write(name: str = "t", **sections: Any) -> Path:
        spec: dict[str, Any] = {
            "name": name,
            "model": {"base": str(tiny_model)},
            "data": {"train": str(QUICKSTART_DATA / "train.jsonl"), "eval": {"split_ratio": 0.05}, "max_length": 128},
            "train": {"max_steps": 10, "total_batch_size": 8, "max_per_device_batch_size": 8, "save_every_steps": 5,
                      "logging_steps": 5, "learning_rate": 3e-3},
            "output": str(tmp_path / "runs" / name),
            "resources": {"accelerator": "cpu"},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return _write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run kubetune's main(argv) in-process; returns (exit code, stdout, stderr)."""
    from kubetune.cli import main

    def _run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def kubetune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kubetune", *args]


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1"}, **extra)
    return env


def run_kubetune(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kubetune_cmd(*args), capture_output=True, text=True, timeout=timeout, env=quiet_env(**env),
                          cwd=ROOT)


def kill_after_first_checkpoint(spec: Path, out: Path, timeout: float = 240) -> tuple[int, str]:
    """Run `kubetune train SPEC` until a COMPLETE checkpoint exists under OUT, then SIGKILL it and every
    process it started (launcher, torchrun, ranks: no chance to save anything more). Returns the newest
    complete checkpoint's step and what the run printed."""
    import signal
    import time

    import psutil

    log = out.parent / f"{out.name}.killed.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:  # a file, not a pipe: a full pipe would stall the trainer
        proc = subprocess.Popen(kubetune_cmd("train", str(spec)), stdout=fh, stderr=subprocess.STDOUT,
                                env=quiet_env(), cwd=ROOT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not list((out / "checkpoints").glob("checkpoint-*/COMPLETE")):
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was saved: " + \
                    log.read_text()[-2000:]
                time.sleep(0.05)
        finally:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for p in tree:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
    steps = [int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/COMPLETE")]
    return max(steps), log.read_text()


def assert_resumes(spec: Path, out: Path, saved: int, last: int, logging: int) -> subprocess.CompletedProcess[str]:
    """Rerun `kubetune train SPEC`: it resumes from checkpoint-SAVED, logs its next step right after it
    and finishes at LAST."""
    from kubetune.artifacts.events import read_events

    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{saved}'}" in res.stdout
    steps = [e.step for e in read_events(out / "events.jsonl") if e.event == "step"]
    assert steps[-1] == last and [s for s in steps if s > saved][0] == (saved // logging + 1) * logging
    return res


def tiny_overrides(output: Path) -> list[str]:
    """--set items that make any example spec run here, at tiny scale: the project's tiny model and
    quickstart data, CPU, a few steps; everything else (method, LoRA, schedule, eval) stays the example's."""
    items = [f"model.base={TINY}", f"data.train={QUICKSTART_DATA / 'train.jsonl'}",
             f"data.eval={QUICKSTART_DATA / 'eval.jsonl'}", "data.format=auto", "data.max_length=128",
             "model.dtype=auto", f"output={output}", "resources.accelerator=cpu", "resources.devices_per_node=1",
             "resources.nodes=1", "train.optim=adamw_torch", "train.max_steps=3", "train.total_batch_size=4",
             "train.max_per_device_batch_size=4", "train.save_every_steps=3", "train.logging_steps=1", "tracking.report_to=[]",
             "eval.num_samples=4", "eval.max_new_tokens=8"]
    return items


def kubetune_argv(container: dict) -> list[str]:
    """A rendered container's command as the program it runs, the install-at-start prefix taken off
    (`sh -c BOOT kubetune -m MODULE ARGS` → `kubetune ARGS`, or `python -m MODULE ARGS`)."""
    cmd = container["command"]
    if cmd[:2] != ["/bin/sh", "-c"]:
        return cmd
    module, args = cmd[5], cmd[6:]
    return ["kubetune", *args] if module == "kubetune" else ["python", "-m", module, *args]
