"""A fine-tuning job: OpenAI's create request checked and turned into a kubetune run spec, and the
job record shaped as OpenAI's `fine_tuning.job` object.

The spec is the contract: a job is exactly `kubetune train` of the spec the server built for it.
The caller reaches the training knobs of that spec through the `kubetune` extension field, within
the operator's allow-list and limits (policy.py); the operator's settings and the server's own
fields (name, output, model, data) are applied over them. The resolved hyperparameters come back in
the job object.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubetune.control.policy import GradersPolicy, Limits, Refused, check_limits, check_tenant_settings, flat
from kubetune.control.redact import redact
from kubetune.errors import SpecError, UsageError
from kubetune.spec.load import apply_override, validate_spec
from kubetune.spec.models import RunSpec
from kubetune.uris import uri_basename
from kubetune.train.objectives import objective_for, objective_for_openai
from kubetune.train.objectives.grpo import OPENAI_GROUP as GROUP

__all__ = ["JobPolicy", "JobRequest", "Start", "build_spec", "job_object", "model_name", "new_job_id"]

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


class ReinforcementHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto = "auto"
    batch_size: Auto = "auto"                  # prompts per step (each answered num_generations times)
    learning_rate_multiplier: Auto = "auto"
    eval_interval: Auto = "auto"               # steps between held-out scorings (auto: before and after only)
    eval_samples: Auto = "auto"                # answers per held-out prompt (auto: as in training)
    compute_multiplier: Auto = "auto"          # x the answers sampled per prompt (1.0: GROUP answers)
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


class ReinforcementBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)
    response_format: dict[str, Any] | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: MethodBody | None = None
    dpo: MethodBody | None = None
    reinforcement: ReinforcementBody | None = None


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a W&B project: no path, no URL


class WandbSettings(BaseModel):
    """OpenAI's `integrations[].wandb`: the tenant names the project, run name and tags; the account
    (entity, key, host) is the operator's."""
    model_config = ConfigDict(extra="forbid")
    project: str = Field(pattern=_NAME)

    @field_validator("project")
    @classmethod
    def _no_separator(cls, value: str) -> str:
        if "--" in value:
            raise ValueError("a project name may not contain '--' (it separates the tenant's prefix)")
        return value
    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]*$")
    entity: str | None = Field(None, max_length=128)
    tags: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]*$")]] | None = Field(
        None, max_length=50)


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbSettings


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=300)
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None   # the older top-level form (supervised)
    integrations: list[Integration] | None = Field(None, max_length=1)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 pairs; keys up to 64 characters, values up to 512 (OpenAI's limits).")
    kubetune: dict[str, Any] | None = Field(
        None, description="kubetune's extension: spec settings, nested ({\"train\": {\"max_steps\": 40}}) or dotted "
                          "({\"method.lora.r\": 8})")

    def resolved_method(self) -> Method:
        method = self.method or Method(type="supervised")
        if method.type == "reinforcement" and method.reinforcement is None:
            raise Refused("method.reinforcement.grader", "a reinforcement job needs a grader",
                          "give method.reinforcement.grader (string_check, text_similarity, python, score_model, "
                          "label_model or multi)")
        body = getattr(method, method.type) or MethodBody()
        if self.hyperparameters is not None:
            if method.type != "supervised":
                raise UsageError("hyperparameters: the top-level form is for supervised jobs",
                                 "give them in method.dpo.hyperparameters")
            given = getattr(method, method.type)
            if given is not None and given.hyperparameters.model_fields_set:  # two values for one setting
                raise Refused("hyperparameters", "give the hyperparameters once: in method.supervised."
                              "hyperparameters (the top-level form is the deprecated one), not in both")
            body = MethodBody(hyperparameters=self.hyperparameters)
        return Method(type=method.type, **{method.type: body})


EPOCH_CHECKPOINTS = 3  # OpenAI keeps the checkpoints of the last three epochs


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """ft:BASE:SUFFIX:ID, OpenAI's shape: BASE is the base model's last path part (of a continued
    `ft:` model, its own BASE), ID the job's own."""
    if base.startswith("ft:"):
        return f"ft:{base.split(':')[1]}:{suffix or ''}:{job_id.split('-', 1)[1][:8]}"
    return f"ft:{uri_basename(base.removeprefix('hf://').split('@')[0])}:{suffix or ''}:{job_id.split('-', 1)[1][:8]}"


@dataclass(frozen=True)
class Start:
    """Where a job starts, as the server resolved the caller's `model`: a base the operator offers,
    or (continuing one of the caller's own models) that job's base and its adapter."""
    base: str
    revision: str | None = None
    trust_remote_code: bool = False
    adapter: str | None = None


@dataclass(frozen=True)
class JobPolicy:
    """The operator's side of a job: spec layers applied over the caller's (server, then team),
    the limits, the registered rewards."""
    operator: tuple[dict[str, Any], ...] = ()
    limits: Limits = field(default_factory=Limits)
    rewards: dict[str, str] = field(default_factory=dict)
    integrations: tuple[str, ...] = ()   # trackers the operator lets tenants report to
    graders: GradersPolicy = field(default_factory=GradersPolicy)
    tenant: str = ""   # the caller's team, else its key's name or id: its W&B projects are under it


def build_spec(job_id: str, req: JobRequest, start: Start, train_uri: str, valid_uri: str | None, run_uri: str,
               policy: JobPolicy | None = None, rows: int = 0, eval_rows: int | None = None) -> RunSpec:
    """The run spec of a job. The caller's `kubetune` settings go through the allow-list (policy.py),
    the operator's spec settings are applied over them, and the server's own fields (name, output,
    model, data) last; Refused/SpecError name the request field (`kubetune.train.max_steps`, ...)."""
    policy = policy or JobPolicy()
    method = req.resolved_method()
    hp = getattr(method, method.type).hyperparameters  # type: ignore[union-attr]
    for name in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta", "eval_interval", "eval_samples",
                 "compute_multiplier"):
        value = getattr(hp, name, "auto")
        # Compared, not converted: float() of a 400-digit integer overflows; NaN fails both comparisons.
        if value != "auto" and not (isinstance(value, (int, float)) and 0 < value <= 1e6):
            raise Refused(f"{_hp_where(req, method)}.{name}", f"{value!r} is out of range (a number above 0, "
                                                               "at most 1,000,000, or auto)")
    fixed: dict[str, Any] = {
        "name": job_id, "output": run_uri,
        "model.base": start.base, "model.revision": start.revision, "model.trust_remote_code": start.trust_remote_code,
        "model.adapter": start.adapter, "data.train": [train_uri],
    }
    raw: dict[str, Any] = {
        "name": job_id, "model": {}, "data": {"eval": valid_uri},
        "method": {"type": "lora", "objective": objective_for_openai(method.type)},
        "train": {"seed": req.seed if req.seed is not None else 42},
        "resources": {"accelerator": "auto"},
    }
    params: dict[str, str] = {}
    allowed, unknown = check_tenant_settings(flat(req.kubetune or {}), policy.rewards)
    for key, value in allowed.items():
        if key == "data.eval.split_ratio":
            if valid_uri is not None:
                raise Refused(f"kubetune.{key}", "the eval rows are the validation_file's", "leave one of them out")
            raw["data"]["eval"] = {}
        _set(raw, key, value, f"kubetune.{key}")
    if hp.n_epochs != "auto":
        raw["train"]["epochs"] = hp.n_epochs
        raw["train"]["max_steps"] = -1
        params["train.epochs"] = f"{_hp_where(req, method)}.n_epochs"
    if method.reinforcement is not None:
        _reinforcement(method.reinforcement, policy, raw, params)
        if method.reinforcement.hyperparameters.reasoning_effort != "default" and _template_lacks(start.base,
                                                                                                   "reasoning_effort"):
            raise Refused(f"{_hp_where(req, method)}.reasoning_effort", f"{req.model}: the model's chat template "
                          "does not read reasoning_effort (gpt-oss's does)", "leave it out for this model")
    elif hp.batch_size != "auto":
        raw["train"]["total_batch_size"] = hp.batch_size
        params["train.total_batch_size"] = f"{_hp_where(req, method)}.batch_size"
    if hp.learning_rate_multiplier != "auto":
        kind = raw["method"].get("type", "lora")
        raw["train"]["learning_rate"] = BASE_LR.get(kind, 2e-4) * float(hp.learning_rate_multiplier)
        params["train.learning_rate"] = f"{_hp_where(req, method)}.learning_rate_multiplier"
    if getattr(hp, "beta", "auto") != "auto":
        if method.type != "dpo":
            raise UsageError("method.supervised.hyperparameters.beta: only DPO has beta", "leave it out")
        raw["method"].setdefault("dpo", {})["beta"] = hp.beta
    for layer in policy.operator:  # the operator's settings win over the caller's
        for key, value in flat(layer).items():
            _set(raw, key, value, f"server configuration: spec.{key}")
    for key, value in _tracking(req, policy, raw).items():
        _set(raw, key, value, key)
    for key, value in fixed.items():
        _set(raw, key, value, key)
    try:
        spec = validate_spec(raw, "kubetune")
    except SpecError as exc:  # problems read `kubetune.train.max_steps: ...`, the field the caller sent
        for p in exc.problems:
            object.__setattr__(p, "where", "kubetune." + p.where.split(": ")[-1] if p.where else "kubetune")
        raise SpecError(sorted([*exc.problems, *unknown], key=lambda p: p.where), exc.hint) from None
    if unknown:
        raise SpecError(unknown, "the README lists the settings a job can have")
    if spec.train.max_steps <= 0 and rows > 0 and "save_every_steps" not in raw["train"]:
        # OpenAI's cadence: a checkpoint at the end of each epoch, the last three kept (unless the caller
        # or the operator chose a cadence: `kubetune.train.save_every_steps`)
        per_epoch = -(-rows * objective_for(spec).answers_per_row(spec) // spec.train.total_batch_size)
        raw["train"]["save_every_steps"] = max(1, per_epoch)
        raw["train"].setdefault("keep_checkpoints", min(EPOCH_CHECKPOINTS, policy.limits.max_keep_checkpoints))
        spec = validate_spec(raw, "kubetune")
    check_limits(spec, policy.limits, rows, params, eval_rows)
    return spec


def _template_lacks(base: str, variable: str) -> bool:
    """Whether a base in a folder of this machine has a chat template that never reads `variable` (a
    base elsewhere is checked when the job validates its files, with the model's own tokenizer)."""
    from pathlib import Path

    from kubetune.serve.tool_parser import folder_template

    folder = Path(base)
    if not folder.is_dir():
        return False
    template = folder_template(folder)
    return template is None or variable not in template  # (none: ChatML, which reads no such variable)


def _reinforcement(body: ReinforcementBody, policy: JobPolicy, raw: dict[str, Any], params: dict[str, str]) -> None:
    """method.reinforcement as GRPO settings: the grader is the reward; each prompt is answered
    GROUP x compute_multiplier times; batch_size counts prompts (the spec's total_batch_size counts
    answers); the validation file is scored before, every eval_interval steps, and after."""
    from kubetune.graders import IN_PROCESS, GraderError, check_grader, cosine_graders, model_graders, parse_grader

    where = "method.reinforcement"
    if body.response_format is not None:
        raise Refused(f"{where}.response_format", "constrained (JSON schema) sampling during training is not "
                      "supported here", "leave it out and grade {{sample.output_json.FIELD}}: answers that are not "
                      "JSON score as the grader says")
    runnable = IN_PROCESS | ({"python"} if policy.graders.python else set())
    try:
        grader = parse_grader(body.grader, f"{where}.grader")
        check_grader(grader, frozenset(runnable), f"{where}.grader", policy.graders.models,
                     policy.graders.embeddings is not None)
    except GraderError as exc:
        hint = ("the operator has disabled python graders (server.yaml graders.python)"
                if exc.message.startswith("python") else None)
        raise Refused(exc.param, exc.message, hint) from None
    hp = body.hyperparameters
    generations = GROUP if hp.compute_multiplier == "auto" else max(2, round(GROUP * float(hp.compute_multiplier)))
    grpo = raw["method"].setdefault("grpo", {})
    judges = {sub.model for sub in model_graders(grader).values()}  # the job gets these, not every judge
    grpo.update(rewards=[{"function": "grader", "grader": grader.model_dump(exclude_none=True)}],
                num_generations=generations,
                sandbox={"seconds": policy.graders.python_seconds, "memory_mb": policy.graders.python_memory_mb},
                judges={n: policy.graders.models[n].model_dump(exclude_none=True) for n in sorted(judges)})
    if cosine_graders(grader) and policy.graders.embeddings is not None:
        grpo["embeddings"] = policy.graders.embeddings.model_dump(exclude_none=True)
    params["method.grpo.num_generations"] = f"{where}.hyperparameters.compute_multiplier"
    prompts = 4 if hp.batch_size == "auto" else max(1, round(float(hp.batch_size)))
    raw["train"]["total_batch_size"] = prompts * generations
    params["train.total_batch_size"] = f"{where}.hyperparameters.batch_size"
    if hp.eval_interval != "auto":
        grpo["eval_every_steps"] = max(1, round(float(hp.eval_interval)))
        params["method.grpo.eval_every_steps"] = f"{where}.hyperparameters.eval_interval"
    if hp.eval_samples != "auto":
        grpo["eval_generations"] = max(1, round(float(hp.eval_samples)))
        params["method.grpo.eval_generations"] = f"{where}.hyperparameters.eval_samples"
    if hp.reasoning_effort != "default":
        grpo["reasoning_effort"] = hp.reasoning_effort
    raw["data"]["columns"] = {"prompt": "messages"}  # OpenAI's rows: messages to answer, the rest is `item`


def _tracking(req: JobRequest, policy: JobPolicy, raw: dict[str, Any]) -> dict[str, Any]:
    """The job's `integrations` as tracking settings, added to whatever tracking the operator set."""
    out: dict[str, Any] = {}
    for k, integration in enumerate(req.integrations or []):
        if integration.type not in policy.integrations:
            raise Refused(f"integrations.{k}.type", f"{integration.type}: this server sends no jobs to it",
                          "the operator enables it in server.yaml (integrations: [wandb])")
        wandb = integration.wandb
        if wandb.entity is not None:
            raise Refused(f"integrations.{k}.wandb.entity", "the W&B account is the operator's", "leave entity out")
        report = list(raw.get("tracking", {}).get("report_to", []))
        out["tracking.report_to"] = [*report, "wandb"] if "wandb" not in report else report
        if not raw.get("tracking", {}).get("wandb_project"):  # an operator's project wins
            # one W&B account (the operator's) for every tenant: each tenant's projects are its own
            out["tracking.wandb_project"] = wandb_project(policy.tenant, wandb.project)
        out["tracking.run_name"] = wandb.name
        out["tracking.tags"] = list(wandb.tags or [])
    return out


def wandb_project(tenant: str, project: str) -> str:
    """TENANT-HASH--PROJECT in W&B's project characters (at most 128): the tenant's name made readable
    and a hash of it exact (two names that read alike, or share a long prefix, stay apart); a tenant's
    project cannot hold `--` (Integration refuses it), so no tenant can spell another's prefix."""
    if not tenant:
        return project
    readable = re.sub(r"[^A-Za-z0-9._]+", "-", tenant)[:48].strip("-.")
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:8]
    return f"{readable}-{digest}--{project}"[:128]


