"""The run spec: one typed model per section of docs/design.md. Field descriptions become `--help`
text and the JSON Schema (`kubetune schema`). Cross-field rules live in `RunSpec._cross_checks`,
in one place, so every violation is reported together with the per-field ones."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")
QUANTITY = re.compile(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?")
FALLBACK_SCRATCH = "50Gi"         # kubernetes.scratch_size: auto, where the base's size cannot be read
FALLBACK_MODEL_STORAGE = "60Gi"   # serve.model_storage: auto, likewise


class _Section(BaseModel):
    # extra=forbid: a misspelt key must be an error, never a silently ignored default.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(_Section):
    base: str = Field(description="Base model: local folder, hf://org/name[@revision].")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of an hf:// base.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype. auto = bfloat16 on GPUs that support it, float32 on CPU."
    )
    chat_template: str = Field(
        "auto",
        description="auto = the tokenizer's own template (chatml if it has none); chatml; or a path to a Jinja file.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub (off: only trusted architectures).")
    adapter: str | None = Field(
        None, description="Start from an earlier run's LoRA adapter and keep training it: the run's folder or URI "
        "(s3://, gs://, pvc://), or an adapter folder. Its LoRA settings (r, alpha, targets) are the adapter's; "
        "model.base must be the base it was trained on.",
    )


class Columns(_Section):
    """Maps the standard field names to the dataset's column names."""

    messages: str = Field("messages", description="Column with OpenAI-style chat messages (OpenAI's fine-tuning file: "
                                                  "tools, tool_calls, per-message weight 0/1).")
    conversations: str = Field("conversations", description="ShareGPT column: a list of {from, value} turns.")
    tools: str = Field("tools", description="Column with the tools (OpenAI function schemas) offered in a conversation.")
    instruction: str = Field("instruction", description="Alpaca instruction column.")
    input: str = Field("input", description="Alpaca optional input column.")
    output: str = Field("output", description="Alpaca output column.")
    prompt: str = Field("prompt", description="Prompt column (prompt/completion format).")
    completion: str = Field("completion", description="Completion column (prompt/completion format).")
    text: str = Field("text", description="Plain text column (trained on every token).")
    system: str = Field("system", description="Optional per-row system prompt column (alpaca, prompt/completion).")


Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference",
                 "openai_preference", "kto"]


class DataSource(_Section):
    path: str = Field(description="File, folder, or hf://org/name[:split] dataset.")
    weight: float = Field(1.0, gt=0, description="Mixing weight: 0.5 takes half the rows, 2 repeats them twice.")
    format: Format | None = Field(None, description="Overrides data.format for this source.")
    columns: Columns | None = Field(None, description="Overrides data.columns for this source.")


class SplitRatio(_Section):
    split_ratio: float = Field(0.05, gt=0, lt=1, description="Fraction of the training rows held out for eval.")


def _source_kind(value: Any) -> str | None:
    # Choose the union branch from the value's shape, so errors come from one branch only
    # (pydantic would otherwise report every branch's complaint about the same value).
    if isinstance(value, dict):
        return "<ratio>" if "split_ratio" in value and "path" not in value else "<source>"
    if isinstance(value, str):
        return "<uri>"
    if isinstance(value, (DataSource, SplitRatio)):
        return "<ratio>" if isinstance(value, SplitRatio) else "<source>"
    return None


SourceRef = Annotated[
    Union[Annotated[str, Tag("<uri>")], Annotated[DataSource, Tag("<source>")]], Discriminator(_source_kind)
]
EvalRef = Annotated[
    Union[Annotated[str, Tag("<uri>")], Annotated[DataSource, Tag("<source>")], Annotated[SplitRatio, Tag("<ratio>")]],
    Discriminator(_source_kind),
]


