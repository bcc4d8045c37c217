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
from kubetune.spec.models import FALLBACK_MODEL_STORAGE, FALLBACK_SCRATCH, QUANTITY, RunSpec
from kubetune.uris import has_scheme, hub_ref, is_hub, scheme

__all__ = ["model_bytes", "scratch_need", "serve_need", "served_bytes", "sized"]

GIB = 2**30
HEADROOM = 5 * GIB          # install at start, data cache, logs of the trainer
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
ADAM_BYTES = 8              # a parameter's two fp32 Adam moments in a full fine-tune's checkpoint
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def model_bytes(base: str, revision: str | None = None) -> int | None:
    """The bytes of a model's weight files, where this machine can tell without a download."""
    if is_hub(base):
        return _cached_hub_bytes(base, revision)
    if has_scheme(base):
        return None
    folder = Path(base)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for pattern in WEIGHTS for f in folder.glob(pattern)) or None


def _cached_hub_bytes(base: str, revision: str | None) -> int | None:
    from huggingface_hub import try_to_load_from_cache

    repo, rev = hub_ref(base, revision)
    index = try_to_load_from_cache(repo, "model.safetensors.index.json", revision=rev)
    if isinstance(index, str):
        total = json.loads(Path(index).read_text()).get("metadata", {}).get("total_size")
        return int(total) if isinstance(total, (int, float)) and total > 0 else None
    single = try_to_load_from_cache(repo, "model.safetensors", revision=rev)
    return Path(single).stat().st_size if isinstance(single, str) else None


def _bytes_per_parameter(spec: RunSpec) -> int:
    return 4 if spec.model.dtype in ("float32", "fp32") else 2


def scratch_need(spec: RunSpec, weights: int) -> int:
    """Bytes a training pod writes on its scratch volume for a base of `weights` bytes."""
    downloaded = weights if scheme(spec.model.base) not in ("pvc", "gs") else 0  # those are mounted, not copied
    if spec.method.type == "full":
        params = weights / _bytes_per_parameter(spec)
        checkpoint = weights + params * ADAM_BYTES  # the weights and the optimizer's two moments
        final = weights
    else:  # an adapter and its optimizer state: a few percent of the base at most
        checkpoint = final = max(weights * 0.05, 0.1 * GIB)
    kept = spec.train.keep_checkpoints + 1  # the next one is written before the oldest is deleted
    return int(downloaded + kept * checkpoint + final + HEADROOM)


def serve_need(spec: RunSpec, weights: int) -> int:
    """Bytes a serving pod writes on its models volume: the base (or a full run's weights) and adapters."""
    return int(weights * 1.1 + 2 * GIB)


def _gi(n: int) -> str:
    return f"{math.ceil(n / GIB)}Gi"


def _bytes(quantity: str) -> float:
    number = quantity.rstrip("KiMGTk")
    return float(number) * _UNITS[quantity[len(number):]]


def served_bytes(served: Sequence[Any]) -> int | None:
    """The weights a serving pod downloads: each whole model and each adapter's base, once."""
    models = {(s.base or s.uri, s.revision) for s in served}
    sizes = [model_bytes(uri, revision) for uri, revision in models]
    return sum(sizes) if sizes and all(sizes) else None  # type: ignore[arg-type]


def sized(spec: RunSpec, served: Sequence[Any] | None = None) -> RunSpec:
    """`spec` with its `auto` disk sizes worked out from the base's size (the fallback where it cannot
    be read); SpecError when a size set by hand is smaller than what the pods write. `served`: the
    models a serving Deployment answers for (k8s.serving's Served): its models volume is sized too."""
    k, s = spec.kubernetes, spec.serve
    if served is None:
        weights = model_bytes(spec.model.base, spec.model.revision)
        fields = [("kubernetes.scratch_size", k.scratch_size, FALLBACK_SCRATCH,
                   scratch_need(spec, weights) if weights else None,
                   "the base, the checkpoints kept and the final weights")]
    else:
        weights = served_bytes(served)
        fields = [("serve.model_storage", s.model_storage, FALLBACK_MODEL_STORAGE,
                   serve_need(spec, weights) if weights else None, "the served models and adapters")]
    values: dict[str, str] = {}
    problems: list[Problem] = []
    for where, value, fallback, need, what in fields:
        if value == "auto":
            values[where] = _gi(need) if need else fallback
        elif need and QUANTITY.fullmatch(value) and _bytes(value) < need:
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
