"""The operator's policy for `kubetune server`: what a tenant (an API key) may ask for, and what the
operator decides for every job.

Trust (README, "Threat model"): the operator who starts the server is trusted; a key holder is not.
So a job request is read through an allow-list: a tenant sets training knobs that name nothing
outside its own job, each capped (`Limits`); everything that names a path, a URI, a host, a module,
a credential, a cluster object or resources is the operator's (`ServerConfig.spec`, per team in
`teams`), and the operator's values are applied last, so they always win.

The configuration is a YAML file (`kubetune server --config server.yaml`); every field has a
default that is safe for a shared server.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetune.errors import Problem, SpecError, UsageError
from kubetune.spec.models import OBJECTIVE_NAMES, EndpointSpec, JudgeSpec, ObjectiveName
from kubetune.train.objectives import objective_named

__all__ = ["Budgets", "Limits", "ModelEntry", "ModelsPolicy", "Refused", "ServerConfig", "Team",
           "check_tenant_settings", "flat", "load_config", "tenant_field"]


class Refused(UsageError):
    """A request field the caller may not set, or a value over the operator's limit: a 400 naming
    `param`, the field as the caller sent it."""

    def __init__(self, param: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{param}: {message}", hint)
        self.param = param


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Config):
    name: str = Field(description="What a tenant writes as `model`: an exact name (`llama-8b`) or a pattern over "
                                  "Hub ids (`Qwen/*`, `meta-llama/Llama-3.2-*`).")
    uri: str | None = Field(None, description="Where an exact name's model is (a folder, s3://, gs://, hf://org/name); "
                                              "default: the Hub id itself.")
    trust_remote_code: bool = Field(False, description="Run the model's own code (auto_map). Only for models the "
                                                       "operator has read: the code runs with the job's rights.")


class ModelsPolicy(_Config):
    root: str | None = Field(None, description="A folder of model folders: `model: NAME` is ROOT/NAME (one path "
                                               "part, no '..').")
    allow: list[ModelEntry] = Field(default_factory=list,
                                    description="Names and Hub-id patterns tenants may name. Default: none (only "
                                                "folders under root): a Hub repository is its owner's files, "
                                                "weights index and chat template, so the operator opts in to each.")


class Limits(_Config):
    """Caps on what one job may ask for (checked on the resolved job, whatever field set it)."""
    max_steps: int = Field(20_000, ge=1, description="Optimizer steps per job (max_steps, or epochs x rows / batch).")
    max_epochs: float = Field(20, gt=0)
    max_tokens_per_job: int = Field(2_000_000_000, ge=1, description="steps x batch size x max_length.")
    max_length: int = Field(8192, ge=16)
    max_batch_size: int = Field(512, ge=1, description="train.total_batch_size (hyperparameters.batch_size).")
    max_per_device_batch_size: int = Field(64, ge=1)
    max_lora_r: int = Field(256, ge=1)
    max_learning_rate: float = Field(1.0, gt=0)
    max_keep_checkpoints: int = Field(5, ge=1)
    max_checkpoints_per_job: int = Field(1000, ge=1, description="Checkpoints written (steps / save_every_steps).")
    max_evaluations_per_job: int = Field(200, ge=1, description="Eval passes during training "
                                                                "(steps / eval_every_steps).")
    max_eval_samples: int = Field(1000, ge=1)
    max_new_tokens: int = Field(2048, ge=1, description="eval.max_new_tokens and method.grpo.max_new_tokens.")
    max_generations: int = Field(16, ge=2, description="method.grpo.num_generations.")
    methods: list[Literal["lora", "qlora", "full"]] = Field(default_factory=lambda: ["lora", "qlora", "full"])
    objectives: list[ObjectiveName] = Field(default_factory=lambda: list(OBJECTIVE_NAMES))


class Budgets(_Config):
    """Per key: what one tenant may hold at once."""
    max_queued_jobs: int = Field(20, ge=1, description="Jobs validating or queued.")
    max_running_jobs: int = Field(2, ge=1, description="Jobs training at once (the rest wait, fairly across keys).")
    max_upload_bytes: int = Field(10 << 30, ge=1, description="Bytes of files stored at once.")


class Team(_Config):
    keys: list[str] = Field(description="Key names (`kubetune server key create --name`) or ids (key-...) in this team.")
    spec: dict[str, Any] = Field(default_factory=dict, description="The operator's spec settings for this team's "
                                 "jobs (e.g. kubernetes.namespace and kubernetes.queue: a Kueue LocalQueue per team), "
                                 "over the server's own.")
    limits: Limits | None = None
    budgets: Budgets | None = None


class GradersPolicy(_Config):
    """The graders tenants' jobs and /graders/run may use beyond the built-in ones."""
    python: bool = Field(True, description="Run tenants' `python` graders, each batch in a sandboxed process "
                         "(no files, network, subprocesses; limits below). false: refused.")
    python_seconds: float = Field(5.0, gt=0, le=120, description="Wall time one sample's grade() may take.")
    python_memory_mb: int = Field(1024, ge=256, le=16384, description="Address space of a grader's process.")
    models: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.:/-]{0,127}$")], JudgeSpec] = Field(
        default_factory=dict, description="Judge models tenants' score_model and label_model graders may name (their "
        "`model`): NAME: {base_url, model, api_key_env, timeout_s, max_tokens}, each an OpenAI-compatible endpoint "
        "you serve (kubetune serve, vLLM). Jobs get the judges their grader names, and the key's variable. None: "
        "model graders are refused.")
    embeddings: EndpointSpec | None = Field(None, description="The embedding model (an OpenAI-compatible "
                                            "/v1/embeddings endpoint: {base_url, model, api_key_env, ...}) "
                                            "text_similarity's cosine metric uses. None: cosine is refused.")