class DataSpec(_Section):
    train: list[SourceRef] = Field(description="Training sources (URIs or {path, weight}).", min_length=1)
    eval: EvalRef | None = Field(
        default_factory=SplitRatio, description="Eval source, or {split_ratio}; null for no eval split."
    )
    format: Format = Field("auto", description="Row format; auto detects it per source from the columns.")
    columns: Columns = Field(default_factory=Columns, description="Column names, when they differ from the standard ones.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    max_length: int = Field(2048, ge=16, description="Maximum tokens per training row.")
    too_long: Literal["truncate", "drop", "error"] = Field("truncate", description="What to do with rows over max_length.")
    loss_on: Literal["assistant", "all"] = Field("assistant", description="Train on assistant turns only, or every token.")
    reasoning: Literal["train", "context"] = Field(
        "train", description="Assistant reasoning (reasoning_content), where the chat template renders it: trained with "
        "the answer, or context only (seen, not learned: the model learns the answer that follows it).")
    bad_rows: Literal["error", "skip"] = Field("error", description="Stop on malformed rows (listing all), or skip and count them.")

    @field_validator("train", mode="before")
    @classmethod
    def _one_source_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, (str, dict)) else value

    def sources(self) -> list[DataSource]:
        return [DataSource(path=s) if isinstance(s, str) else s for s in self.train]

    def eval_source(self) -> DataSource | None:
        if isinstance(self.eval, str):
            return DataSource(path=self.eval)
        return self.eval if isinstance(self.eval, DataSource) else None

    def eval_ratio(self) -> float | None:
        return self.eval.split_ratio if isinstance(self.eval, SplitRatio) else None


class LoraSpec(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="all-linear, or module names; a name matching no module is an error."
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: object) -> object:
        if isinstance(value, list) and not value:
            raise PydanticCustomError("empty", "must name at least one module, or be 'all-linear'")
        return value


class DPOSpec(_Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (TRL's beta).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = Field(
        "sigmoid", description="DPO loss: sigmoid (the paper's), hinge, ipo, robust (with label_smoothing).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed fraction of flipped preference labels.")


class KTOSpec(_Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable answers' loss (raise it when "
                                    "they are fewer than the undesirable ones).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable answers' loss.")


class ORPOSpec(_Section):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term beside the chosen answers' "
                        "likelihood (the paper's lambda, TRL's beta). No reference model.")


class RewardSpec(_Section):
    function: str = Field(description="exact_match, regex, length, grader (an OpenAI grader: `grader`), or your "
                          "own as package.module:function (TRL's reward signature: prompts, completions, **columns "
                          "→ list of floats).")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    column: str | None = Field(None, description="exact_match: the data column holding the right answer.")
    pattern: str | None = Field(None, description="regex: the whole answer must match it (1, else 0). exact_match: "
                                "compare the first group of its first match instead of the whole answer.")
    max_chars: int | None = Field(None, ge=1, description="length: answers longer than this are penalised "
                                  "(-(excess / max_chars), at most -1).")
    grader: dict[str, Any] | None = Field(None, description="grader: an OpenAI grader object (string_check, "
                                          "text_similarity, python, multi) scoring each answer against its row "
                                          "({{item.COLUMN}}); python graders run sandboxed (method.grpo.sandbox).")


class SandboxSpec(_Section):
    seconds: float = Field(5.0, gt=0, le=120, description="Wall time a python grader's grade() may take per answer "
                           "(one that takes longer scores unresponsive_reward_error).")
    memory_mb: int = Field(1024, ge=256, le=16384, description="Address space of the grader's process.")


class EndpointSpec(_Section):
    """An OpenAI-compatible endpoint the operator serves, that graders use (never named by URL)."""
    base_url: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
                          description="The endpoint's /v1 URL, e.g. http://judge.team-a.svc:8000/v1.")
    model: str | None = Field(None, max_length=300, description="The model's name at the endpoint (default: this "
                              "judge's own name).")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", description="The environment "
                                    "variable holding the endpoint's key (on Kubernetes, from a Secret the pod "
                                    "gets); the training process is given it.")
    api_key_secret: str | None = Field(None, pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?/[-._a-zA-Z0-9]+$",
                                       description="On Kubernetes: SECRET/KEY holding that key (the training pod "
                                       "gets it as api_key_env, by reference).")
    timeout_s: float = Field(60.0, gt=0, le=600, description="One request's wall time.")


class JudgeSpec(EndpointSpec):
    """A judge model for score_model/label_model graders: an OpenAI-compatible chat endpoint the
    operator serves (`kubetune serve`, vLLM). Graders name it by its key in `judges` (server.yaml
    `graders.models`), never by URL."""
    max_tokens: int = Field(1024, ge=1, le=32768, description="Most tokens a judgement may take (a grader's "
                            "sampling_params.max_completions_tokens is capped by it).")


