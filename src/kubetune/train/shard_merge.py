"""Fold a LoRA adapter into its base one weight at a time: memory is bounded by the largest merged
weight (in fp32, a few copies), not the model or its shards, so a bf16 7B merges on a 16 GB machine.

Each targeted weight becomes W + PEFT's own delta (`lora.Linear.get_delta_weight`, in fp32), stored in
the base's dtype under the base's key, shard and index (the base's own bytes elsewhere). Every merged
weight is read back from the written shard: each element must be W + delta rounded to its dtype
(exact, element by element) and finite, and W + delta must compute what PEFT's LoRA layer computes
(its forward, not the delta) on random inputs. A mismatch, an adapter module with no weight in the
base, or a weight of another shape refuses the merge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.errors import TrainingError, UsageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ADAPTER_PREFIX = "base_model.model."
# Adapter features the shard merge does not fold (kubetune never trains them); refused by name.
UNSUPPORTED = ("fan_in_fan_out", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "lora_bias",
               "trainable_token_indices")


@dataclass(frozen=True)
class ShardMergeResult:
    merged: int            # weights changed
    shards: int            # shard files written
    largest_weight: int    # bytes of the largest merged weight in fp32: what the merge holds at once
    worst: float           # largest per-layer difference from PEFT's LoRA forward, of the outputs' scale


def base_shards(base_dir: Path) -> dict[str, list[str]]:
    """{shard file: [tensor keys]} of a safetensors base; UsageError for a base in another format."""
    from safetensors import safe_open

    if (base_dir / INDEX).exists():
        weight_map: dict[str, str] = json.loads((base_dir / INDEX).read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    if (base_dir / SINGLE).exists():
        with safe_open(str(base_dir / SINGLE), "pt") as f:
            return {SINGLE: list(f.keys())}
    raise UsageError(f"{base_dir}: no {SINGLE} or {INDEX}; the merge reads safetensors weights",
                     "convert the base to safetensors (save_pretrained) and point model.base at it")


def adapter_modules(adapter_dir: Path) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """(LoraConfig, {base weight key: (lora_A weight, lora_B weight)}) of a saved PEFT LoRA adapter."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(adapter_dir))
    for name in UNSUPPORTED:
        if getattr(config, name, None):
            raise UsageError(f"{adapter_dir}: adapter_config.json sets {name}; the merge folds plain LoRA weights only")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix(ADAPTER_PREFIX).rpartition(".lora_")
        if key.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers: a whole weight, not a delta
            layer = key.removeprefix(ADAPTER_PREFIX).removesuffix(".base_layer.weight")
            raise UsageError(f"{adapter_dir}: the adapter carries its own copy of {layer}'s weight (PEFT saves one "
                             "when an adapter targets an embedding, or an lm_head tied to it); the merge folds LoRA "
                             "deltas only", "serve the adapter on its base (kubetune serve RUN: no merge needed), or "
                             f"train without {layer.rpartition('.')[2]} in method.lora.target_modules")
        if part not in ("A.weight", "B.weight"):
            raise UsageError(f"{adapter_dir}: adapter tensor {key} is not a LoRA A/B weight; the merge folds "
                             "plain LoRA linear layers only")
        pairs.setdefault(module + ".weight", {})[part[0]] = tensor
    missing = sorted(k for k, ab in pairs.items() if len(ab) != 2)
    if missing:
        raise UsageError(f"{adapter_dir}: {missing[0]} has only one of lora_A/lora_B; the adapter is incomplete")
    return config, {k: (ab["A"], ab["B"]) for k, ab in pairs.items()}


