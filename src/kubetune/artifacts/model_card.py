"""A pushed model's card (README.md, the Hugging Face model card format: YAML front matter, then
Markdown): what it was trained from and on, how, and how it scored — read from the run itself
(spec.yaml, manifest.json, eval/metrics.json), never typed by hand."""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.spec.models import RunSpec
from kubetune.uris import hub_ref, is_hub

__all__ = ["model_card"]


def model_card(spec: RunSpec, manifest: dict[str, Any], metrics: dict[str, Any] | None, merged: bool) -> str:
    base = hub_ref(spec.model.base)[0] if is_hub(spec.model.base) else spec.model.base
    m, t = spec.method, spec.train
    front = {"base_model": base, "library_name": "transformers" if merged else "peft",
             "tags": ["kubetune", m.type, m.objective], "pipeline_tag": "text-generation"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {spec.name}", ""]
    what = "merged model" if merged else "LoRA adapter"
    lines += [f"A {what} fine-tuned from `{base}`" + (f" (revision `{spec.model.revision}`)" if spec.model.revision
                                                        else "") + f" with kubetune {_version(manifest, 'kubetune')}.",
              ""]
    lines += ["## Method", "", f"- {m.type}, objective {m.objective}"]
    if m.type != "full":
        targets = m.lora.target_modules if isinstance(m.lora.target_modules, str) else ", ".join(m.lora.target_modules)
        lines.append(f"- LoRA r={m.lora.r}, alpha={m.lora.alpha:g}, dropout={m.lora.dropout:g}, targets: {targets}")
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    lines += [f"- {steps}, learning rate {t.learning_rate:g} ({t.lr_scheduler}), {t.total_batch_size} sequences per "
              f"step, max length {spec.data.max_length}, seed {t.seed}", ""]
    data = manifest.get("data") or {}
    lines += ["## Training data", "", "| source | sha256 |", "| --- | --- |"]
    lines += [f"| `{source}` | `{digest}` |" for source, digest in sorted(data.items())] or ["| (not recorded) | |"]
    lines.append("")
    if metrics and isinstance(metrics.get("tuned"), dict):
        base_scores = metrics.get("base") or {}
        names = list(metrics["tuned"])
        lines += ["## Evaluation (base → tuned)", "",
                  f"On {metrics.get('num_samples', '?')} held-out samples.", "",
                  "| metric | base | tuned |", "| --- | --- | --- |"]
        lines += [f"| {n} | {_num(base_scores.get(n))} | {_num(metrics['tuned'].get(n))} |" for n in names]
        lines.append("")
    versions = manifest.get("versions") or {}
    if versions:
        lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "—"


def _version(manifest: dict[str, Any], name: str) -> str:
    return str((manifest.get("versions") or {}).get(name, ""))