class GRPOSpec(_Section):
    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward functions, summed with their weights.")
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (the group). train.total_batch_size "
                                 "counts answers and must be a multiple of it.")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer generated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generations.")
    beta: float = Field(0.0, ge=0, description="KL coefficient towards the reference (0: no reference model).")
    generation: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Who generates: vllm (colocated, GPUs with vllm installed), transformers; auto: vllm "
        "where it can run, else transformers (CPU included).")
    eval_every_steps: int = Field(0, ge=0, description="Score the eval prompts every this many steps as well "
                                  "(0: only before the first step and after the last).")
    eval_generations: int | None = Field(None, ge=1, description="Answers sampled per eval prompt (default "
                                         "num_generations).")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="Passed to a chat template that reads reasoning_effort (gpt-oss's); refused for one "
        "that does not.")
    sandbox: SandboxSpec = Field(default_factory=lambda: SandboxSpec(), description="Limits of python graders.")
    judges: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.:/-]{0,127}$")], JudgeSpec] = Field(
        default_factory=dict, description="Judge models score_model and label_model graders may name (their "
        "`model`), by name.")
    embeddings: EndpointSpec | None = Field(None, description="The embedding model text_similarity's cosine "
                                            "metric uses: an OpenAI-compatible /v1/embeddings endpoint.")

    def endpoints(self) -> dict[str, EndpointSpec]:
        """The graders' endpoints by their field (judges.NAME, embeddings)."""
        found: dict[str, EndpointSpec] = {f"judges.{n}": j for n, j in self.judges.items()}
        return {**found, **({"embeddings": self.embeddings} if self.embeddings else {})}


# The training objectives (kubetune.train.objectives.OBJECTIVES maps each to its module).
ObjectiveName = Literal["sft", "dpo", "kto", "orpo", "grpo"]
OBJECTIVE_NAMES: tuple[str, ...] = get_args(ObjectiveName)


class MethodSpec(_Section):
    type: Literal["lora", "qlora", "full"] = Field("lora", description="lora, qlora (4-bit base, CUDA only) or full.")
    objective: ObjectiveName = Field(
        "sft", description="sft: supervised fine-tuning on chats, instructions or text; dpo: direct preference "
        "optimisation on pairs (prompt, chosen, rejected); kto: answers labeled desirable or not (prompt, "
        "completion, label); orpo: odds-ratio preference optimisation on pairs (supervised learning of the chosen "
        "answers and a preference term in one loss, no reference model); grpo: reinforcement learning from "
        "method.grpo.rewards on prompts. The reference of dpo, kto (and grpo with beta > 0) is the starting model "
        "(with LoRA: the adapter disabled; with full: a frozen copy).")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (lora and qlora).")
    dpo: DPOSpec = Field(default_factory=DPOSpec, description="DPO settings (objective: dpo).")
    kto: KTOSpec = Field(default_factory=lambda: KTOSpec(), description="KTO settings (objective: kto).")
    orpo: ORPOSpec = Field(default_factory=lambda: ORPOSpec(), description="ORPO settings (objective: orpo).")
    grpo: GRPOSpec = Field(default_factory=lambda: GRPOSpec(), description="GRPO settings (objective: grpo).")


class TrainSpec(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 = derived from epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. adamw_torch, adamw_bnb_8bit.")
    total_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, across all devices.")
    max_per_device_batch_size: int = Field(8, ge=1, description="Upper bound per device; the rest is gradient accumulation.")
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Recompute activations to save memory. auto: only for micro-batches longer than half the "
        "longest one — the peak memory of always-on checkpointing, without its cost on short batches.",
    )
    save_every_steps: int = Field(100, ge=1, description="Checkpoint interval in optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept (oldest deleted first).")
    eval_every_steps: int | None = Field(None, ge=1, description="Eval loss interval; null = at the end only.")
    logging_steps: int = Field(10, ge=1, description="Progress line / event interval in steps.")
    seed: int = Field(42, description="Seed for data order, splits and initialisation.")
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Autocast compute precision (weights keep model.dtype). auto: bf16 on GPUs that support it and on "
        "CPUs with native bf16 instructions (AVX512-BF16/AMX) for models where it pays (hidden size >= 256), else fp32 (no autocast).",
    )
    sampling: Literal["length_buckets", "group_by_length", "random"] = Field(
        "length_buckets",
        description="Batch order. length_buckets: rows of almost equal length batched together (near-zero padding, "
        "same batch size); group_by_length: transformers' windowed grouping; random: plain shuffling.",
    )
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    padding_free: Union[bool, Literal["auto"]] = Field(
        "auto", description="Concatenate each micro-batch's rows into one sequence with position ids restarting per "
        "row (no padding; attention stays within each row). auto: on GPUs with FlashAttention-2.",
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="Attention kernel. auto: flash_attention_2 on NVIDIA GPUs where the flash-attn package "
        "is installed, else sdpa.",
    )
    liger: bool = Field(False, description="Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); "
                        "needs an NVIDIA GPU and the liger-kernel package.")
    compile: bool = Field(False, description="torch.compile the model (slower start, faster steps on GPUs).")