class ServingPolicy(_Config):
    """How succeeded jobs' models are served."""
    max_loras: int = Field(8, ge=1, le=256, description="Adapters of one base loaded at once (added to the running "
                           "engine when asked for; beyond this the least recently used is unloaded), and listed "
                           "for a Deployment below (the newest).")
    kubernetes: dict[str, Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*"
                                                       r"[a-z0-9])?$")]] = Field(
        default_factory=dict, description="BASE: NAMESPACE/CONFIGMAP — vLLM Deployments deployed with "
        "serve.runtime_adapters (the ConfigMap is NAME-serve-adapters): a job of that base that succeeds is added "
        "to their list, a deleted model taken off it. BASE is the base model's last path part.")


class ServerConfig(_Config):
    models: ModelsPolicy = Field(default_factory=ModelsPolicy)
    limits: Limits = Field(default_factory=Limits)
    budgets: Budgets = Field(default_factory=Budgets)
    validations: int = Field(2, ge=1, description="File validations run at once (each is a process).")
    spec: dict[str, Any] = Field(default_factory=dict, description="Spec settings of every job, over anything a "
                                 "tenant asked: resources, tracking, storage, kubernetes (namespace, image, "
                                 "service_account, secrets, priority_class, tolerations, queue), ...")
    rewards: dict[str, str] = Field(default_factory=dict, description="GRPO rewards tenants may pick by name: "
                                    "NAME: package.module:function.")
    env: list[str] = Field(default_factory=list, description="Names of this server's environment variables that "
                           "training processes also get (beyond the minimal set each job needs).")
    teams: dict[str, Team] = Field(default_factory=dict)
    graders: GradersPolicy = Field(default_factory=GradersPolicy)
    serving: ServingPolicy = Field(default_factory=ServingPolicy)
    integrations: list[Literal["wandb"]] = Field(
        default_factory=list, description="Trackers tenants may send their jobs to (OpenAI's `integrations`), "
        "with this server's credentials: wandb (WANDB_API_KEY / WANDB_ENTITY / WANDB_BASE_URL listed in `env`, "
        "or in the pods' kubernetes.secrets.wandb).")

    def team_of(self, key_id: str, key_name: str | None) -> Team | None:
        for team in self.teams.values():
            if key_id in team.keys or (key_name is not None and key_name in team.keys):
                return team
        return None

    def limits_for(self, team: Team | None) -> Limits:
        return team.limits if team is not None and team.limits is not None else self.limits

    def budgets_for(self, team: Team | None) -> Budgets:
        return team.budgets if team is not None and team.budgets is not None else self.budgets


