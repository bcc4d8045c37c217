"""Load the base model in the right dtype and wrap it for the chosen method (LoRA, QLoRA, full)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from kubetune.errors import Problem, SpecError, UsageError
from kubetune.spec.models import RunSpec


def resolve_dtype(dtype: str, accelerator: str) -> Any:
    import torch

    from kubetune.train.devices import bf16_supported, device_type

    device = device_type(accelerator)
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if dtype in ("bfloat16", "float16") and device == "cpu":
        raise UsageError(f"model.dtype {dtype} needs a GPU or Gaudi and this machine has none",
                         "use model.dtype: auto (float32 on CPU)")
    return getattr(torch, dtype)


# Measured on a 2-core AVX512-BF16 CPU, LoRA fwd+bwd of 8x256 tokens: bf16 autocast vs fp32 is 1.13x at
# hidden 64, 1.44x at 256, 1.63x at 512; but on the quickstart's tiny batches (hidden 64, ~500 tokens
# a step) casting overhead makes it 2x SLOWER. Real LLMs (hidden >= 2048) are far above the line.
CPU_BF16_MIN_HIDDEN = 256


def resolve_mixed_precision(spec: RunSpec, dtype: Any, hidden_size: int = 0) -> str:
    """'bf16', 'fp16' or 'fp32' for the Trainer's autocast, from train.mixed_precision and the hardware."""
    import torch

    choice = spec.train.mixed_precision
    if dtype in (torch.bfloat16, torch.float16):  # half-precision weights: autocast in the same type
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if choice != "auto":
        return choice
    if not use_cpu(spec):
        from kubetune.train.devices import bf16_supported, device_type

        return "bf16" if bf16_supported(device_type(spec.resources.accelerator)) else "fp16"
    return "bf16" if cpu_has_native_bf16() and hidden_size >= CPU_BF16_MIN_HIDDEN else "fp32"


def cpu_has_native_bf16() -> bool:
    # Without native bf16 instructions the same autocast is emulated and slower than fp32.
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_cpu(spec: RunSpec) -> bool:
    """Whether the Trainer runs on the CPU (transformers' use_cpu): not on a GPU or Gaudi here."""
    from kubetune.train.devices import device_type

    return device_type(spec.resources.accelerator) == "cpu"


def load_model(spec: RunSpec, model_dir: Path, sharded: bool = False, start: Path | None = None) -> Any:
    """The base model, ready for training with spec.method (PEFT-wrapped for lora/qlora); `sharded`:
    FSDP will shard it (QLoRA's 4-bit weights are then stored in a float type FSDP can flatten);
    `start`: an adapter folder to continue (model.adapter, resolved by train.start)."""
    from transformers import AutoModelForCausalLM

    from kubetune.train.fastpath import resolve_attention

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(spec.model.dtype, spec.resources.accelerator),
                              "trust_remote_code": spec.model.trust_remote_code,
                              "attn_implementation": resolve_attention(spec)}
    if spec.method.type == "qlora":
        kwargs["quantization_config"] = _qlora_config(kwargs["dtype"], sharded)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model.base {spec.model.base}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if spec.method.type == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.method.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.train.gradient_checkpointing is not False)
    if start is not None:  # model.adapter: continue that adapter (its own LoRA config) rather than a new one
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start, is_trainable=True)
    else:
        targets = check_target_modules(model, spec.method.lora.target_modules)
        lora = spec.method.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, config)
    if spec.train.gradient_checkpointing is not False:
        model.enable_input_require_grads()
    return model


def linear_module_names(model: Any) -> list[str]:
    """Distinct short names of the model's Linear layers (the LoRA candidates), minus the LM head."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    try:
        head = model.get_output_embeddings()
        names -= {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    except (AttributeError, NotImplementedError):
        names.discard("lm_head")
    return sorted(names)


def check_target_modules(model: Any, targets: str | list[str]) -> str | list[str]:
    """Every named target must match a Linear layer (a silent partial match is the classic bug:
    'q_proj vproj' trained only q_proj). Unknown names are one error listing the real names."""
    if targets == "all-linear":
        return targets
    available = linear_module_names(model)
    problems = []
    for i, name in enumerate(targets):
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            tip = f"did you mean {close[0]!r}? " if close else ""
            problems.append(Problem(f"method.lora.target_modules[{i}]",
                                    f"{name!r} matches no linear layer; {tip}the model has: {', '.join(available)}"))
    if problems:
        raise SpecError(problems, hint="use names from that list, or target_modules: all-linear")
    return list(targets)


def _qlora_config(dtype: Any, sharded: bool = False) -> Any:
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            "method.type qlora needs a CUDA GPU (bitsandbytes 4-bit), and this machine has none",
            "use method.type: lora here, or run on an NVIDIA GPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("method.type qlora needs bitsandbytes", "pip install 'kubetune[qlora]'") from None
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    # FSDP shards parameters of one float dtype: bitsandbytes then packs the 4-bit weights into the
    # compute dtype's storage (its documented FSDP-QLoRA setting) instead of uint8.
    extra = {"bnb_4bit_quant_storage": compute} if sharded else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, **extra)
