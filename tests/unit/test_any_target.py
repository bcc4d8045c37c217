"""Any target from any machine: validate, plan (here and for the cluster), render, and the dry runs of
sweep (here and for the cluster), submit and deploy, of every example aimed at every accelerator,
strategy, device count, node selector and offload, end in exit 0 (done) or 2 (fix your input) on this
CPU-only machine, never 1 (a kubetune bug); the verbs aimed at the cluster run as if this machine had
a GPU whose reading fails: planning for a cluster's GPUs, Gaudi or ROCm nodes must not call this
machine's device APIs."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest

from kubetune.cli import main
from tests.conftest import QUICKSTART_DATA, ROOT

EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
ACCELERATORS = ("cpu", "nvidia", "amd", "gaudi", "auto")
STRATEGIES = ("auto", "ddp", "fsdp")
DEVICES = ("1", "8")
SELECTORS = ("{}", "{cloud.google.com/gke-accelerator: nvidia-h100-80gb}")
VERBS = (("validate",), ("plan",), ("plan", "--target", "k8s"), ("render",), ("render", "--what", "serve"),
         ("sweep", "--dry-run", "--grid", "method.lora.r=4,8"), ("submit", "--dry-run"), ("deploy", "--dry-run"),
         ("sweep", "--dry-run", "--target", "k8s", "--grid", "model.dtype=bfloat16,float32"))
# verbs that aim at the cluster's devices: run on a machine whose own GPU must not be read
CLUSTER_VERBS = {("plan", "--target", "k8s"), ("render",), ("render", "--what", "serve"), ("submit", "--dry-run"),
                 ("deploy", "--dry-run"), ("sweep", "--dry-run", "--target", "k8s", "--grid", "model.dtype=bfloat16,float32")}
OFFLOAD = ("false", "true")


@contextlib.contextmanager
def a_gpu_here_that_must_not_be_read():  # type: ignore[no-untyped-def]
    """This machine claims a CUDA GPU, and reading it fails loudly: a cluster's plan must come from the target."""
    import torch
    from unittest import mock

    def read(*args: object, **kwargs: object) -> None:
        raise RuntimeError("this machine's GPU was read for a cluster's run")
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "device_count", lambda: 1), \
            mock.patch.object(torch.cuda, "get_device_properties", read), \
            mock.patch.object(torch.cuda, "mem_get_info", read), \
            mock.patch.object(torch.cuda, "get_device_name", read):
        yield


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    rows = (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_target_and_verb_is_exit_0_or_2(example: str, small_data: Path, tiny_model: Path) -> None:
    outcomes = {}
    combos = itertools.product(ACCELERATORS, STRATEGIES, DEVICES, VERBS)
    for n, (acc, strategy, devices, verb) in enumerate(combos):
        selector = SELECTORS[n // len(VERBS) % len(SELECTORS)]  # each verb sees each selector across the combos
        offload = OFFLOAD[n // (len(VERBS) * len(SELECTORS)) % len(OFFLOAD)]  # and with and without offload
        argv = [verb[0], str(ROOT / "examples" / example), *verb[1:],
                "--set", f"model.base={tiny_model}", "--set", f"data.train=[{small_data}]",
                "--set", "data.format=messages", "--set", "data.eval={split_ratio: 0.2}",
                "--set", f"resources.accelerator={acc}", "--set", f"resources.strategy={strategy}",
                "--set", f"resources.devices_per_node={devices}", "--set", f"kubernetes.node_selector={selector}",
                "--set", f"resources.offload={offload}"]
        out = io.StringIO()
        guard = a_gpu_here_that_must_not_be_read() if verb in CLUSTER_VERBS else contextlib.nullcontext()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), guard:
            code = main(argv)
        said = out.getvalue()
        assert code in (0, 2) and "unexpected" not in said and "Traceback" not in said, (argv, said[-2000:])
        outcomes[code] = outcomes.get(code, 0) + 1
    assert outcomes.get(0, 0) > 0  # the matrix is not all refusals
