"""Gaudi, exercised as far as a machine without one allows: a process that finds Intel's runtime
(`habana_frameworks.torch.hpu`, with the calls kubetune makes of it — is_available, device_count,
get_device_name, memory_stats) trains on the `hpu` device in bf16, reads the card's memory for its plan
and its peak for the first-step report, and the Trainer gets use_cpu off (transformers then places the
model on hpu:0) — transformers' Intel Gaudi page (huggingface.co/docs/transformers/perf_train_gaudi:
"TrainingArguments, Trainer and Pipeline detect and set the backend device to hpu"; bf16 on every
generation) and Intel's "Getting Started with Training on Intel Gaudi" (the `habana_frameworks.torch`
runtime). The runtime here is a module with those functions and the figures of a Gaudi 2; nothing of
it runs on a card (README, support table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kubetune.spec.load import load_spec

RUNTIME = '''
def is_available(): return True
def device_count(): return 8
def get_device_name(): return "GAUDI2"
def memory_stats(): return {"Limit": 96 * 2**30, "InUse": 0, "MaxInUse": 7 * 2**30}
'''


@pytest.fixture
def gaudi_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hpu = tmp_path / "habana_frameworks" / "torch" / "hpu"
    hpu.mkdir(parents=True)
    for folder in (tmp_path / "habana_frameworks", tmp_path / "habana_frameworks" / "torch"):
        (folder / "__init__.py").write_text("")
    (hpu / "__init__.py").write_text(RUNTIME)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n.startswith("habana_frameworks")]:
        del sys.modules[name]


def _spec(write_spec, devices: int = 8, **sections):
    return load_spec(write_spec(name="gaudi", resources={"accelerator": "gaudi", "devices_per_node": devices},
                                **sections))


def test_a_gaudi_process_trains_on_hpu_in_bf16(gaudi_runtime, write_spec, tiny_model: Path) -> None:
    import torch

    from kubetune.train.arguments import training_arguments
    from kubetune.train.batching import batch_shape
    from kubetune.train.devices import check_accelerator, detect, device_type
    from kubetune.train.model import resolve_dtype, resolve_mixed_precision, use_cpu

    found = detect()
    assert (found.kind, found.count) == ("gaudi", 8)
    spec = _spec(write_spec)
    assert check_accelerator(spec) == found
    assert device_type("gaudi") == device_type("auto") == "hpu" and device_type("cpu") == "cpu"
    assert not use_cpu(spec)  # it was true without CUDA: a Gaudi pod trained on its CPU in fp32
    assert resolve_dtype("auto", "gaudi") == torch.bfloat16
    assert resolve_mixed_precision(spec, torch.float32) == "bf16"
    shape = batch_shape(spec.train.total_batch_size, spec.train.max_per_device_batch_size, world_size=8)
    args = training_arguments(spec, _layout(write_spec), shape, has_eval=False, model_dir=tiny_model,
                              cls=lambda **values: values)
    assert args["use_cpu"] is False and args["bf16"] is True and args["fp16"] is False


def test_the_plan_reads_the_cards_memory_and_the_peak_is_the_cards(gaudi_runtime, write_spec) -> None:
    from kubetune.train.flops import KIND_PEAKS
    from kubetune.train.measure import peak_memory_bytes
    from kubetune.train.memory import device_memory
    from kubetune.train.devices import device_name

    assert device_memory(_spec(write_spec), local=True) == (96 * 2**30, "GAUDI2")
    assert peak_memory_bytes("gaudi") == 7 * 2**30
    assert peak_memory_bytes("cpu") != 7 * 2**30  # a CPU run on a Gaudi node never touches the card
    assert device_name("hpu") == "GAUDI2" and KIND_PEAKS["gaudi"] == 432e12


def test_a_run_asking_for_more_cards_than_the_node_has_is_refused(gaudi_runtime, write_spec) -> None:
    from kubetune.errors import UsageError
    from kubetune.train.devices import check_accelerator

    with pytest.raises(UsageError, match="devices_per_node is 16, but this machine has 8 x Intel Gaudi"):
        check_accelerator(_spec(write_spec, devices=16, train={"total_batch_size": 16, "max_per_device_batch_size": 1}))


def test_without_the_runtime_a_gaudi_run_is_refused_not_run_on_the_cpu(write_spec) -> None:
    from kubetune.errors import UsageError
    from kubetune.train.devices import check_accelerator

    with pytest.raises(UsageError, match="resources.accelerator is gaudi, but this machine has only a CPU"):
        check_accelerator(_spec(write_spec, devices=1))


def _layout(write_spec):
    from kubetune.runs.layout import RunLayout

    return RunLayout(Path(_spec(write_spec).output_uri))
