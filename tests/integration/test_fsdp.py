"""resources.strategy: fsdp on CPU (gloo, 2 ranks): the same training as one process, each rank
holding half of the state, sharded checkpoints that resume after SIGKILL, and their export to a
Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.artifacts.events import read_events
from tests.conftest import kill_after_first_checkpoint, run_kubetune

pytestmark = pytest.mark.integration

TRAIN = {"max_steps": 6, "save_every_steps": 3, "logging_steps": 1, "total_batch_size": 8,
         "max_per_device_batch_size": 4, "learning_rate": 1e-3, "gradient_checkpointing": True}


def _losses(run: Path) -> dict[int, float]:
    return {e.step: e.loss for e in read_events(run / "events.jsonl") if e.event == "step"}


def _sizes(folder: Path) -> tuple[int, int]:
    return (folder / "__0_0.distcp").stat().st_size, (folder / "__1_0.distcp").stat().st_size


def test_fsdp_trains_like_one_process_with_half_the_state_per_rank(write_spec, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    single = write_spec(name="one", method={"type": "full"}, train=TRAIN, data={"eval": None})
    sharded = write_spec(name="fsdp", method={"type": "full"}, train=TRAIN, data={"eval": None},
                         resources={"accelerator": "cpu", "devices_per_node": 2, "strategy": "fsdp"})
    for spec in (single, sharded):
        res = run_kubetune("train", str(spec), timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "fsdp"
    # the same optimisation: one process with 2 accumulation steps, two shards with 4 rows each
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) <= 1e-4 * abs(a[s]) for s in a), (a, b)
    wa, wb = load_file(one / "final/merged/model.safetensors"), load_file(two / "final/merged/model.safetensors")
    assert sorted(wa) == sorted(wb)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4

    events = read_events(two / "events.jsonl")
    start = next(e for e in events if e.event == "start")
    assert start.strategy == "fsdp" and start.world_size == 2
    # measured on rank 0 after its first step: its parameters + Adam state are about half the whole
    # (the single process holds all of it: weights + 2 Adam moments)
    held_one = next(e for e in read_events(one / "events.jsonl") if e.event == "first_step").held_bytes
    held_two = next(e for e in events if e.event == "first_step").held_bytes
    assert 0.4 <= held_two / held_one <= 0.6, (held_two, held_one)
    # each rank wrote its own shards of the model and of the optimizer state, about half each
    ckpt = two / "checkpoints" / "checkpoint-6"
    assert (ckpt / "COMPLETE").exists() and not (ckpt / "model.safetensors").exists()
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        r0, r1 = _sizes(ckpt / part)
        assert 0.4 <= r0 / (r0 + r1) <= 0.6, (part, r0, r1)
        assert (ckpt / part / ".metadata").exists()
    param_bytes = sum(t.numel() * t.element_size() for t in wa.values())
    r0, r1 = _sizes(ckpt / "pytorch_model_fsdp_0")
    assert 0.9 * param_bytes <= r0 + r1 <= 1.2 * param_bytes

    # the sharded checkpoint exported is the final model (checkpoint-6 is the last step)
    res = run_kubetune("export", str(ckpt), timeout=200)
    assert res.returncode == 0, res.stderr[-2000:]
    exported = two / "exported" / "checkpoint-6"
    we = load_file(exported / "model.safetensors")
    assert sorted(we) == sorted(wb) and max(float((we[k] - wb[k]).abs().max()) for k in we) == 0.0
    assert (exported / "tokenizer.json").exists() and (exported / "chat_template.jinja").exists()
    again = run_kubetune("export", str(ckpt), timeout=200)  # never overwritten
    assert again.returncode == 2 and "does not overwrite" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.long
def test_sigkill_under_fsdp_resumes_the_sharded_checkpoint(write_spec, tmp_path: Path) -> None:
    spec = write_spec(name="fkill", data={"eval": None},
                      train={**TRAIN, "max_steps": 40, "save_every_steps": 4, "logging_steps": 4},
                      resources={"accelerator": "cpu", "devices_per_node": 2, "strategy": "fsdp"})
    out = tmp_path / "runs" / "fkill"
    step, _ = kill_after_first_checkpoint(spec, out)
    saved = out / "checkpoints" / f"checkpoint-{step}"
    assert (saved / "pytorch_model_fsdp_0" / ".metadata").exists()
    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming from {saved}" in res.stdout
    resumed = [e for e in read_events(out / "events.jsonl") if e.event == "step" and e.step > step]
    assert resumed and resumed[0].step == step + 4 and resumed[-1].step == 40
    final = out / "final" / "adapter" / "adapter_model.safetensors"
    assert final.exists()
    # the last sharded checkpoint (step 40) exported as an adapter is the final adapter
    res = run_kubetune("export", str(out / "checkpoints" / "checkpoint-40"), "--to", str(tmp_path / "exp"), timeout=200)
    assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "exp" / "adapter_model.safetensors"), load_file(final)
    assert sorted(a) == sorted(b) and all(float((a[k] - b[k]).abs().max()) == 0.0 for k in a)
    assert (tmp_path / "exp" / "adapter_config.json").exists()


def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(write_spec, tmp_path: Path) -> None:
    import shutil

    spec = write_spec(name="mix", data={"eval": None}, train=TRAIN,
                      resources={"accelerator": "cpu", "devices_per_node": 2, "strategy": "ddp"})
    res = run_kubetune("train", str(spec), timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "runs" / "mix"
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    res = run_kubetune("train", str(spec), "--set", "resources.strategy=fsdp", timeout=400)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "saved by a ddp run and this run uses fsdp" in res.stderr and "Traceback" not in res.stderr
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").exists()  # nothing saved is lost