def _hp_where(req: JobRequest, method: Method) -> str:
    return "hyperparameters" if req.hyperparameters is not None else f"method.{method.type}.hyperparameters"


def _set(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    apply_override(raw, path, value, item)


def resolved_hyperparameters(spec: RunSpec) -> dict[str, Any]:
    """What the job trains with, in OpenAI's names (max_steps wins over epochs, as in the spec)."""
    base = BASE_LR.get(spec.method.type, 2e-4)
    out: dict[str, Any] = {"n_epochs": spec.train.epochs if spec.train.max_steps <= 0 else "auto",
                           "batch_size": spec.train.total_batch_size,
                           "learning_rate_multiplier": round(spec.train.learning_rate / base, 6)}
    out.update(objective_for(spec).openai_hyperparameters(spec))
    return out


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    """The record as OpenAI's fine_tuning.job."""
    method = job["method"]
    hp = method.get(method["type"], {}).get("hyperparameters", {})
    return {
        "object": "fine_tuning.job", "id": job["id"], "model": job["model"], "created_at": job["created_at"],
        "finished_at": job.get("finished_at"),
        # OpenAI's: null until the job succeeded (callers wait for it to be set, then chat with it)
        "fine_tuned_model": job.get("fine_tuned_model") if job["status"] == "succeeded" else None,
        "organization_id": "org-kubetune", "result_files": job.get("result_files") or [], "status": job["status"],
        "validation_file": job.get("validation_file"), "training_file": job["training_file"],
        "hyperparameters": {k: hp.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "trained_tokens": job.get("trained_tokens"), "error": _public_error(job.get("error")),
        "user_provided_suffix": job.get("suffix"),
        "seed": job["seed"], "estimated_finish": None, "integrations": job.get("integrations") or [], "method": method,
        "metadata": job.get("metadata"),
    }


def _public_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    return {**error, "message": redact(str(error.get("message", "")))} if error else None
