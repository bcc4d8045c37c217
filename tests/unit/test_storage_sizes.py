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


def big_model(folder: Path, tiny_model: Path, weights: int, **config: object) -> Path:
    """The tiny model's files, its weights file grown (sparse) to `weights` bytes and its config.json given
    `config` (shapes, the stored dtype): those are what the sizes are worked out from."""
    shutil.copytree(tiny_model, folder)
    with (folder / "model.safetensors").open("r+b") as fh:
        fh.truncate(weights)
    written = {**json.loads((folder / "config.json").read_text()), **config}
    (folder / "config.json").write_text(json.dumps(written))
    return folder


LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "dtype": "bfloat16"}


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
    weights = 16 * GIB  # a bf16 8B: 8.6e9 parameters
    base = big_model(tmp_path / "big", tiny_model, weights, **LLAMA_8B)
    spec = str(ROOT / "examples" / "quickstart.yaml")
    params = weights / 2

    def scratch(*sets: str) -> str:
        code, objects, said = rendered("render", spec, "--set", f"model.base={base}", "--set",
                                       "train.keep_checkpoints=2", *[a for s in sets for a in ("--set", s)])
        assert code == 0, said
        return scratch_request(objects)

    # full in bf16: the download, 3 checkpoints (2 kept + 1 being written) of the weights and Adam's two fp32
    # moments, the final weights, 5 GiB of installs and caches
    assert scratch("method.type=full", "model.dtype=bfloat16") == \
        gi(weights + 3 * params * (2 + 8) + params * 2 + 5 * GIB) == "277Gi"
    # the same base trained in fp32 (model.dtype auto on a CPU node): the parameters are as many, each 4 bytes
    assert scratch("method.type=full", "resources.accelerator=cpu") == \
        gi(weights + 3 * params * (4 + 8) + params * 4 + 5 * GIB) == "341Gi"
    # LoRA: the adapter from its rank and the targeted layers' shapes, in fp32 with Adam's moments
    lora = 64 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # r, layers, q o k v gate up down
    assert scratch("method.lora.r=64", "method.lora.target_modules=all-linear") == \
        gi(weights + 3 * lora * 4 * 3 + lora * 4 + 5 * GIB) == "28Gi"
    small = 8 * 32 * ((4096 + 4096) + (4096 + 1024))  # r=8 on q_proj and v_proj
    assert scratch("method.lora.r=8", "method.lora.target_modules=[q_proj, v_proj]") == \
        gi(weights + 3 * small * 4 * 3 + small * 4 + 5 * GIB) == "22Gi"
    code, _, said = rendered("render", spec, "--set", f"model.base={base}", "--set", "method.type=full",
                             "--set", "kubernetes.scratch_size=50Gi")
    assert code == 2 and "kubernetes.scratch_size" in said and "about " in said and "Traceback" not in said
    code, _, said = rendered("submit", spec, "--dry-run", "--set", f"model.base={base}", "--set", "method.type=full",
                             "--set", "kubernetes.scratch_size=50Gi")
    assert code == 2 and "kubernetes.scratch_size" in said
    code, objects, _ = rendered("render", spec, "--set", "model.base=hf://nobody/not-cached-here")
    assert code == 0 and scratch_request(objects) == "50Gi"  # not readable here: the fallback, nothing refused
    # plan --target k8s shows the manifests submit would apply: sized the same
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["plan", spec, "--target", "k8s", "--set", f"model.base={base}", "--set", "method.type=full",
                     "--set", "model.dtype=bfloat16", "--set", "resources.accelerator=nvidia",
                     "--set", "train.keep_checkpoints=2"])
    assert code == 0 and "storage: 277Gi" in out.getvalue(), out.getvalue()[-1500:]


def test_a_folder_with_both_formats_is_counted_once(tmp_path: Path, tiny_model: Path) -> None:
    from kubetune.k8s.storage import model_bytes

    base = big_model(tmp_path / "both", tiny_model, 3 * GIB)
    with (base / "pytorch_model.bin").open("wb") as fh:
        fh.truncate(3 * GIB)
    assert model_bytes(str(base)) == 3 * GIB


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


def test_a_serving_pod_counts_its_adapters(tmp_path: Path, tiny_model: Path) -> None:
    from kubetune.k8s.render.serve import Served
    from kubetune.k8s.storage import lora_parameters, served_bytes

    base = big_model(tmp_path / "base", tiny_model, 20 * GIB, **LLAMA_8B)
    here = tmp_path / "adapter"
    here.mkdir()
    with (here / "adapter_model.safetensors").open("wb") as fh:
        fh.truncate(3 * GIB)
    served = [Served("a", str(here), rank=64, base=str(base)), Served("b", "s3://bucket/runs/b/final/adapter",
                                                                      rank=64, base=str(base))]
    lora = lora_parameters(LLAMA_8B, "all-linear", 64)
    assert lora == 64 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    # the base once, the local adapter's files, the remote one's parameters in fp32
    assert served_bytes(served) == 20 * GIB + 3 * GIB + lora * 4


def test_a_hub_model_downloads_the_shards_its_index_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mistral's repositories ship consolidated.safetensors beside the shards: the same weights twice.
    The download asks the Hub (huggingface_hub.snapshot_download, recorded here) for the index first."""
    import huggingface_hub

    from kubetune.storage.model_files import _from_hub

    asked: list[list[str]] = []
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def snapshot_download(repo: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> str:
        asked.append(list(allow_patterns or []))
        (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors"}}))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert _from_hub("hf://mistralai/Mistral-7B-Instruct-v0.3", None, False) == snapshot
    assert "*.safetensors" not in asked[1] and asked[1][-2:] == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    assert not any(p.endswith(".safetensors") for p in asked[0])  # the first call: the index and configs
    (snapshot / "model.safetensors.index.json").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, allow_patterns=None: asked.append(allow_patterns) or str(snapshot))
    _from_hub("hf://org/single", None, False)
    assert "*.safetensors" in asked[-1]  # no index: the one file