def load_config(path: str | Path | None) -> ServerConfig:
    """The operator's configuration; every problem at once, as `server.yaml: limits.max_steps: ...`."""
    if path is None:
        return ServerConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})", "give the server's YAML configuration")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UsageError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must be a mapping (models, limits, budgets, spec, rewards, env, teams)")
    try:
        config = ServerConfig.model_validate(data)
    except ValidationError as exc:
        raise SpecError([Problem(f"{path}: {'.'.join(str(p) for p in e['loc'])}", e["msg"]) for e in exc.errors()],
                        "see the README's `kubetune server` configuration") from None
    problems = [Problem(f"{path}: rewards.{name}", f"{target!r} is not package.module:function")
                for name, target in config.rewards.items()
                if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", target)]
    problems += [Problem(f"{path}: env", f"{name!r} is not an environment variable name")
                 for name in config.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
    if problems:
        raise SpecError(problems)
    return config


# What a tenant may set in the `kubetune` extension: dotted spec paths, `*` for any one part. Each
# names nothing outside the job (no path, URI, host, module, credential, cluster object, resources).
TENANT_FIELDS = (
    "model.dtype", "model.chat_template",
    "data.format", "data.columns.*", "data.system_prompt", "data.max_length", "data.too_long", "data.loss_on",
    "data.reasoning", "data.bad_rows", "data.eval.split_ratio",
    "method.type", "method.objective", "method.lora.r", "method.lora.alpha", "method.lora.dropout",
    "method.lora.target_modules", "method.dpo.beta", "method.dpo.loss_type", "method.dpo.label_smoothing",
    "method.kto.beta", "method.kto.desirable_weight", "method.kto.undesirable_weight", "method.orpo.beta",
    "method.grpo.num_generations", "method.grpo.max_new_tokens", "method.grpo.temperature", "method.grpo.beta",
    "method.grpo.rewards", "method.grpo.eval_every_steps", "method.grpo.eval_generations",
    "train.epochs", "train.max_steps", "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio",
    "train.weight_decay", "train.max_grad_norm", "train.optim", "train.total_batch_size",
    "train.max_per_device_batch_size", "train.gradient_checkpointing", "train.save_every_steps",
    "train.keep_checkpoints", "train.eval_every_steps", "train.logging_steps", "train.seed", "train.mixed_precision",
    "train.sampling", "train.padding_free", "train.attention",
    "eval.metrics", "eval.max_new_tokens", "eval.num_samples",
)
# Free text a tenant may set, and how long it may be (names are short; a system prompt is a prompt).
TEXT_LIMITS = {"data.system_prompt": 8000}
TEXT_DEFAULT_LIMIT = 200
MAX_SETTINGS = 64
MAX_INT = 2**31 - 1  # what every integer field fits (a seed, a step count; a database INTEGER)
BUILTIN_REWARDS = ("exact_match", "regex", "length")
REWARD_KEYS = ("function", "weight", "column", "pattern", "max_chars")


def tenant_field(path: str) -> bool:
    parts = path.split(".")
    return any(len(parts) == len(p.split(".")) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, p.split(".")))
               for p in TENANT_FIELDS)


