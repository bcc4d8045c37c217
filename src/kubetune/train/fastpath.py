"""The GPU fast path, chosen from the spec and what this machine has: the attention kernel,
padding-free batches, Liger kernels. Everything here is the libraries' documented switches
(transformers' attn_implementation and use_liger_kernel, position-id packing); kubetune decides
when they apply and refuses combinations that cannot run."""

from __future__ import annotations

import importlib.util

from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec


def _nvidia_here(spec: RunSpec) -> bool:
    import torch

    return spec.resources.accelerator in ("auto", "nvidia") and torch.cuda.is_available() \
        and not getattr(torch.version, "hip", None)


def resolve_attention(spec: RunSpec) -> str:
    """train.attention; auto: flash_attention_2 on NVIDIA GPUs with flash-attn installed, else sdpa."""
    choice = spec.train.attention
    flash = importlib.util.find_spec("flash_attn") is not None
    if choice == "flash_attention_2":
        if not _nvidia_here(spec):
            raise UsageError("train.attention flash_attention_2 needs an NVIDIA GPU, and this machine has none",
                             "use train.attention: auto (sdpa here)")
        if not flash:
            raise UsageError("train.attention flash_attention_2 needs the flash-attn package",
                             "pip install flash-attn --no-build-isolation, or use train.attention: sdpa")
        return choice
    if choice == "auto":
        return "flash_attention_2" if flash and _nvidia_here(spec) else "sdpa"
    return choice


def resolve_padding_free(spec: RunSpec, attention: str) -> bool:
    """train.padding_free; auto: with FlashAttention-2, whose varlen kernel makes packed rows free.
    (With sdpa/eager the rows are packed correctly too, through a block-diagonal mask.)"""
    choice = spec.train.padding_free
    return attention == "flash_attention_2" if choice == "auto" else bool(choice)


def check_liger(spec: RunSpec) -> bool:
    if not spec.train.liger:
        return False
    if not _nvidia_here(spec):
        raise UsageError("train.liger needs an NVIDIA GPU (Liger's kernels are Triton), and this machine has none",
                         "set train.liger: false here")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UsageError("train.liger needs the liger-kernel package", "pip install 'kubetune[gpu]' (or liger-kernel)")
    return True
