"""How much disk a run's pods write, from the base model's size where this machine can read it.

A training pod's scratch volume holds the downloaded base (the Hub's cache), the run's working copy
(the checkpoints kept, the one being written, the final weights), the data cache and an install at
start; a serving pod's models volume holds the base and the adapters it serves. `auto` sizes (the
defaults) become those figures, rounded up with headroom; a size set by hand that is smaller is
refused before anything is rendered (exit 2, naming the field and what to set), so a 70B model is
not evicted or out of space an hour into its download. Where the base's size cannot be read here (a
Hub model not in this machine's cache, a bucket), `auto` is the fixed fallback and nothing is refused.

The base's size: its weight files in a local folder, or the safetensors index (`metadata.total_size`)
or single file in the Hugging Face cache — nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from kubetune.errors import Problem, SpecError
from kubetune.k8s.render.common import quantity_bytes
from kubetune.spec.models import FALLBACK_MODEL_STORAGE, FALLBACK_SCRATCH, QUANTITY, RunSpec
from kubetune.uris import has_scheme, hub_ref, is_hub, scheme

__all__ = ["lora_parameters", "model_bytes", "model_config", "scratch_need", "serve_need", "served_bytes", "sized"]

GIB = 2**30
HEADROOM = 5 * GIB          # install at start, data cache, logs of the trainer
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
ADAM_BYTES = 8              # a parameter's two fp32 Adam moments in a full fine-tune's checkpoint


def model_bytes(base: str, revision: str | None = None) -> int | None:
    """The bytes of a model's weights as a pod downloads them (safetensors; .bin only where there are
    none), where this machine can tell without a download."""
    if is_hub(base):
        return _cached_hub_bytes(base, revision)
    if has_scheme(base):
        return None
    folder = Path(base)
    if not folder.is_dir():
        return None
    for patterns in (("*.safetensors",), WEIGHTS[1:]):  # a folder with both formats loads (and ships) one
        found = sum(f.stat().st_size for pattern in patterns for f in folder.glob(pattern))
        if found:
            return found
    return None


def _cached_hub_bytes(base: str, revision: str | None) -> int | None:
    from huggingface_hub import try_to_load_from_cache

    repo, rev = hub_ref(base, revision)
    index = try_to_load_from_cache(repo, "model.safetensors.index.json", revision=rev)
    if isinstance(index, str):  # the pod downloads the shards the index lists (storage.model_files)
        try:
            total = json.loads(Path(index).read_text()).get("metadata", {}).get("total_size")
        except (OSError, ValueError, AttributeError):  # a broken cache entry: the size is unknown here
            return None
        return int(total) if isinstance(total, (int, float)) and total > 0 else None
    single = try_to_load_from_cache(repo, "model.safetensors", revision=rev)
    return Path(single).stat().st_size if isinstance(single, str) else None


def model_config(base: str, revision: str | None = None) -> dict[str, Any]:
    """The model's config.json where this machine has it (a folder, the Hugging Face cache), else {}."""
    path: str | Path | None = None
    if is_hub(base):
        from huggingface_hub import try_to_load_from_cache

        repo, rev = hub_ref(base, revision)
        found = try_to_load_from_cache(repo, "config.json", revision=rev)
        path = found if isinstance(found, str) else None
    elif not has_scheme(base):
        path = Path(base) / "config.json"
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _dtype_bytes(name: Any) -> int:
    return 4 if str(name) in ("float32", "torch.float32") else 2


def _stored_bytes(config: dict[str, Any]) -> int:
    """Bytes per parameter in the files (config.json's dtype; bf16, the common case, when unsaid)."""
    text = config.get("text_config") or {}
    return _dtype_bytes(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
                        or text.get("dtype") or "bfloat16")


def _training_bytes(spec: RunSpec) -> int:
    """Bytes per parameter as the run trains: model.dtype, and auto is fp32 where there is no GPU."""
    if spec.model.dtype != "auto":
        return _dtype_bytes(spec.model.dtype)
    return 4 if spec.resources.accelerator in ("cpu", "auto") else 2


def lora_parameters(config: dict[str, Any], targets: str | list[str], rank: int) -> int | None:
    """LoRA's parameters at `rank` on the targeted layers (the memory plan's count, from config.json's
    shapes); None where the config does not give them."""
    from kubetune.train.memory import Shape, lora_parameters as counted

    shape = Shape.from_config(config, 0)
    return counted(shape, targets, rank) if shape.hidden > 0 and shape.layers > 0 else None