def is_spec_field(path: str) -> bool:
    """Whether a dotted path is (or is inside) a field of the run spec."""
    from kubetune.spec.models import RunSpec

    model: type[BaseModel] = RunSpec
    for part in path.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if _is_mapping(field.annotation):
            return True  # NAME: {...} (judges): anything under a mapping belongs to it
        inner = _models_in(field.annotation)
        if not inner:
            return True  # a value, list or mapping: anything under it belongs to it
        model = inner[0]
    return True


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict or any(_is_mapping(a) for a in typing.get_args(annotation))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def check_tenant_settings(flat: dict[str, Any], rewards: dict[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """The caller's `kubetune` settings (dotted), each allowed and of a safe shape, with registered
    reward names replaced by the operator's functions, and a problem for each key that is no setting
    at all; Refused names the first one that is the operator's."""
    if len(flat) > MAX_SETTINGS:
        raise Refused("kubetune", f"has {len(flat)} settings; at most {MAX_SETTINGS}")
    out: dict[str, Any] = {}
    unknown: list[Problem] = []
    for key, value in flat.items():
        param = f"kubetune.{key}"
        if not tenant_field(key) and is_spec_field(key):
            raise Refused(param, "is the operator's (a tenant sets training settings only: learning rate, schedule, "
                                 "LoRA, max_length, max_steps, eval metrics, DPO/KTO/GRPO settings)",
                          "leave it out; data come from your file ids, the model from `model`")
        if not tenant_field(key):  # no such setting: never applied, reported with a did-you-mean
            unknown.append(Problem(param, "not a setting a job can have" + _did_you_mean(key)))
            continue
        _check_value(param, value)
        if key == "model.chat_template" and value not in ("auto", "chatml"):
            raise Refused(param, "must be auto or chatml (a template file is the operator's)")
        if key == "method.grpo.rewards":
            value = _rewards(param, value, rewards)
        out[key] = value
    return out, unknown


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, [f.replace(".*", "") for f in TENANT_FIELDS], n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else " (see the README's list of job settings)"


def _check_value(param: str, value: Any, depth: int = 0) -> None:
    if depth > 4:
        raise Refused(param, "is nested too deeply")
    if isinstance(value, str):
        limit = TEXT_LIMITS.get(param.removeprefix("kubetune."), TEXT_DEFAULT_LIMIT)
        if len(value) > limit:
            raise Refused(param, f"is longer than {limit} characters")
    elif isinstance(value, list):
        if len(value) > 64:
            raise Refused(param, "has more than 64 entries")
        for item in value:
            _check_value(param, item, depth + 1)
    elif isinstance(value, dict):
        if len(value) > 64:
            raise Refused(param, "has more than 64 entries")
        for item in value.values():
            _check_value(param, item, depth + 1)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int) and abs(value) > MAX_INT:
        raise Refused(param, f"is out of range (between {-MAX_INT:,} and {MAX_INT:,})")
    elif isinstance(value, float) and not math.isfinite(value):
        raise Refused(param, "is not a finite number")


def _rewards(param: str, value: Any, registered: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise Refused(param, "must be a list of rewards, e.g. [{function: exact_match, column: answer}]")
    out = []
    for i, reward in enumerate(value):
        where = f"{param}.{i}"
        if not isinstance(reward, dict):
            raise Refused(where, "must be a mapping with `function`")
        extra = sorted(set(reward) - set(REWARD_KEYS))
        if extra:
            raise Refused(f"{where}.{extra[0]}", f"is not a reward setting ({', '.join(REWARD_KEYS)})")
        name = reward.get("function")
        if name in BUILTIN_REWARDS:
            out.append(dict(reward))
        elif isinstance(name, str) and name in registered:
            out.append({**reward, "function": registered[name]})
        else:
            offered = ", ".join([*BUILTIN_REWARDS, *sorted(registered)])
            raise Refused(f"{where}.function", f"{name!r} is not a reward this server offers ({offered}); "
                                               "reward code is the operator's (server config: rewards)")
    return out


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
REVISION = re.compile(r"[\w][\w.-]*")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


def resolve_model(name: str, models: ModelsPolicy) -> tuple[str, str | None, bool]:
    """(model.base, model.revision, trust_remote_code) of a base model a tenant names; Refused
    (param `model`) for anything the operator does not offer, paths and URIs included."""
    for entry in models.allow:
        if entry.uri is not None and name == entry.name:
            return entry.uri, None, entry.trust_remote_code
    hub, _, revision = name.partition("@")
    if HUB_ID.fullmatch(hub) and ".." not in hub and (not revision or (REVISION.fullmatch(revision)
                                                                       and ".." not in revision)):
        for entry in models.allow:
            if entry.uri is None and fnmatch.fnmatchcase(hub, entry.name):
                return f"hf://{hub}", revision or None, entry.trust_remote_code
    if models.root and FOLDER_NAME.fullmatch(name) and ".." not in name:
        # One folder name (the pattern has no separator, and no `..`): an entry of the root itself. It
        # may be the operator's link to a model kept elsewhere, as its listing (describe_models) shows.
        entry = Path(models.root).expanduser().resolve() / name
        if (entry / "config.json").is_file():
            return str(entry.resolve()), None, False
    raise Refused("model", f"{name!r} is not a model this server offers ({describe_models(models)})",
                  "name one of them, or the `ft:` model of one of your succeeded jobs")


def describe_models(models: ModelsPolicy) -> str:
    names = [e.name for e in models.allow]
    if models.root:
        root = Path(models.root).expanduser()
        try:
            names += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        except OSError:
            pass
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none"


# Fields of the operator's spec that the server itself sets for every job.
SERVER_FIELDS = ("name", "output", "model.base", "model.adapter", "data.train", "data.eval")


def check_operator_spec(spec: dict[str, Any], where: str) -> None:
    taken = [k for k in flat(spec) if any(k == f or k.startswith(f + ".") for f in SERVER_FIELDS)]
    if taken:
        raise UsageError(f"{where}.{taken[0]}: set by the server for each job (its id, storage, model and files)",
                         "leave it out of the configuration")


def check_limits(spec: Any, limits: Limits, rows: int, params: dict[str, str], eval_rows: int | None = None) -> None:
    """Refused when the resolved job asks for more than `limits`; `params` maps spec fields to the
    request field that set them (`train.epochs` → `hyperparameters.n_epochs`)."""
    t, m = spec.train, spec.method

    def over(field: str, value: float, cap: float, what: str = "") -> None:
        if value > cap:  # values are bounded (MAX_INT) before they get here: formatting cannot overflow
            raise Refused(params.get(field, f"kubetune.{field}"), f"{value:g} is over this server's limit of "
                                                                  f"{cap:g}{what}", "ask for less, or ask the operator")

    if m.type not in limits.methods:
        raise Refused(params.get("method.type", "kubetune.method.type"),
                      f"{m.type} is not offered here ({', '.join(limits.methods)})")
    if m.objective not in limits.objectives:
        raise Refused(params.get("method.objective", "method.type"),
                      f"{m.objective} is not offered here ({', '.join(limits.objectives)})")
    over("method.grpo.num_generations", m.grpo.num_generations, limits.max_generations)  # before the batch it sizes
    over("train.max_steps", t.max_steps, limits.max_steps)
    over("train.epochs", t.epochs, limits.max_epochs)
    over("train.total_batch_size", t.total_batch_size, limits.max_batch_size)
    over("train.max_per_device_batch_size", t.max_per_device_batch_size, limits.max_per_device_batch_size)
    over("train.learning_rate", t.learning_rate, limits.max_learning_rate)
    over("train.keep_checkpoints", t.keep_checkpoints, limits.max_keep_checkpoints)
    over("data.max_length", spec.data.max_length, limits.max_length)
    over("method.lora.r", m.lora.r, limits.max_lora_r)
    over("eval.num_samples", spec.eval.num_samples, limits.max_eval_samples)
    over("eval.max_new_tokens", spec.eval.max_new_tokens, limits.max_new_tokens)
    over("method.grpo.max_new_tokens", m.grpo.max_new_tokens, limits.max_new_tokens)
    over("method.grpo.eval_generations", m.grpo.eval_generations or 0, limits.max_generations)
    objective = objective_named(m.objective)
    answered = objective.answers_per_row(spec)  # GRPO's batch counts answers, num_generations a prompt
    steps = t.max_steps if t.max_steps > 0 else -(-int(rows * answered * t.epochs) // t.total_batch_size)
    field = "train.max_steps" if t.max_steps > 0 else "train.epochs"
    over(field, steps, limits.max_steps, " steps" if field == "train.epochs" else "")
    over("train.save_every_steps", steps // t.save_every_steps, limits.max_checkpoints_per_job, " checkpoints")
    evaluations = steps // t.eval_every_steps if t.eval_every_steps else 0
    over("train.eval_every_steps", evaluations, limits.max_evaluations_per_job, " evaluations")
    own = objective.held_out_passes(spec, steps)  # GRPO scores its eval prompts on its own schedule
    if own is not None:
        own_field, scorings, passes = own
        over(own_field, scorings, limits.max_evaluations_per_job, " evaluations")
        evaluations = passes
    # Every token the job processes: training rows, and the eval rows at each evaluation (and the end);
    # preference objectives hold two answers a row, GRPO generates its answers on top.
    per_row = objective.tokens_per_row(spec)
    eval_rows = eval_rows if eval_rows is not None else int(rows * (spec.data.eval_ratio() or 0))
    tokens = (steps * t.total_batch_size + (evaluations + 1) * eval_rows) * per_row
    if tokens > limits.max_tokens_per_job:
        raise Refused(params.get(field, f"kubetune.{field}"),
                      f"{steps:,} steps x {t.total_batch_size} rows (+ {evaluations + 1} x {eval_rows:,} eval rows) x "
                      f"{per_row:,} tokens is over this server's limit of {limits.max_tokens_per_job:,} tokens per job",
                      "fewer steps or epochs, a smaller batch or max_length, fewer evaluations")


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping of spec settings as dotted keys (`{"train": {"max_steps": 4}}` → `train.max_steps`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "." not in key and not _leaf_dict(name):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def _leaf_dict(name: str) -> bool:
    """Spec fields whose value is itself a mapping (set whole, not merged key by key)."""
    return name in ("kubernetes.node_selector", "kubernetes.labels")
