"""The per-device memory plan: what one training process will hold at its peak, from the model's
config, the method, the dtype, the strategy and the batch — before anything is loaded.

Weights, gradients and optimizer state follow from the parameter counts. Activations follow from
what the decoder layers save for backward, per token (a Llama-style layer under SDPA saves about
9h + 2kv + 4i values: the norms' inputs and outputs, q/k/v and the attention output, the MLP's
gate, up, activation and product; LoRA dropout adds a copy and a mask of each adapted layer's
input), plus the head (logits and the loss's log-softmax in fp32). With activation checkpointing a
layer keeps only its input, and one layer is recomputed at a time. The transient peak of backward
adds the logits' gradient and one layer's worth of temporaries. `bench/memory_plan.py` prints this
plan beside measured peaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.spec.models import RunSpec
from kubetune.uris import has_scheme, is_hub

GB = 1e9
GIB = 2**30

# A process's own footprint before the model: the Python runtime with torch and transformers
# imported (resident set on CPU), or the CUDA context and allocator slack on a GPU (not counted by
# the allocator, but taken from the device).
RUNTIME = {"cpu": 0.54 * GB, "gpu": 1.0 * GIB}

# Device memory of accelerators people train on, matched in node selector values
# (nvidia.com/gpu.product, cloud.google.com/gke-accelerator, instance types). Most specific first.
KNOWN_DEVICES: list[tuple[str, float]] = [
    (r"b200", 180 * GB), (r"h200", 141 * GB), (r"gh200", 96 * GB), (r"h100|p5\.", 80 * GB),
    (r"a100.*80|p4de\.", 80 * GB), (r"a100|p4d\.", 40 * GB), (r"l40s?", 48 * GB),
    (r"a10g|g5\.", 24 * GB), (r"\bl4\b|nvidia-l4|g6\.", 24 * GB), (r"a10\b", 24 * GB),
    (r"v100.*32", 32 * GB), (r"v100|p3\.", 16 * GB), (r"t4|g4dn\.", 16 * GB),
    (r"mi300x", 192 * GB), (r"mi250", 64 * GB), (r"gaudi3", 128 * GB), (r"gaudi2|dl1\.", 96 * GB),
]

# Input size of each adapted projection in a decoder layer, by the names families use.
_IN = {"q_proj": "h", "k_proj": "h", "v_proj": "h", "o_proj": "a", "gate_proj": "h", "up_proj": "h",
       "down_proj": "i", "qkv_proj": "h", "gate_up_proj": "h", "dense": "a", "fc1": "h", "fc2": "i",
       "query_key_value": "h", "dense_h_to_4h": "h", "dense_4h_to_h": "i", "c_attn": "h", "c_proj": "a", "c_fc": "h"}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of the architecture (from config.json, the text model's for multimodal ones)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any], params: int) -> Shape:
        cfg = {**cfg, **(cfg.get("text_config") or {})}
        h = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
        head_dim = int(cfg.get("head_dim") or (h // heads if heads else 0))
        return cls(hidden=h, layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
                   intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h),
                   heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
                   vocab=int(cfg.get("vocab_size") or 0), params=params)

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of a Llama-style layer's linear layers."""
        h, i, a, kv = self.hidden, self.intermediate, self.attn, self.kv
        return {"q_proj": (h, a), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (a, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(i * o for i, o in self.projections().values()) + 2 * self.hidden


@dataclass
class MemoryPlan:
    """Bytes per device at the peak of a training step, and where they go."""

    strategy: str            # single | ddp | fsdp
    world: int
    micro_batch: int
    seq_len: int
    checkpointing: str       # off | on | auto
    weights: float
    gradients: float
    optimizer: float
    activations: float       # saved for backward at the peak micro-batch (as the checkpointing policy runs it)
    activations_off: float   # the same micro-batch without checkpointing
    activations_on: float    # ... and with it on every layer
    transient: float
    runtime: float
    device: str
    device_memory: float | None
    offload: bool = False
    per_sequence: float = 0.0    # activations + transient per sequence of seq_len (for the largest micro-batch)
    sequences_per_row: int = 1   # the objective's (a preference pair: 2): micro_batch counts sequences
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return self.runtime + self.weights + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.peak <= self.device_memory

    @property
    def max_micro_batch(self) -> int | None:
        """The largest micro-batch of seq_len-token sequences that fits the device (None: unknown device)."""
        if self.device_memory is None or not self.per_sequence:
            return None
        fixed = self.peak - self.activations - self.transient
        return max(int((self.device_memory - fixed) // self.per_sequence), self.micro_batch if self.fits else 0, 0)

    def lines(self) -> list[str]:
        ckpt = {"off": "no activation checkpointing", "on": "activation checkpointing",
                "auto": "checkpointing long micro-batches (auto)"}[self.checkpointing]
        shard = f"fsdp over {self.world}" + (", offloaded to CPU" if self.offload else "") if self.strategy == "fsdp" \
            else "ddp" if self.strategy == "ddp" else "one process"
        out = [f"  memory per device ({shard}; micro-batch {self.micro_batch} x {self.seq_len} tokens; {ckpt}):",
               f"    weights {size_text(self.weights)}  gradients {size_text(self.gradients)}  optimizer {size_text(self.optimizer)}",
               f"    activations {size_text(self.activations_off)} without checkpointing, {size_text(self.activations_on)} with it;"
               f" backward peak +{size_text(self.transient)}; runtime {size_text(self.runtime)}",
               f"    peak ~{size_text(self.peak)}" + (f" of {size_text(self.device_memory)} ({self.device})"
                                                    if self.device_memory else " (device memory unknown: set "
                                                                               "resources.device_memory)")]
        best = self.max_micro_batch
        rows = (best or 0) // self.sequences_per_row
        if best is not None:
            if not best:
                out.append("    no micro-batch fits: the model's state alone exceeds the device")
            elif not rows:
                out.append(f"    no micro-batch fits: {best} sequence(s) would, a row holds {self.sequences_per_row}")
            else:
                out.append(f"    largest micro-batch that fits: {rows}" + (
                    f" rows ({rows * self.sequences_per_row} sequences)" if self.sequences_per_row > 1 else ""))
        out += [f"    note: {n}" for n in self.notes]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "micro_batch": self.micro_batch, "seq_len": self.seq_len,
                "checkpointing": self.checkpointing, "weights": int(self.weights), "gradients": int(self.gradients),
                "optimizer": int(self.optimizer), "activations": int(self.activations),
                "activations_without_checkpointing": int(self.activations_off),
                "activations_with_checkpointing": int(self.activations_on), "transient": int(self.transient),
                "runtime": int(self.runtime), "peak": int(self.peak),
                "device_memory": int(self.device_memory) if self.device_memory else None, "device": self.device,
                "max_micro_batch": self.max_micro_batch, "sequences_per_row": self.sequences_per_row,
                "fits": self.fits}


def size_text(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GB:.1f} GB" if n >= 0.95 * GB else f"{n / 1e6:.0f} MB"


def parse_size(text: str) -> float:
    """'80GB', '24GiB', '512MiB', '48Gi' → bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GB|GiB|MB|MiB|TB|TiB|G|Gi|M|Mi)", text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = {"GB": GB, "G": GB, "GiB": GIB, "Gi": GIB, "MB": 1e6, "M": 1e6, "MiB": 2**20, "Mi": 2**20,
            "TB": 1e12, "TiB": 2**40}[m.group(2)]
    return float(m.group(1)) * unit


def on_gpu(spec: RunSpec, local: bool) -> bool:
    """Whether the run's devices are accelerators: named in the spec, or (auto) what this machine has
    when it trains here; a cluster run with accelerator auto gets a GPU."""
    acc = spec.resources.accelerator
    if acc in ("nvidia", "amd", "gaudi"):
        return True
    if acc == "cpu":
        return False
    if local:
        from kubetune.train.devices import device_type

        return device_type(acc) != "cpu"
    return True


def device_memory(spec: RunSpec, local: bool) -> tuple[float | None, str]:
    """(bytes of one device, where that figure comes from): resources.device_memory; a known accelerator
    named in the node selector; here, the device itself (a CPU process: its share of RAM); else unknown."""
    res = spec.resources
    if res.device_memory:
        return parse_size(res.device_memory), "resources.device_memory"
    gpu = on_gpu(spec, local)
    if gpu:
        for value in spec.kubernetes.node_selector.values():
            for pattern, size in KNOWN_DEVICES:
                if re.search(pattern, value.lower()):
                    return size, value
    if local:
        if gpu:
            # Only a device that is here is asked (a laptop planning a run for a cluster's GPUs, Gaudi or
            # ROCm nodes has none of their runtimes): else the figure comes from the target or is unknown.
            from kubetune.train.devices import detect, device_name, device_total_memory, device_type

            found = detect()
            if found.kind != "cpu" and res.accelerator in ("auto", found.kind):
                device = device_type(found.kind)
                total = device_total_memory(device)
                if total:
                    return total, device_name(device) or found.kind
            return None, (f"unknown: no {res.accelerator} device here (set resources.device_memory, or a "
                          "node selector naming the device)")
        import psutil

        return psutil.virtual_memory().total / res.devices_per_node, \
            f"this machine's memory / {res.devices_per_node} process(es)"
    if not gpu and res.memory:
        return parse_size(res.memory) / res.devices_per_node, f"resources.memory / {res.devices_per_node}"
    return None, "unknown"


def resolve_strategy(spec: RunSpec, plan: MemoryPlan | None = None) -> str:
    """single (one process), ddp or fsdp. auto: what the memory plan chose (ddp unless replicas do not
    fit and shards do)."""
    if spec.resources.world_size == 1:
        return "single"
    if spec.resources.strategy != "auto":
        return spec.resources.strategy
    return plan.strategy if plan is not None else "ddp"


@dataclass(frozen=True)
class Inputs:
    shape: Shape
    seq_len: int          # the longest padded micro-batch's length
    half_len: int         # for checkpointing auto: the longest micro-batch that skips recompute
    local: bool
    # SFT: the rows' trained positions (those whose next token is trained), largest first. The output
    # head runs on the positions trained in any row of a micro-batch (train.trainer): at most the sum of
    # its rows' counts, at most its length. Empty: unknown, every position.
    trained: tuple[int, ...] = ()

    def head_positions(self, rows: int, length: int) -> int:
        """Positions the output head computes for a micro-batch of `rows` rows of `length` (an upper bound)."""
        if not self.trained:
            return rows * length
        return rows * min(length, sum(self.trained[:rows]))


def plan_inputs(spec: RunSpec, model_dir: Path, params: int, lengths: list[int], local: bool,
                trained: tuple[int, ...] = ()) -> Inputs:
    from kubetune.storage import read_model_config

    shape = Shape.from_config(read_model_config(model_dir), params)
    seq = max(lengths, default=spec.data.max_length) or spec.data.max_length
    return Inputs(shape, seq, seq // 2, local, trained)


def plan_memory(spec: RunSpec, inputs: Inputs, micro_batch: int | None = None, strategy: str | None = None,
                offload: bool | None = None, checkpointing: str | None = None, method: str | None = None) -> MemoryPlan:
    """The plan for the spec, or for a variant of it (the fixes `check_fits` suggests). `micro_batch` is in
    rows; the plan's is in sequences (a preference pair is two)."""
    from kubetune.train.batching import batch_shape
    from kubetune.train.objectives import objective_for

    objective = objective_for(spec)
    res, t = spec.resources, spec.train
    world = res.world_size
    rows = micro_batch or batch_shape(t.total_batch_size, t.max_per_device_batch_size, world).per_device
    mb = rows * objective.sequences_per_row(spec)
    strategy = strategy or (("single" if world == 1 else "ddp") if res.strategy == "auto" else
                            ("single" if world == 1 else res.strategy))
    offload = res.offload if offload is None else offload
    ckpt = checkpointing or {True: "on", False: "off", "auto": "auto"}[t.gradient_checkpointing]
    method = method or spec.method.type
    s = inputs.shape
    gpu = on_gpu(spec, inputs.local)
    wbytes = _weight_bytes(spec, gpu)
    abytes = 2 if (wbytes == 2 or _autocast_bf16(spec, gpu, s.hidden, inputs.local)) else 4

    # parameters: the linear layers of the decoder, and the rest (embeddings, head, norms)
    linear = s.layers * sum(i * o for i, o in s.projections().values())
    linear = min(linear, s.params)
    other = s.params - linear
    trainable = s.params if method == "full" else _lora_params(spec, s)
    weights = (linear * (0.55 if method == "qlora" else wbytes) + other * (2 if method == "qlora" else wbytes)
               + (trainable * 4 if method != "full" else 0))
    grad_bytes = 4 if method != "full" else wbytes
    gradients = trainable * grad_bytes
    optimizer = trainable * _optimizer_bytes(t.optim, 4 if method != "full" else wbytes)
    if gpu is False and abytes == 2 and method == "full":
        weights += linear * 2  # autocast keeps a bf16 copy of each linear weight for forward and backward
    if objective.reference_copy(spec, method):
        weights += s.params * wbytes  # the frozen reference model (sharded like the weights under FSDP)
    layer_weights = s.layer_params() * (0.55 if method == "qlora" else wbytes)
    if strategy == "fsdp":
        # each rank keeps 1/world; the layer being computed (and the next, prefetched) is gathered whole,
        # and so are its gradients before the reduce-scatter. On CPU the freed all-gather and
        # reduce-scatter buffers stay resident (glibc keeps them for reuse): the resident peak holds one
        # whole copy of the parameters and of the gradients besides the shards (measured: bench/memory_plan.py).
        gathered = (weights, gradients) if not gpu else (2 * layer_weights,
                                                         s.layer_params() * grad_bytes if method == "full" else 0)
        weights = (0 if offload else weights / world) + gathered[0]
        gradients = (0 if offload else gradients / world) + gathered[1]
        optimizer = 0 if offload else optimizer / world
    elif strategy == "ddp":
        gradients *= 2  # DDP's bucketed copy of every gradient, for the all-reduce

    def acts(rows: int, length: int, on: bool, every_position: bool = False) -> tuple[float, float]:
        """(saved for backward, backward's transient peak) for `rows` sequences of `length` tokens."""
        tokens = rows * length
        heads = tokens if every_position else inputs.head_positions(rows, length)
        per_layer = tokens * _layer_values(spec, s, method) * abytes + tokens * _lora_extra(spec, s, method, abytes)
        head = heads * s.vocab * (8 if abytes == 4 else 10) + tokens * 4 * s.hidden * abytes
        saved = (s.layers * tokens * s.hidden * abytes + per_layer if on else s.layers * per_layer) + head
        transient = heads * s.vocab * 4 + per_layer
        return saved, transient

    def policy(every_position: bool = False) -> tuple[float, float]:
        on = acts(mb, inputs.seq_len, True, every_position)
        if ckpt == "on":
            return on
        off = acts(mb, inputs.seq_len, False, every_position)
        if ckpt == "off":
            return off
        # auto: long micro-batches checkpoint, those up to half the longest do not
        return max(on, acts(mb, inputs.half_len, False, every_position), key=lambda x: x[0] + x[1])

    off, _ = acts(mb, inputs.seq_len, False)
    on, _ = acts(mb, inputs.seq_len, True)
    activations, transient = policy()
    # per sequence for sizing the largest micro-batch: with the head on every position, since the head's
    # share per row only grows with more rows (max_micro_batch never offers one that does not fit)
    per_seq = sum(policy(every_position=True)) / mb
    memory, where = device_memory(spec, inputs.local)
    plan = MemoryPlan(strategy, world, mb, inputs.seq_len, ckpt, weights, gradients, optimizer, activations, off, on,
                      transient, RUNTIME["gpu" if gpu else "cpu"], where, memory, offload, per_seq,
                      objective.sequences_per_row(spec))
    plan._inputs = inputs  # type: ignore[attr-defined]
    return plan


def _weight_bytes(spec: RunSpec, gpu: bool) -> int:
    dtype = spec.model.dtype
    if dtype == "auto":
        return 2 if gpu else 4
    return 4 if dtype == "float32" else 2


def _autocast_bf16(spec: RunSpec, gpu: bool, hidden: int, local: bool) -> bool:
    choice = spec.train.mixed_precision
    if choice != "auto":
        return choice in ("bf16", "fp16")
    if gpu:
        return True
    if not local:  # a cluster's CPUs: unknown here, planned without autocast (the larger activations)
        return False
    from kubetune.train.model import CPU_BF16_MIN_HIDDEN, cpu_has_native_bf16

    return hidden >= CPU_BF16_MIN_HIDDEN and cpu_has_native_bf16()


def _optimizer_bytes(optim: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter."""
    if "8bit" in optim:
        return 2
    if "adafactor" in optim:
        return 0.05 * param_bytes
    if optim.startswith("sgd"):
        return 0
    return 2 * param_bytes  # Adam's two moments, in the parameters' dtype


def _targets(spec: RunSpec, shape: Shape) -> list[str]:
    targets = spec.method.lora.target_modules
    return list(shape.projections()) if targets == "all-linear" else list(targets)


def _lora_params(spec: RunSpec, shape: Shape) -> int:
    return lora_parameters(shape, spec.method.lora.target_modules, spec.method.lora.r)


def lora_parameters(shape: Shape, targets: str | list[str], r: int) -> int:
    """LoRA's trainable parameters: r x (in + out) of each targeted linear layer, in every layer."""
    proj = shape.projections()
    dims = {"h": shape.hidden, "a": shape.attn, "i": shape.intermediate}
    total = 0
    for name in (list(proj) if targets == "all-linear" else list(targets)):
        i, o = proj.get(name, (dims[_IN.get(name, "h")], shape.hidden))
        total += r * (i + o)
    return shape.layers * total


def _layer_values(spec: RunSpec, shape: Shape, method: str) -> float:
    """Values a decoder layer saves for backward, per token (see the module docstring)."""
    return 9 * shape.hidden + 2 * shape.kv + 4 * shape.intermediate


def _lora_extra(spec: RunSpec, shape: Shape, method: str, abytes: int) -> float:
    """Bytes per token per layer that LoRA adds: with dropout, each adapter's dropped-out input and its
    mask; always, the rank-r output of A."""
    if method == "full":
        return 0.0
    dims = {"h": shape.hidden, "a": shape.attn, "i": shape.intermediate}
    names = _targets(spec, shape)
    inputs = sum(dims[_IN.get(n, "h")] for n in names)
    extra = len(names) * spec.method.lora.r * abytes
    if spec.method.lora.dropout > 0:
        extra += inputs * (abytes + 1)
    return extra


def check_fits(spec: RunSpec, plan: MemoryPlan) -> None:
    """Refuse a plan that cannot fit its device: exit 2 with the cheapest changes that would fit."""
    from kubetune import settings
    from kubetune.errors import UsageError

    if plan.fits or settings.skip_memory_check():
        return

    raise UsageError(f"the run needs ~{size_text(plan.peak)} per device and {plan.device} has {size_text(plan.device_memory)}"
                     f" (weights {size_text(plan.weights)}, gradients {size_text(plan.gradients)}, optimizer "
                     f"{size_text(plan.optimizer)}, activations {size_text(plan.activations)})",
                     ("; or ".join(fixes(spec, plan)) or "a device with more memory, or a smaller model") +
                     f" (if the plan is wrong for this setup, {settings.SKIP_MEMORY_CHECK}=1 runs it anyway)")


def fixes(spec: RunSpec, plan: MemoryPlan) -> list[str]:
    """Changes that make the plan fit, cheapest first (each with its peak)."""
    inputs: Inputs = plan._inputs  # type: ignore[attr-defined]
    out: list[str] = []
    gpu = on_gpu(spec, inputs.local)

    def consider(text: str, variant: MemoryPlan) -> None:
        if variant.fits:
            out.append(f"{text} (~{size_text(variant.peak)})")

    if plan.checkpointing == "off":
        consider("train.gradient_checkpointing: auto", plan_memory(spec, inputs, checkpointing="auto"))
    best = (plan.max_micro_batch or 0) // plan.sequences_per_row  # in rows (a pair: 2 sequences)
    if best:
        consider(f"train.max_per_device_batch_size: {best}", plan_memory(spec, inputs, micro_batch=best))
    if plan.world > 1 and plan.strategy != "fsdp":
        consider("resources.strategy: fsdp", plan_memory(spec, inputs, strategy="fsdp"))
    if plan.world > 1 and not plan.offload and gpu:
        consider("resources.strategy: fsdp with resources.offload: true",
                 plan_memory(spec, inputs, strategy="fsdp", offload=True))
    if spec.method.type == "full":
        consider("method.type: lora", plan_memory(spec, inputs, method="lora"))
    if spec.method.type != "qlora" and gpu and spec.resources.accelerator in ("nvidia", "auto"):
        consider("method.type: qlora", plan_memory(spec, inputs, method="qlora"))
    return out[:4]


def plan_for_run(spec: RunSpec, data: Any, local: bool) -> MemoryPlan:
    """The plan for prepared data (its longest training row sets the micro-batch length)."""
    from kubetune.train.plan import count_params

    lengths = [len(getattr(r, "input_ids", r)) for r in data.train.rows]  # a sample, or a pair (prompt + longer answer)
    inputs = plan_inputs(spec, data.model_dir, count_params(data.model_dir), lengths, local,
                         trained_counts(data.train.rows))
    return _with_notes(spec, _auto_sharded(spec, inputs))


def _auto_sharded(spec: RunSpec, inputs: Inputs) -> MemoryPlan:
    """The spec's plan; with strategy auto on several devices, FSDP's when replicas would not fit."""
    plan = plan_memory(spec, inputs)
    if spec.resources.strategy == "auto" and spec.resources.world_size > 1 and not plan.fits:
        sharded = plan_memory(spec, inputs, strategy="fsdp")
        if sharded.fits:
            sharded.notes.append("resources.strategy auto chose fsdp: replicas (ddp) would not fit")
            return sharded
    return plan


def _with_notes(spec: RunSpec, plan: MemoryPlan) -> MemoryPlan:
    """The objective's notes on its micro-batch (answers per prompt, reference model, ...)."""
    from kubetune.train.objectives import objective_for

    inputs: Inputs = plan._inputs  # type: ignore[attr-defined]
    sh = inputs.shape
    kv_per_token = 2 * sh.layers * sh.kv * (2 if on_gpu(spec, inputs.local) else 4)
    plan.notes += objective_for(spec).memory_notes(spec, plan, inputs.seq_len, kv_per_token)
    return plan


def trained_counts(rows: list[Any], keep: int = 4096) -> tuple[int, ...]:
    """The `keep` largest numbers of trained positions per row (a position is trained when the label of
    the next token is not ignored), largest first; () when rows carry no labels."""
    import heapq

    import numpy as np

    from kubetune.data.template import IGNORE

    if not rows or not hasattr(rows[0], "labels"):
        return ()
    counts = (int(np.count_nonzero(np.asarray(r.labels[1:]) != IGNORE)) for r in rows)
    return tuple(heapq.nlargest(keep, counts))


def plan_for_cluster(spec: RunSpec) -> MemoryPlan | None:
    """The plan for a run rendered for a cluster, when the base's config.json can be read without a
    download (a local folder, or the Hugging Face cache); sequences are taken at data.max_length."""
    folder = _readable_config_folder(spec)
    if folder is None:
        return None
    from kubetune.train.plan import count_params

    inputs = plan_inputs(spec, folder, count_params(folder), [], local=False)
    return _with_notes(spec, _auto_sharded(spec, inputs))


def _readable_config_folder(spec: RunSpec) -> Path | None:
    base = spec.model.base
    if is_hub(base):
        from huggingface_hub import try_to_load_from_cache

        from kubetune.uris import hub_ref

        repo, revision = hub_ref(base, spec.model.revision)
        found = try_to_load_from_cache(repo, "config.json", revision=revision)
        return Path(found).parent if isinstance(found, str) else None
    if has_scheme(base):
        return None
    folder = Path(base)
    return folder if (folder / "config.json").is_file() else None