class TrackingSpec(_Section):
    report_to: list[Literal["mlflow", "wandb", "tensorboard"]] = Field(
        default_factory=list, description="transformers integrations to report to."
    )
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (else MLFLOW_TRACKING_URI).")
    experiment: str | None = Field(None, description="MLflow experiment / W&B project.")
    wandb_project: str | None = Field(None, max_length=128, description="W&B project, where it differs from "
                                      "`experiment` (a control-plane job's `integrations`).")
    run_name: str | None = Field(None, max_length=128, description="The tracker run's display name (default: the "
                                 "spec's name).")
    tags: list[str] = Field(default_factory=list, max_length=50, description="W&B run tags.")


class EvalSpec(_Section):
    metrics: list[Literal["loss", "rouge", "exact_match"]] = Field(
        default_factory=list, description="Metrics computed by `kubetune eval` (and at the end of train)."
    )
    max_new_tokens: int = Field(64, ge=1)
    num_samples: int = Field(32, ge=1, description="Eval rows used for generation metrics.")


class ResourcesSpec(_Section):
    accelerator: Literal["auto", "cpu", "nvidia", "amd", "gaudi"] = Field(
        "auto", description="auto = a local GPU if there is one, else CPU."
    )
    devices_per_node: int = Field(1, ge=1, description="Devices (processes) per node; >1 launches torchrun.")
    nodes: int = Field(1, ge=1, description="Nodes (Kubernetes only).")
    cpu: str | None = Field(None, description="CPU request per node, e.g. '8'.")
    memory: str | None = Field(None, description="Memory request per node, e.g. '48Gi'.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How several devices share the work. ddp: every device holds the whole model; fsdp: "
        "parameters, gradients and optimizer state are sharded over the devices (FSDP2); auto: ddp when the "
        "memory plan fits every device, else fsdp.",
    )
    offload: bool = Field(False, description="With fsdp: keep parameters, gradients and optimizer state in CPU "
                          "memory between uses (slower; for models that do not fit even sharded).")
    device_memory: str | None = Field(None, description="Memory of one device, e.g. '80GB' (default: the known "
                                      "accelerator's, or this machine's). The memory plan must fit in it.")

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.nodes


class StorageSpec(_Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...); default AWS_ENDPOINT_URL or AWS.")
    region: str | None = Field(None, description="S3 region; default the AWS chain (AWS_DEFAULT_REGION, profile).")
    profile: str | None = Field(None, description="AWS profile name for credentials (a reference; never put keys in the spec).")


class StageData(_Section):
    source: str | None = Field(None, description="Where the data comes from: hf://datasets/org/name, s3://..., a local path.")
    script: str | None = Field(None, description="Or a Python script that writes JSONL to $KUBETUNE_OUTPUT.")
    args: list[str] = Field(default_factory=list, description="Arguments for the script.")
    to: str | None = Field(None, description="Destination URI; default the data.train entry at the same position.")


class StageSpec(_Section):
    model: str | None = Field(None, description="Where the base model comes from (hf://org/name); copied to model.base.")
    data: list[StageData] = Field(default_factory=list, description="Datasets to deliver, by position in data.train.")
    exclude: list[str] = Field(default_factory=lambda: ["original/*", "*.pth", "consolidated.*"],
                               description="Glob patterns of files not copied (duplicate weight formats).")


