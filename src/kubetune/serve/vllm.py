"""The vLLM engine: the `vllm serve` command line for a run (pure, so it is tested without a GPU).

An adapter run is served without merging: the base is the model, the adapter a LoRA module named
after the run. The run's tokenizer, chat template and generation config are passed explicitly,
so vLLM renders the same prompt tokens as training and stops at the run's end-of-turn token; tool
calls are read back with the parser of the format that template writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import UsageError

# vLLM accepts only these LoRA ranks for --max-lora-rank
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VllmTarget:
    model: str                       # base model (adapter run) or the merged/full model folder or URI
    served_name: str                 # --served-model-name
    run_folder: str                  # tokenizer, chat_template.jinja and generation_config.json live here
    adapters: tuple[tuple[str, str], ...] = ()   # (name, path) LoRA modules
    max_lora_rank: int | None = None
    revision: str | None = None                  # Hub revision of the model
    tool_parser: str | None = None               # --tool-call-parser matching the run's chat template
    reasoning_parser: str | None = None          # --reasoning-parser for templates with <think> reasoning
    max_loras: int | None = None                 # adapters that may share one batch (several runs of one base)
    runtime_adapters: bool = False               # LoRA enabled for adapters loaded while it serves


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank`."""
    for allowed in _VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UsageError(f"method.lora.r: LoRA rank {rank} is above the largest vLLM serves ({_VLLM_LORA_RANKS[-1]})",
                     "merge the adapter (kubetune merge RUN) and serve the merged model, or train with a rank "
                     f"of at most {_VLLM_LORA_RANKS[-1]}")


def adapter_rank(adapter_dir: Path) -> int:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 8)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]]
    return max(ranks)


def vllm_command(target: VllmTarget, host: str = "0.0.0.0", port: int = 8000, max_num_seqs: int | None = None,
                 extra: tuple[str, ...] = ()) -> list[str]:
    cmd = ["vllm", "serve", target.model, "--host", host, "--port", str(port),
           "--served-model-name", target.served_name,
           "--tokenizer", target.run_folder,
           "--chat-template", f"{target.run_folder}/chat_template.jinja",
           "--generation-config", target.run_folder]
    if target.revision:
        cmd += ["--revision", target.revision]
    if target.adapters or target.runtime_adapters:
        cmd += ["--enable-lora"]
        if target.adapters:
            cmd += ["--lora-modules", *[f"{name}={path}" for name, path in target.adapters]]
        if target.max_lora_rank:
            cmd += ["--max-lora-rank", str(max_lora_rank(target.max_lora_rank))]
        if target.max_loras:
            cmd += ["--max-loras", str(target.max_loras)]
    if max_num_seqs:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if target.tool_parser:  # tool calls in answers come back as OpenAI tool_calls, read as trained
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", target.tool_parser]
    if target.reasoning_parser:  # <think>…</think> comes back as reasoning_content, not inside content
        cmd += ["--reasoning-parser", target.reasoning_parser]
    return cmd + list(extra)
