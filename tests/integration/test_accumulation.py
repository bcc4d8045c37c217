"""Gradient accumulation must not change the maths: 4 x batch 2 == 1 x batch 8 (loss and gradients).

Rows have different numbers of trained tokens, so a per-micro-batch mean averaged over micro-batches
(the classic bug) would differ from the per-token mean over the whole batch; this test would catch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from kubetune.artifacts.events import EventLog
from kubetune.runs.layout import RunLayout
from kubetune.data.prepare import prepare
from kubetune.spec import load_spec
from kubetune.train.batching import batch_shape
from kubetune.train.build import build_trainer

pytestmark = pytest.mark.integration


class GradGrab(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(spec_path: Path, tmp: Path, max_per_device: int, method: str, sampling: str
             ) -> tuple[float, dict[str, torch.Tensor], Any]:
    spec = load_spec(spec_path, [
        f"train.max_per_device_batch_size={max_per_device}", "train.total_batch_size=8", "train.max_steps=1",
        f"train.sampling={sampling}", "train.gradient_checkpointing=false", "train.max_grad_norm=0", "train.logging_steps=1", "train.warmup_ratio=0",
        "data.eval=null", "method.lora.dropout=0", "train.mixed_precision=fp32", f"method.type={method}", f"output={tmp / str(max_per_device)}",
    ])
    data = prepare(spec)
    batches = batch_shape(8, max_per_device, 1)
    layout = RunLayout(tmp / str(max_per_device))
    trainer = build_trainer(spec, data, layout, EventLog(layout.events, enabled=False), batches)
    grab = GradGrab()
    trainer.add_callback(grab)
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, grab.grads, batches


@pytest.mark.parametrize("method,sampling", [("lora", "random"), ("full", "random"), ("lora", "length_buckets")])
def test_accumulation_4x2_equals_1x8(write_spec, tmp_path: Path, method: str, sampling: str) -> None:
    spec_path = write_spec()
    loss_a, grads_a, plan_a = one_step(spec_path, tmp_path, 2, method, sampling)
    loss_b, grads_b, plan_b = one_step(spec_path, tmp_path, 8, method, sampling)
    assert (plan_a.per_device, plan_a.accumulation) == (2, 4)
    assert (plan_b.per_device, plan_b.accumulation) == (8, 1)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    nonzero = 0
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
        nonzero += int(g.abs().sum() > 0)
    assert nonzero > 0