def scratch_need(spec: RunSpec, weights: int, config: dict[str, Any] | None = None) -> int:
    """Bytes a training pod writes on its scratch volume for a base of `weights` bytes on disk."""
    config = config or {}
    downloaded = weights if scheme(spec.model.base) not in ("pvc", "gs") else 0  # those are mounted, not copied
    params = weights / _stored_bytes(config)
    trained = _training_bytes(spec)
    if spec.method.type == "full":
        checkpoint = params * (trained + ADAM_BYTES)  # the weights and the optimizer's two moments
        final = params * trained
    else:  # the adapter in fp32 and its optimizer's moments
        lora = lora_parameters(config, spec.method.lora.target_modules, spec.method.lora.r)
        adapter = lora * 4 if lora else weights * 0.05
        checkpoint, final = adapter * (1 + ADAM_BYTES / 4), adapter
    kept = spec.train.keep_checkpoints + 1  # the next one is written before the oldest is deleted
    return int(downloaded + kept * checkpoint + final + HEADROOM)


def serve_need(weights: int) -> int:
    """Bytes a serving pod writes on its models volume: what it downloads, with 10% and 2 GiB to spare."""
    return int(weights * 1.1 + 2 * GIB)


def _gi(n: int) -> str:
    return f"{math.ceil(n / GIB)}Gi"


def served_bytes(served: Sequence[Any]) -> int | None:
    """What a serving pod downloads: each whole model and each adapter's base, once, and each adapter
    (its folder's files where they are here, else LoRA's parameters in fp32 at its rank)."""
    models = {(s.base or s.uri, s.revision) for s in served}
    sizes = [model_bytes(uri, revision) for uri, revision in models]
    if not sizes or not all(sizes):
        return None
    adapters = 0
    for s in (s for s in served if s.base):
        folder = Path(s.uri)
        found = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if not has_scheme(s.uri) and \
            folder.is_dir() else 0
        params = lora_parameters(model_config(s.base, s.revision), "all-linear", s.rank or 64)
        adapters += found or (params * 4 if params else int(0.05 * (model_bytes(s.base, s.revision) or 0)))
    return sum(sizes) + adapters  # type: ignore[arg-type]


def sized(spec: RunSpec, served: Sequence[Any] | None = None) -> RunSpec:
    """`spec` with its `auto` disk sizes worked out from the base's size (the fallback where it cannot
    be read); SpecError when a size set by hand is smaller than what the pods write. `served`: the
    models a serving Deployment answers for (k8s.serving's Served): its models volume is sized too."""
    k, s = spec.kubernetes, spec.serve
    if served is None:
        weights = model_bytes(spec.model.base, spec.model.revision)
        config = model_config(spec.model.base, spec.model.revision)
        fields = [("kubernetes.scratch_size", k.scratch_size, FALLBACK_SCRATCH,
                   scratch_need(spec, weights, config) if weights else None,
                   "the base, the checkpoints kept and the final weights")]
    else:
        weights = served_bytes(served)
        fields = [("serve.model_storage", s.model_storage, FALLBACK_MODEL_STORAGE,
                   serve_need(weights) if weights else None, "the served models and adapters")]
    values: dict[str, str] = {}
    problems: list[Problem] = []
    for where, value, fallback, need, what in fields:
        if value == "auto":
            values[where] = _gi(need) if need else fallback
        elif need and QUANTITY.fullmatch(value) and quantity_bytes(value) < need:
            problems.append(Problem(where, f"{value} is less than the pods write: about {_gi(need)} ({what}; the "
                                           f"weights are {(weights or 0) / GIB:.1f} GiB)"))
    if problems:
        raise SpecError(problems, "set the size shown (or auto, which works it out)")
    if not values:
        return spec
    kubernetes = k.model_copy(update={"scratch_size": values["kubernetes.scratch_size"]}) \
        if "kubernetes.scratch_size" in values else k
    serve = s.model_copy(update={"model_storage": values["serve.model_storage"]}) \
        if "serve.model_storage" in values else s
    return spec.model_copy(update={"kubernetes": kubernetes, "serve": serve})
