"""Disk the pods ask for, from what they write: the base's size read from a local folder or the Hugging
Face cache sizes a training pod's scratch volume (the download, the checkpoints kept and the one being
written, the final weights) and a serving pod's models volume; a size set by hand that is smaller is
refused, naming the field; a base whose size cannot be read here gets the fallback. GKE Autopilot's
"Resource requests in Autopilot": a pod that writes past its ephemeral-storage request is evicted."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main
from tests.conftest import ROOT

GIB = 2**30


def big_model(folder: Path, tiny_model: Path, weights: int) -> Path:
    """The tiny model's files, its weights file grown (sparse) to `weights` bytes: the size is what is read."""
    shutil.copytree(tiny_model, folder)
    with (folder / "model.safetensors").open("r+b") as fh:
        fh.truncate(weights)
    return folder


def rendered(*argv: str) -> tuple[int, list[dict[str, Any]], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, [d for d in yaml.safe_load_all(out.getvalue()) if d] if code == 0 else [], err.getvalue()


def scratch_request(objects: list[dict[str, Any]]) -> str:
    job = next(o for o in objects if o["kind"] == "Job")
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "scratch")
    return volume["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"]


def gi(n: float) -> str:
    return f"{math.ceil(n / GIB)}Gi"


def test_a_training_pods_scratch_is_sized_from_the_base(tmp_path: Path, tiny_model: Path) -> None:
    weights = 20 * GIB
    base = big_model(tmp_path / "big", tiny_model, weights)
    spec = str(ROOT / "examples" / "quickstart.yaml")
    code, objects, said = rendered("render", spec, "--set", f"model.base={base}", "--set", "method.type=full",
                                   "--set", "train.keep_checkpoints=2")
    assert code == 0, said
    # full: the download, 3 checkpoints (2 kept + 1 being written) of weights + two fp32 Adam moments per bf16
    # parameter, the final weights, 5 GiB of installs and caches
    assert scratch_request(objects) == gi(weights + 3 * (weights + weights / 2 * 8) + weights + 5 * GIB) == "345Gi"
    code, objects, said = rendered("render", spec, "--set", f"model.base={base}")
    assert code == 0 and scratch_request(objects) == gi(weights + 3 * weights * 0.05 + weights * 0.05 + 5 * GIB)
    code, _, said = rendered("render", spec, "--set", f"model.base={base}", "--set", "method.type=full",
                             "--set", "kubernetes.scratch_size=50Gi")
    assert code == 2 and "kubernetes.scratch_size" in said and "about 345Gi" in said and "Traceback" not in said
    code, _, said = rendered("submit", spec, "--dry-run", "--set", f"model.base={base}", "--set", "method.type=full",
                             "--set", "kubernetes.scratch_size=50Gi")
    assert code == 2 and "kubernetes.scratch_size" in said
    code, objects, _ = rendered("render", spec, "--set", "model.base=hf://nobody/not-cached-here")
    assert code == 0 and scratch_request(objects) == "50Gi"  # not readable here: the fallback, nothing refused


def test_a_serving_pods_models_volume_is_sized_from_the_base(tmp_path: Path, tiny_model: Path) -> None:
    weights = 40 * GIB
    base = big_model(tmp_path / "big", tiny_model, weights)
    spec = str(ROOT / "examples" / "quickstart.yaml")
    code, objects, said = rendered("render", spec, "--what", "serve", "--run", str(base))
    assert code == 0, said
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")["emptyDir"]["sizeLimit"]
    assert models == gi(weights * 1.1 + 2 * GIB) == "46Gi"
    asked = pod["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    assert int(asked.removesuffix("Mi")) >= 46 * 1024  # the pod asks for the volume it fills
    code, _, said = rendered("deploy", spec, "--dry-run", "--run", str(base), "--set", "serve.model_storage=20Gi")
    assert code == 2 and "serve.model_storage" in said and "about 46Gi" in said


def test_the_size_of_a_hub_model_in_this_machines_cache_is_read_from_its_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.k8s.storage import model_bytes

    snapshot = tmp_path / "hub" / "models--org--big" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--org--big" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--big" / "refs" / "main").write_text("a" * 40)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 141_107_412_992},
                                                                       "weight_map": {}}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_bytes("hf://org/big") == 141_107_412_992
    assert model_bytes("hf://org/other") is None and model_bytes("s3://bucket/model") is None
