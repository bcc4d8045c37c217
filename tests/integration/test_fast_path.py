"""The fast path: padding-free batches (checked on CPU: the same training as padded batches, with no
padding), and on a CUDA device bf16, FlashAttention-2, Liger kernels and torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from tests.conftest import run_kubetune

pytestmark = pytest.mark.integration

TRAIN = {"max_steps": 4, "logging_steps": 1, "save_every_steps": 4, "total_batch_size": 8,
         "max_per_device_batch_size": 8, "learning_rate": 1e-3}


def _steps(run: Path) -> dict[int, object]:
    return {e.step: e for e in read_events(run / "events.jsonl") if e.event == "step"}


def test_padding_free_trains_exactly_like_padded_batches(write_spec, tmp_path: Path) -> None:
    lora = {"type": "lora", "lora": {"dropout": 0.0}}  # dropout masks depend on the batch's shape
    padded = write_spec(name="padded", train={**TRAIN, "padding_free": False, "sampling": "random"},
                        data={"eval": None}, method=lora)
    flat = write_spec(name="flat", train={**TRAIN, "padding_free": True, "sampling": "random"}, data={"eval": None},
                      method=lora)
    for spec in (padded, flat):
        res = run_kubetune("train", str(spec), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = _steps(tmp_path / "runs" / "padded"), _steps(tmp_path / "runs" / "flat")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # at the same weights (step 1) the same loss and gradients; after that Adam's first updates amplify
    # float noise in near-zero gradients a little
    assert abs(a[1].loss - b[1].loss) <= 1e-5 * a[1].loss and abs(a[1].grad_norm - b[1].grad_norm) <= 1e-4 * a[1].grad_norm
    for step in a:
        assert abs(a[step].loss - b[step].loss) <= 1e-3 * abs(a[step].loss), (step, a[step].loss, b[step].loss)
    # random order pads: the padded run computes on pad positions, the flat one on none
    assert all(a[s].padding > 0.1 for s in a) and all(b[s].padding == 0 for s in b)
    assert a[4].tokens_seen == b[4].tokens_seen  # the same real tokens


def test_gpu_options_are_refused_where_they_cannot_run(write_spec) -> None:
    res = run_kubetune("validate", str(write_spec(train={"liger": True, "attention": "flash_attention_2"})))
    assert res.returncode == 2 and "train.liger" in res.stderr and "train.attention" in res.stderr
    assert "Traceback" not in res.stderr


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device: bf16, FlashAttention-2, Liger and torch.compile are "
                                        "GPU paths (this machine has none; run on the device machine)")
def test_gpu_fast_path_trains_in_bf16_padding_free(write_spec, tmp_path: Path) -> None:
    import importlib.util

    train = {**TRAIN, "padding_free": True, "compile": False,
             "liger": importlib.util.find_spec("liger_kernel") is not None}
    spec = write_spec(name="gpu", train=train, data={"eval": None},
                      resources={"accelerator": "nvidia"}, model={"dtype": "bfloat16"})
    res = run_kubetune("train", str(spec), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    events = read_events(tmp_path / "runs" / "gpu" / "events.jsonl")
    start = next(e for e in events if e.event == "start")
    assert start.mixed_precision == "bf16"
    steps = [e for e in events if e.event == "step"]
    assert steps[-1].step == 4 and steps[-1].padding == 0 and steps[-1].loss < steps[0].loss + 1.0
    first = next(e for e in events if e.event == "first_step")
    assert first.peak_memory_bytes and first.peak_memory_bytes > 0
