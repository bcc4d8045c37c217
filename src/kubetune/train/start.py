"""`model.adapter`: where a run starts from an earlier run's LoRA adapter (SFT before preference
tuning, or more SFT on new data). The adapter is found — in a run folder or URI, or an adapter folder —
and checked against this run's base before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec


def start_adapter(spec: RunSpec) -> Path | None:
    """The local folder of the adapter to continue (a remote run's final/ is brought here), or None."""
    uri = spec.model.adapter
    if not uri:
        return None
    from kubetune.runs.layout import COMPLETE
    from kubetune.runs.run import Run, read_run_spec
    from kubetune.storage.store import local_path

    path = local_path(uri)
    if path is not None and (path / "adapter_config.json").exists():
        return path
    if path is None:  # an adapter folder in object storage (a checkpoint of a remote run) is brought here
        from kubetune.storage.fetch import fetch
        from kubetune.storage.store import Store

        if Store(uri).exists("adapter_config.json"):
            return fetch(uri, exclude=("optimizer.pt", "scheduler.pt", "rng_state*", COMPLETE))
    try:
        earlier = read_run_spec(uri)  # a run (spec.yaml), or None for a model folder
    except UsageError:
        if path is None:
            raise  # storage's own reason (credentials, no such bucket)
        raise UsageError(f"model.adapter {uri} is neither a kubetune run (spec.yaml) nor an adapter folder "
                         "(adapter_config.json)", "pass the folder or URI of a finished LoRA run") from None
    if earlier is None:
        raise UsageError(f"model.adapter {uri} is a whole model folder, not an adapter",
                         "use it as model.base instead (and no model.adapter)")
    if earlier.method.type == "full":
        raise UsageError(f"model.adapter {uri} is a full fine-tune (no adapter)",
                         f"set model.base: {uri.rstrip('/')}/final/merged instead")
    if (earlier.model.base, earlier.model.revision) != (spec.model.base, spec.model.revision):
        raise UsageError(f"model.adapter {uri} was trained on {earlier.model.base}, and model.base is {spec.model.base}",
                         f"set model.base: {earlier.model.base} (an adapter only fits the base it was trained on)")
    final = Run.open(uri).final_model()
    if final.adapter is None or not (final.adapter / "adapter_config.json").exists():
        raise UsageError(f"model.adapter {uri} has no finished adapter (final/adapter)",
                         "let that run finish first, or export one of its checkpoints")
    return final.adapter


def describe(folder: Path) -> str:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    targets = cfg.get("target_modules")
    names = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets})) if isinstance(targets, list) else str(targets)
    return f"r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, targets {names}"
