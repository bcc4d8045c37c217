"""A fine-tuning job: OpenAI's create request checked and turned into a kubetune run spec, and the
job record shaped as OpenAI's `fine_tuning.job` object.

The spec is the contract: a job is exactly `kubetune train` of the spec written into its run
folder, so everything a spec can say (LoRA rank, max_steps, max_length, …) is reachable through the
`kubetune` extension field, and the resolved hyperparameters come back in the job object.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from kubetune.errors import SpecError, UsageError
from kubetune.spec.load import apply_override, validate_spec
from kubetune.spec.models import RunSpec
from kubetune.storage.store import uri_basename

__all__ = ["JobRequest", "build_spec", "job_object", "model_name", "new_job_id"]

ACTIVE = ("validating_files", "queued", "running")
Auto = Union[Literal["auto"], float, int]
BASE_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}  # learning_rate_multiplier 1.0 is this


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto = "auto"
    batch_size: Auto = "auto"
    learning_rate_multiplier: Auto = "auto"
    beta: Auto = "auto"  # dpo


class MethodBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: MethodBody | None = None
    dpo: MethodBody | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None   # the older top-level form (supervised)
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    kubetune: dict[str, Any] | None = Field(
        None, description="kubetune's extension: spec settings, nested ({\"train\": {\"max_steps\": 40}}) or dotted "
                          "({\"method.lora.r\": 8})")

    def resolved_method(self) -> Method:
        method = self.method or Method(type="supervised")
        body = getattr(method, method.type) or MethodBody()
        if self.hyperparameters is not None:
            if method.type != "supervised":
                raise UsageError("hyperparameters: the top-level form is for supervised jobs",
                                 "give them in method.dpo.hyperparameters")
            body = MethodBody(hyperparameters=self.hyperparameters)
        return Method(type=method.type, **{method.type: body})


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """ft:BASE:SUFFIX:ID, OpenAI's shape: BASE is the base model's last path part, ID the job's own."""
    return f"ft:{uri_basename(base.removeprefix('hf://').split('@')[0])}:{suffix or ''}:{job_id.split('-', 1)[1][:8]}"


def model_uri(model: str) -> str:
    """`model` as the spec's model.base: a storage URI or local folder as is, else a Hub id."""
    if "://" in model:
        return model
    if model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", model):
        return f"hf://{model}"
    raise UsageError(f"model {model!r}: not a Hub id (org/name), a model folder or a storage URI",
                     "e.g. Qwen/Qwen3-0.6B, /models/llama, s3://bucket/models/llama")


def build_spec(job_id: str, req: JobRequest, train_uri: str, valid_uri: str | None, run_uri: str,
               defaults: dict[str, Any] | None = None) -> RunSpec:
    """The run spec of a job; SpecError names the request field (`kubetune.train.max_steps`, ...).
    `defaults`: the server's own settings (the kubernetes namespace), under the caller's."""
    method = req.resolved_method()
    hp = getattr(method, method.type).hyperparameters  # type: ignore[union-attr]
    raw: dict[str, Any] = {
        "name": job_id, "output": run_uri,
        "model": {"base": model_uri(req.model)},
        "data": {"train": [train_uri], "eval": valid_uri},
        "method": {"type": "lora", "objective": "sft" if method.type == "supervised" else "dpo"},
        "train": {"seed": req.seed if req.seed is not None else 42},
        "resources": {"accelerator": "auto"},
    }
    for key, value in [*_flat(defaults or {}).items(), *_flat(req.kubetune or {}).items()]:
        path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        if path[0] in ("name", "output"):
            raise UsageError(f"kubetune.{key}: set by the server (the job's id and storage)", "leave it out")
        apply_override(raw, path, value, f"kubetune.{key}")
    if hp.n_epochs != "auto":
        raw["train"]["epochs"] = hp.n_epochs
        raw["train"]["max_steps"] = -1
    if hp.batch_size != "auto":
        raw["train"]["total_batch_size"] = hp.batch_size
    if hp.learning_rate_multiplier != "auto":
        kind = raw["method"].get("type", "lora")
        raw["train"]["learning_rate"] = BASE_LR.get(kind, 2e-4) * float(hp.learning_rate_multiplier)
    if hp.beta != "auto":
        if method.type != "dpo":
            raise UsageError("method.supervised.hyperparameters.beta: only DPO has beta", "leave it out")
        raw["method"].setdefault("dpo", {})["beta"] = hp.beta
    try:
        return validate_spec(raw, "kubetune")
    except SpecError as exc:  # problems read `kubetune.train.max_steps: ...`, the field the caller sent
        for p in exc.problems:
            object.__setattr__(p, "where", "kubetune." + p.where.split(": ")[-1] if p.where else "kubetune")
        raise


def resolved_hyperparameters(spec: RunSpec) -> dict[str, Any]:
    """What the job trains with, in OpenAI's names (max_steps wins over epochs, as in the spec)."""
    base = BASE_LR.get(spec.method.type, 2e-4)
    out: dict[str, Any] = {"n_epochs": spec.train.epochs if spec.train.max_steps <= 0 else "auto",
                           "batch_size": spec.train.total_batch_size,
                           "learning_rate_multiplier": round(spec.train.learning_rate / base, 6)}
    if spec.method.objective == "dpo":
        out["beta"] = spec.method.dpo.beta
    return out


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    """The record as OpenAI's fine_tuning.job."""
    method = job["method"]
    hp = method.get(method["type"], {}).get("hyperparameters", {})
    return {
        "object": "fine_tuning.job", "id": job["id"], "model": job["model"], "created_at": job["created_at"],
        "finished_at": job.get("finished_at"), "fine_tuned_model": job.get("fine_tuned_model"),
        "organization_id": "org-kubetune", "result_files": [], "status": job["status"],
        "validation_file": job.get("validation_file"), "training_file": job["training_file"],
        "hyperparameters": {k: hp.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "trained_tokens": job.get("trained_tokens"), "error": job.get("error"), "user_provided_suffix": job.get("suffix"),
        "seed": job["seed"], "estimated_finish": None, "integrations": [], "method": method,
        "metadata": job.get("metadata"),
    }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and "." not in key and not _leaf_dict(name):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _leaf_dict(name: str) -> bool:
    """Spec fields whose value is itself a mapping (set whole, not merged key by key)."""
    return name in ("kubernetes.node_selector", "kubernetes.labels")