class Toleration(_Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SecretsSpec(_Section):
    hf_token: str | None = Field(None, description="SECRET/KEY holding the Hugging Face token (e.g. hf-secret/token).")
    storage: str | None = Field(None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (envFrom).")
    api_key: str | None = Field(None, description="SECRET/KEY holding the serving API key (vLLM --api-key).")
    wandb: str | None = Field(None, description="SECRET/KEY holding the Weights & Biases API key (WANDB_API_KEY).")
    mlflow: str | None = Field(None, description="Secret with MLflow credentials: MLFLOW_TRACKING_USERNAME / "
                                                 "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN (envFrom).")

    @field_validator("hf_token", "api_key", "wandb")
    @classmethod
    def _secret_key(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise PydanticCustomError("secret_ref", "must be SECRET/KEY, e.g. hf-secret/token")
        return value


class KubernetesSpec(_Section):
    namespace: str = Field("default", description="Namespace of the run's objects.")
    image: str | None = Field(
        None, description="An image with kubetune installed (built from deploy/Dockerfile). Unset: the accelerator "
                          "vendor's public PyTorch image, and this kubetune with its pinned dependencies installed when "
                          "the pod starts (its wheel travels with the Job).")
    install_cache: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=253,
        description="PVC that keeps kubetune installed between pods when kubernetes.image is unset (a retried or "
                    "later pod finds it there); unset: each pod installs into its scratch volume. ReadWriteMany "
                    "for Jobs of several nodes or serving replicas; every pod that mounts it can write what the "
                    "others run, so one per team (the server's teams: spec layer), never shared across tenants.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    queue: str | None = Field(None, description="Kueue LocalQueue name (kueue.x-k8s.io/queue-name label).")
    priority_class: str | None = Field(None, description="PriorityClass of the pods (and Kueue workload priority).")
    service_account: str | None = Field(None, description="Service account (e.g. bound to a cloud identity for GCS).")
    cloud_identity: str | None = Field(
        None, description="Cloud identity `kubetune setup` binds the service account to: a GCP service account "
                          "(NAME@PROJECT.iam.gserviceaccount.com, GKE Workload Identity) or an AWS IAM role ARN (EKS IRSA).")
    cluster_queue: str | None = Field(None, description="Kueue ClusterQueue that `kubetune setup` points the "
                                                        "LocalQueue (kubernetes.queue) at.")
    operators: list[str] = Field(default_factory=list, description="Who may run kubetune in the namespace "
                                 "(`kubetune setup` binds the kubetune Role): user names, group:NAME, serviceaccount:[NAMESPACE/]NAME.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    secrets: SecretsSpec = Field(default_factory=SecretsSpec)
    scratch_size: str = Field("auto", description="Ephemeral scratch volume of a training pod: the downloaded base, "
                              "the run's working copy (checkpoints kept + the one being written + the final "
                              "weights), caches. auto: worked out from the base's size where this machine can read "
                              "it (a local folder, the Hugging Face cache), else 50Gi; a size smaller than that is "
                              "refused.")
    storage_class: str | None = Field(None, description="Storage class of the scratch volume (default: the cluster's).")
    shm_size: str = Field("16Gi", description="Size limit of /dev/shm (memory emptyDir).")
    tmp_size: str = Field("4Gi", description="Size limit of /tmp (node-local disk). With the pod's logs it is the "
                          "ephemeral-storage every pod requests (GKE Autopilot and the kubelet evict a pod that "
                          "writes more than it asked for).")
    run_as_user: int = Field(1000, ge=1, description="Non-root UID of every container.")
    run_as_group: int = Field(1000, ge=0)
    fs_group: int = Field(1000, ge=0)
    device_groups: list[int] | None = Field(
        None, description="Supplemental group ids of the pods. AMD GPUs (/dev/kfd, /dev/dri/renderD*) belong to the "
        "node's video and render groups, which a non-root container must be in (ROCm's container documentation; "
        "the AMD device plugin passes the devices, not the groups). Default for accelerator amd: [44, 109] (video "
        "and render on Ubuntu 22.04 nodes); the render group's id differs by node OS: read yours with "
        "`stat -c %g /dev/kfd /dev/dri/renderD128` on a node.")
    hugepages: str = Field("4Gi", description="hugepages-2Mi per pod on Gaudi nodes.")
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")],
              Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, description="Plain settings every container of the run gets, over kubetune's own (e.g. "
        "PT_HPU_LAZY_MODE: '1' to train Gaudi in lazy mode). Not for credentials: those go in kubernetes.secrets.")
    termination_grace_seconds: int = Field(180, ge=30, description="Time a preempted pod gets to checkpoint and upload.")
    backoff_limit: int = Field(6, ge=1, description="Job retries on disruption or transient failure (each resumes).")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")
    sweep: str | None = Field(None, description="The sweep this run belongs to (label kubetune.dev/sweep; set by kubetune sweep).")


class Autoscaling(_Section):
    min: int = Field(1, ge=1, description="Minimum replicas.")
    max: int = Field(4, ge=1, description="Maximum replicas.")
    metric: Literal["queue", "batch", "kv_cache"] = Field(
        "queue", description="What the HPA scales on, per pod: queue = vllm:num_requests_waiting, batch = "
                             "vllm:num_requests_running, kv_cache = vllm:kv_cache_usage_perc (0-1).")
    target: float | None = Field(None, gt=0, description="Target value of the metric per pod (default: queue 5, "
                                                         "batch 3/4 of serve.max_concurrency, kv_cache 0.8).")
    target_queue: float | None = Field(None, gt=0, description="Older name of target for metric: queue.")
    scale_down_seconds: int = Field(300, ge=0, description="Scale-down stabilisation window: replicas are removed "
                                                           "only after the metric stayed low this long.")
    monitoring: Literal["none", "servicemonitor", "podmonitoring", "keda"] = Field(
        "none", description="What makes the metric exist: keda (a ServiceMonitor and a KEDA ScaledObject with a "
                            "Prometheus trigger: no adapter to configure), servicemonitor (prometheus-operator; "
                            "`deploy` adds the rule to the Prometheus Adapter's own config) or podmonitoring (GKE "
                            "managed Prometheus and GKE's custom-metrics adapter). `kubetune doctor SPEC` says "
                            "which the cluster has.")
    prometheus_url: str = Field("http://prometheus-operated.monitoring.svc:9090", pattern=r"^https?://[^\s/]+(/\S*)?$",
                                description="(keda) The Prometheus that scrapes the serving pods; KEDA queries it.")
    adapter_namespace: str = Field("monitoring", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="(servicemonitor) Namespace of the Prometheus Adapter.")
    adapter_config: str = Field("prometheus-adapter", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="(servicemonitor) The ConfigMap whose config.yaml "
                                "the Prometheus Adapter loads its rules from (the Helm chart's name).")
    adapter_deployment: str = Field("prometheus-adapter", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", 
                                    description="(servicemonitor) The adapter's Deployment, "
                                    "restarted when its rules change (it reads them only at start).")


class ServeSpec(_Section):
    engine: Literal["auto", "vllm", "transformers"] = Field("auto", description="auto: vLLM on GPUs, else transformers.")
    replicas: int = Field(1, ge=1)
    max_concurrency: int = Field(64, ge=1, description="Requests admitted at once per replica (vLLM --max-num-seqs).")
    port: int = Field(8000, ge=1, le=65535)
    image: str | None = Field(
        None, description="Serving image (vLLM's OpenAI server). Unset: vLLM's build for resources.accelerator — "
                          "NVIDIA vllm/vllm-openai, AMD rocm/vllm, Intel Gaudi Intel's vllm-installer (vLLM with its "
                          "Gaudi plugin), CPU vLLM's CPU release image; pinned tags.")
    autoscaling: Autoscaling | None = Field(default_factory=Autoscaling, description="HPA on queue length; null = fixed replicas.")
    cpu: str = Field("2", description="CPU per serving pod.")
    memory: str = Field("10Gi", description="Memory per serving pod.")
    model_storage: str = Field("auto", description="Node-local disk per serving pod for the served models (base and "
                               "adapters, downloaded once: the download cache is on the same volume) — requested as "
                               "ephemeral-storage. auto: the base's size and headroom where this machine can read "
                               "it, else 60Gi; a size smaller than that is refused.")
    gpu_sharing: str = Field("none", description="none, time_sharing, mps, or mig:PROFILE (e.g. mig:1g.10gb): "
                                                 "the node selectors and resources GKE and the NVIDIA device plugin use.")
    gpu_clients: int = Field(2, ge=2, le=48, description="Pods per shared GPU (time_sharing, mps).")
    tool_parser: Literal["auto", "none", "hermes", "llama3_json", "mistral", "deepseek_v3"] = Field(
        "auto", description="How tool calls are read back from answers (vLLM --tool-call-parser): auto = the format "
                            "the run's chat template writes; none = answers stay text.")
    runtime_adapters: bool = Field(False, description="vLLM also serves adapters added while it runs: the "
                                   "Deployment gets --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING, a ConfigMap "
                                   "NAME-serve-adapters listing them (kept by `kubetune server`) and a sidecar "
                                   "(`kubetune serve-adapters`) that loads and unloads them at runtime.")
    max_loras: int = Field(8, ge=1, le=256, description="(runtime_adapters) adapters vLLM batches at once "
                           "(--max-loras); the control plane keeps at most this many listed per base.")
    max_lora_rank: int = Field(64, ge=1, le=512, description="(runtime_adapters) the largest LoRA rank an added "
                               "adapter may have (--max-lora-rank).")


class RunSpec(_Section):
    name: str = Field(description="Run name: output folder, Kubernetes object names, tracking run name.")
    model: ModelSpec
    data: DataSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    output: str | None = Field(None, description="Run output location; default runs/{name}.")
    resume: str = Field("auto", description="auto = latest complete checkpoint under output; never; or a checkpoint path.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    stage: StageSpec = Field(default_factory=StageSpec)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise PydanticCustomError(
                "name",
                "must be lowercase letters, digits and '-', start and end alphanumeric, at most 52 characters "
                "(it names Kubernetes objects)",
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> RunSpec:
        problems: list[tuple[str, str]] = []
        acc = self.resources.accelerator
        if self.method.type == "qlora" and acc in ("cpu", "amd", "gaudi"):
            problems.append(("method.type", f"qlora needs NVIDIA GPUs (bitsandbytes 4-bit); resources.accelerator is {acc}"))
        if self.model.dtype == "float16" and acc == "cpu":
            problems.append(("model.dtype", "float16 training needs a GPU; use float32 or auto on CPU"))
        if self.method.objective != "sft" and self.eval.metrics:
            problems.append(("eval.metrics", f"are SFT's generation metrics; with method.objective "
                             f"{self.method.objective} the eval "
                             "pairs give preference accuracy and reward margins (base vs tuned) on their own"))
        g = self.method.grpo
        if self.method.objective == "grpo":
            if not g.rewards:
                problems.append(("method.grpo.rewards", "grpo needs at least one reward function (exact_match, "
                                 "regex, length, or package.module:function)"))
            if self.train.total_batch_size % g.num_generations:
                problems.append(("train.total_batch_size", f"{self.train.total_batch_size} answers per step is not a "
                                 f"multiple of method.grpo.num_generations {g.num_generations}"))
        for i, r in enumerate(g.rewards):
            where = f"method.grpo.rewards.{i}"
            if r.function == "exact_match" and not r.column:
                problems.append((f"{where}.column", "exact_match compares with a data column: name it"))
            elif r.function == "regex" and not r.pattern:
                problems.append((f"{where}.pattern", "regex needs a pattern the answer must match"))
            elif r.function == "length" and not r.max_chars:
                problems.append((f"{where}.max_chars", "length needs max_chars"))
            elif r.function == "grader" and not r.grader:
                problems.append((f"{where}.grader", "function grader needs the grader object (OpenAI's shape: "
                                 "{type: string_check, name, input, reference, operation}, ...)"))
            elif r.function != "grader" and r.grader:
                problems.append((f"{where}.grader", f"is for function: grader, not {r.function}"))
            elif r.function not in ("exact_match", "regex", "length", "grader") and not re.fullmatch(
                    r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", r.function):
                problems.append((f"{where}.function", f"{r.function!r} is neither exact_match, regex, length, "
                                 "grader nor an import path package.module:function"))
            if r.pattern:
                try:
                    re.compile(r.pattern)
                except re.error as exc:
                    problems.append((f"{where}.pattern", f"not a regular expression: {exc}"))
        if self.model.adapter and self.method.type == "full":
            problems.append(("model.adapter", "continues a LoRA adapter, and method.type is full: for a full "
                             "fine-tune from an earlier run set model.base to its merged model (RUN/final/merged)"))
        if self.train.liger and acc in ("cpu", "amd", "gaudi"):
            problems.append(("train.liger", f"Liger kernels need NVIDIA GPUs (Triton); resources.accelerator is {acc}"))
        if self.train.attention == "flash_attention_2" and acc in ("cpu", "gaudi"):
            problems.append(("train.attention", f"flash_attention_2 needs a GPU; resources.accelerator is {acc}"))
        if self.train.mixed_precision == "fp16" and acc == "cpu":
            problems.append(("train.mixed_precision", "fp16 autocast needs a GPU; use bf16, auto or fp32 on CPU"))
        world = self.resources.world_size
        if self.train.total_batch_size % world:
            problems.append((
                "train.total_batch_size",
                f"{self.train.total_batch_size} is not divisible by the {world} processes "
                f"(nodes x devices_per_node); use a multiple of {world}",
            ))
        if self.resources.strategy == "fsdp" and world == 1:
            problems.append(("resources.strategy", "fsdp shards the model over several processes, and "
                             "nodes x devices_per_node is 1; use ddp (or auto), or more devices"))
        if self.resources.offload and acc == "cpu":
            problems.append(("resources.offload", "moves sharded state from accelerator memory to CPU memory; "
                             "with resources.accelerator cpu there is nothing to offload"))
        if self.resources.offload and self.resources.strategy == "ddp":
            problems.append(("resources.offload", "offload is FSDP's; set resources.strategy: fsdp (or auto)"))
        for where, size in (("kubernetes.tmp_size", self.kubernetes.tmp_size),
                            ("kubernetes.scratch_size", self.kubernetes.scratch_size),
                            ("kubernetes.shm_size", self.kubernetes.shm_size),
                            ("serve.model_storage", self.serve.model_storage)):
            auto = where in ("kubernetes.scratch_size", "serve.model_storage") and size == "auto"
            if not QUANTITY.fullmatch(size) and not auto:
                problems.append((where, f"{size!r} is not a Kubernetes quantity such as 4Gi, 500Mi or 60G"))
        if self.resources.memory is not None and not QUANTITY.fullmatch(self.resources.memory):
            problems.append(("resources.memory", f"{self.resources.memory!r} is not a Kubernetes quantity such as "
                             "48Gi or 500Mi"))
        if self.resources.device_memory is not None and not re.fullmatch(
                r"\d+(\.\d+)?\s*(GB|GiB|MB|MiB|TB|TiB|G|Gi|M|Mi)", self.resources.device_memory):
            problems.append(("resources.device_memory", f"{self.resources.device_memory!r} is not a size such as "
                             "80GB, 24GiB or 512MiB"))
        if self.eval.metrics and self.data.eval is None:
            problems.append(("eval.metrics", "needs eval data: set data.eval to a source or {split_ratio: 0.05}"))
        if self.train.max_steps == 0 or self.train.max_steps < -1:
            problems.append(("train.max_steps", "must be a positive number of steps, or -1 to use epochs"))
        if self.resume not in ("auto", "never") and not self.resume.strip():
            problems.append(("resume", "must be auto, never, or a checkpoint path"))
        if self.serve.autoscaling and self.serve.autoscaling.min > self.serve.autoscaling.max:
            problems.append(("serve.autoscaling.min", "must not be above serve.autoscaling.max"))
        a = self.serve.autoscaling
        if a and a.metric == "kv_cache" and (a.target or 0) > 1:
            problems.append(("serve.autoscaling.target", "kv_cache is a fraction: a target between 0 and 1"))
        if a and a.target_queue is not None and a.metric != "queue":
            problems.append(("serve.autoscaling.target_queue", "is the target of metric: queue; use target"))
        k = self.kubernetes
        if k.cloud_identity and not re.fullmatch(r"[^@\s]+@[^@\s]+\.iam\.gserviceaccount\.com|"
                                                 r"arn:aws[\w-]*:iam::\d{12}:role/\S+", k.cloud_identity):
            problems.append(("kubernetes.cloud_identity", f"{k.cloud_identity!r} is neither a GCP service account "
                             "(NAME@PROJECT.iam.gserviceaccount.com) nor an AWS IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"))
        if k.cloud_identity and not k.service_account:
            problems.append(("kubernetes.cloud_identity", "needs kubernetes.service_account (the account it is bound to)"))
        sharing = self.serve.gpu_sharing
        if sharing not in ("none", "time_sharing", "mps") and not re.fullmatch(r"mig:\d+g\.\d+gb", sharing):
            problems.append(("serve.gpu_sharing", f"{sharing!r} is not none, time_sharing, mps or mig:PROFILE "
                                                  "(a MIG profile such as mig:1g.10gb)"))
        if len(self.stage.data) > len(self.data.train) and any(d.to is None for d in self.stage.data):
            problems.append(("stage.data", "more entries than data.train: give each extra entry a `to` URI"))
        for i, d in enumerate(self.stage.data):
            if (d.source is None) == (d.script is None):
                problems.append((f"stage.data.{i}", "give exactly one of source or script"))
        if problems:
            # One error carrying every cross-field problem; spec/load.py splits it back into fields.
            raise PydanticCustomError("cross", "\n".join(f"{p}\t{m}" for p, m in problems))
        return self

    @property
    def output_uri(self) -> str:
        return self.output or f"runs/{self.name}"