def merge_shards(base_dir: Path, adapter_dir: Path, out: Path, tolerance: float = 1e-4) -> ShardMergeResult:
    """Write the merged weights (shards, index, config) into `out`, a fresh folder; nothing is written
    outside it, and the caller removes it when this raises.

    A merged weight has the base weight's shape and dtype, so each output shard is the base shard's
    file (copied by the OS, never loaded) with the merged weights' bytes written over their own ranges:
    memory holds one weight at a time, whatever the shards' size."""
    import torch
    from safetensors import safe_open

    config, modules = adapter_modules(adapter_dir)
    shards = base_shards(base_dir)
    where = {key: shard for shard, keys in shards.items() for key in keys}
    if set(modules) - set(where):  # names the loaded model gives some stored weights, or none there
        loaded = loaded_names(base_dir, list(where))
        modules = {stored_key(base_dir, key, where, loaded): ab for key, ab in modules.items()}
    out.mkdir(parents=True, exist_ok=False)
    worst, largest = 0.0, 0
    generator = torch.Generator().manual_seed(0)
    for shard, keys in sorted(shards.items()):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise UsageError(f"{base_dir / INDEX}: shard {shard!r} is not a file name in the model folder")
        shutil.copyfile(base_dir / shard, out / shard)  # every weight the adapter leaves alone: the base's bytes
        ranges = data_ranges(out / shard)
        with (out / shard).open("r+b") as written:
            for key in (k for k in keys if k in modules):
                with safe_open(str(base_dir / shard), "pt") as f:
                    weight = f.get_tensor(key)
                layer = _lora_layer(weight, *modules[key], config, key)
                with torch.no_grad():
                    exact = weight.float() + layer.get_delta_weight("default")
                    largest = max(largest, weight.numel() * 4)
                start, end = ranges[key]
                data = exact.to(weight.dtype).contiguous().view(torch.uint8).numpy()
                if data.nbytes != end - start:  # same shape and dtype: the same bytes' room
                    raise TrainingError(f"{base_dir / shard}: {key} takes {end - start} bytes, its merge {data.nbytes}")
                written.seek(start)
                written.write(data.tobytes())
                written.flush()
                del weight, data
                with safe_open(str(out / shard), "pt") as back:  # check what is on disk, not what was meant
                    worst = max(worst, _weight_parity(layer, exact, back.get_tensor(key), key, tolerance, generator))
                del exact
    for name in (INDEX, "config.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out / name)
    for code in base_dir.glob("*.py"):  # a remote-code model's modeling files: config.json's auto_map names them
        shutil.copy(code, out / code.name)
    return ShardMergeResult(len(modules), len(shards), largest, worst)


def stored_key(base_dir: Path, key: str, where: dict[str, str], loaded: dict[str, tuple[str, bool]]) -> str:
    """The base checkpoint's key of the weight the adapter names `key` (the loaded model's name).

    Transformers renames some families' checkpoint keys when it loads them (its conversion mapping:
    Gemma 3 keeps `language_model.model.layers…` on disk and loads `model.language_model.layers…`),
    so an adapter trained on the loaded model names weights the files hold under another name; the
    same mapping, applied to the files' keys, finds them. A weight transformers builds from several
    stored tensors (fused experts) has no one tensor to fold into: refused, saying so."""
    if key in where:
        return key
    built = key if key in loaded else key.removesuffix(".weight")  # fused experts are parameters, not modules
    if built in loaded:
        stored, converted = loaded[built]
        if not converted:
            return stored
        raise UsageError(f"the adapter changes {key.removesuffix('.weight')}, which transformers builds from several "
                         f"stored tensors of the base ({stored}, …) when it loads it: there is no one weight to fold "
                         "it into", "serve the adapter on its base (kubetune serve RUN: no merge needed)")
    if key == "lm_head.weight" and _tied(_config(base_dir)):
        raise UsageError("the adapter changes lm_head, which this base ties to its input embeddings "
                         "(tie_word_embeddings: the checkpoint has no lm_head weight of its own)",
                         "serve the adapter on its base (kubetune serve RUN: no merge needed), or train without "
                         "lm_head in method.lora.target_modules")
    raise UsageError(f"the adapter changes {key.removesuffix('.weight')}, which the base's weights ({base_dir}) do not "
                     "have, under that name or the name transformers loads them as",
                     "merge with the base the run was trained on")


def loaded_names(base_dir: Path, keys: list[str]) -> dict[str, tuple[str, bool]]:
    """{the loaded model's name of a stored weight: (its key in the files, whether a converter builds it
    from several)}, as transformers names them when `AutoModelForCausalLM` (what training loads) loads
    this base: its conversion mapping for the model and each sub-model, then the base-model prefix
    added or stripped against the model's own names. The model is built on the meta device (no
    memory); {} where transformers cannot build it from config.json alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    try:
        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError):
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = model.state_dict()  # meta tensors: transformers tests its values against None
    prefix = model.base_model_prefix
    found: dict[str, tuple[str, bool]] = {}
    for stored in sorted(keys, key=dot_natural_key):  # transformers' order: some transforms hold state
        name, converter = rename_source_key(stored, renamings, converters, prefix, names)
        if name not in names and stored in names:  # as transformers: the key was right as stored
            name, converter = rename_source_key(stored, [], [], prefix, names)
        found.setdefault(name, (stored, converter is not None))
    return found


def _config(base_dir: Path) -> dict[str, Any]:
    path = base_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _tied(config: dict[str, Any]) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (first byte, end byte)} in a safetensors file: an 8-byte little-endian header size, the
    JSON header (offsets relative to the data after it), then the data."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _lora_layer(weight: Any, a: Any, b: Any, config: Any, key: str) -> Any:
    """PEFT's LoRA layer over the base weight (in fp32), holding this adapter's A and B."""
    import torch
    from peft.tuners.lora import Linear

    out_features, in_features = weight.shape if weight.dim() == 2 else (0, 0)
    if weight.dim() != 2 or a.shape != (a.shape[0], in_features) or b.shape != (out_features, a.shape[0]):
        raise UsageError(f"the adapter's {key.removesuffix('.weight')} (A {tuple(a.shape)}, B {tuple(b.shape)}) does "
                         f"not fit the base weight {tuple(weight.shape)}", "merge with the base the run was trained on")
    base = torch.nn.Linear(in_features, out_features, bias=False, device="meta")  # no random init to overwrite
    base.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
    layer = Linear(base, "default", config, r=a.shape[0], lora_alpha=config.lora_alpha,
                   use_rslora=config.use_rslora, lora_dropout=0.0, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a.float())
        layer.lora_B["default"].weight.copy_(b.float())
    return layer.eval()


def _beyond_rounding(stored: Any, exact: Any) -> bool:
    """Whether an element of `stored` is not `exact` rounded to its dtype (more than half a unit in the
    last place away). Rows at a time by the caller: the temporaries stay small."""
    import torch

    magnitude = stored.abs()
    half_ulp = (torch.nextafter(magnitude, torch.tensor(float("inf"), dtype=stored.dtype)) - magnitude).float() / 2
    return bool(((stored.float() - exact).abs() > half_ulp).any())


def _weight_parity(layer: Any, exact: Any, stored: Any, key: str, tolerance: float, generator: Any) -> float:
    """Two checks of one merged weight, each exact where it can be:
    - what is on disk is W + delta rounded to its dtype: every element within half a unit in the last
      place of the fp32 value (so a dropped, partial or wrong delta in the bytes is refused in any
      dtype), and finite;
    - W + delta computes what PEFT's LoRA layer computes (base(x) + B(A(x))·scaling, not the delta
      the merge used) on random inputs, in fp32, within `tolerance` of the outputs' scale.
    The second's difference is returned."""
    import torch

    if not bool(torch.isfinite(stored).all()) or not bool(torch.isfinite(exact).all()):
        raise TrainingError(f"merged {key} has NaN or infinite values; nothing was written",
                            "the adapter (or the base) holds non-finite weights: check the run's loss")
    if any(_beyond_rounding(stored[i:i + 256], exact[i:i + 256]) for i in range(0, stored.shape[0], 256)):
        raise TrainingError(f"merged {key} as written is not W + delta rounded to {stored.dtype}; nothing was written",
                            "report this with the run's manifest.json")
    x = torch.randn(8, exact.shape[1], generator=generator)
    with torch.no_grad():
        expected = layer(x)
        got = x @ exact.T
    scale = max(1.0, float(expected.pow(2).mean().sqrt()))
    diff = float((got - expected).abs().max()) / scale
    if not diff <= tolerance:  # NaN is refused too
        raise TrainingError(f"merged {key} differs from adapter-on-base by {diff:.1e} of its outputs' scale (more "
                            f"than {tolerance:g}); nothing was written", "report this with the run's manifest.json")
    return diff
