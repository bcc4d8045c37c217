"""GPU training throughput: TRL (defaults), TRL (padding-free + FlashAttention-2) and kubetune, side by side.

    python bench/gpu_throughput.py [--rows 4000] [--hidden 2048] [--layers 16] [--max-length 2048]

The command to run on any NVIDIA machine (it refuses to run without CUDA). One invocation, same
model (a random Llama built offline, ~0.9B parameters by default), same long-tailed chat data, same
LoRA and effective batch, one epoch each, bf16:
  (a) TRL SFTTrainer defaults (padded batches, SDPA)
  (b) TRL with padding_free=True and attn_implementation="flash_attention_2"
  (c) `kubetune train` with its defaults (FlashAttention-2 and padding-free when flash-attn is
      installed, length-bucketed batches, checkpointing only long micro-batches)
Each runs in its own process. Prints real (non-pad) tokens/s, MFU (6·N·tokens/s over the GPU's
bf16 peak, plus attention) and peak CUDA memory, then the ratios of (c) to (a) and to (b).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

BATCH, LR, R, ALPHA = 16, 2e-4, 16, 32


def trl_worker(model: Path, data: Path, padding_free: bool, max_length: int, out: Path) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    ds = load_dataset("json", data_files=str(data), split="train").remove_columns(["messages"])
    init = {"dtype": torch.bfloat16, "attn_implementation": "flash_attention_2" if padding_free else "sdpa"}
    cfg = SFTConfig(output_dir=str(out.parent / "trl-out"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                    learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10,
                    save_strategy="no", report_to="none", max_length=max_length, bf16=True, seed=42,
                    include_num_input_tokens_seen="non_padding", disable_tqdm=True, padding_free=padding_free,
                    model_init_kwargs=init)
    peft = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(model), args=cfg, train_dataset=ds, peft_config=peft)
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    out.write_text(json.dumps({"real_tokens": trainer.state.num_input_tokens_seen,
                               "runtime": result.metrics["train_runtime"], "loss": result.training_loss,
                               "peak_memory": torch.cuda.max_memory_allocated()}))


def kubetune_worker(model: Path, data: Path, max_length: int, work: Path) -> dict[str, float]:
    import yaml

    from kubetune.artifacts.events import EndEvent, read_events

    run = work / "kubetune-run"
    spec = {"name": "gpubench", "model": {"base": str(model), "dtype": "bfloat16"},
            "data": {"train": str(data), "eval": None, "max_length": max_length, "format": "messages"},
            "method": {"type": "lora", "lora": {"r": R, "alpha": ALPHA, "dropout": 0.05}},
            "train": {"epochs": 1, "learning_rate": LR, "total_batch_size": BATCH, "max_per_device_batch_size": BATCH,
                      "save_every_steps": 100000, "logging_steps": 10, "seed": 42},
            "output": str(run), "resources": {"accelerator": "nvidia"}}
    path = work / "gpubench.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "kubetune", "train", str(path)], capture_output=True, text=True,
                         cwd=ROOT)
    if res.returncode:
        sys.exit(f"kubetune failed:\n{res.stderr[-3000:]}")
    end = next(e for e in read_events(run / "events.jsonl") if isinstance(e, EndEvent))
    return {"real_tokens": end.tokens_seen, "runtime": end.train_runtime or 0.0, "loss": end.train_loss or 0.0,
            "peak_memory": end.peak_memory_bytes or 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--worker", choices=["trl", "trl-padding-free"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        trl_worker(args.model, args.data, args.worker == "trl-padding-free", args.max_length, args.out)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_throughput.py needs a CUDA device (run it on a GPU machine)")
    from train_throughput import CACHE, build_assets

    from kubetune.train.flops import device_peak, flops_per_token
    from kubetune.train.plan import count_params

    model, data = build_assets(args.rows, args.hidden, args.layers)
    work = CACHE / "gpu-work"
    work.mkdir(parents=True, exist_ok=True)
    params = count_params(model)
    name = torch.cuda.get_device_name(0)
    peak = device_peak("nvidia", name)
    per_token = flops_per_token(params, False, args.layers, args.hidden, args.max_length / 4)
    print(f"{name}; random Llama {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers); "
          f"{args.rows} long-tailed chat rows, max_length {args.max_length}; LoRA r={R}; batch {BATCH}; bf16", flush=True)
    results: dict[str, dict[str, float]] = {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for label, worker in (("(a) TRL defaults", "trl"), ("(b) TRL padding-free + FA2", "trl-padding-free")):
        out = work / f"{worker}.json"
        t0 = time.time()
        res = subprocess.run([sys.executable, __file__, "--worker", worker, "--model", str(model), "--data", str(data),
                              "--out", str(out), "--max-length", str(args.max_length)], env=env, capture_output=True,
                             text=True)
        if res.returncode:
            sys.exit(f"{label} failed:\n{res.stderr[-3000:]}")
        results[label] = json.loads(out.read_text())
        print(f"  done {label} in {time.time() - t0:.0f} s", flush=True)
    results["(c) kubetune defaults"] = kubetune_worker(model, data, args.max_length, work)
    print(f"\n{'':30}{'real tok/s':>11}{'MFU':>7}{'peak mem':>10}{'loss':>8}{'tokens':>10}")
    for label, r in results.items():
        r["tps"] = r["real_tokens"] / r["runtime"]
        r["mfu"] = r["tps"] * per_token / peak
        print(f"{label:30}{r['tps']:>11.0f}{r['mfu']:>6.1%}{r['peak_memory'] / 2**30:>8.1f}GB{r['loss']:>8.4f}"
              f"{r['real_tokens']:>10}")
    a, b, c = results.values()
    print(f"\nkubetune vs TRL defaults: tokens/s {c['tps'] / a['tps']:.2f}x, MFU {c['mfu'] / a['mfu']:.2f}x, "
          f"peak memory {c['peak_memory'] / a['peak_memory']:.2f}x")
    print(f"kubetune vs TRL padding-free + FA2: tokens/s {c['tps'] / b['tps']:.2f}x, MFU {c['mfu'] / b['mfu']:.2f}x, "
          f"peak memory {c['peak_memory'] / b['peak_memory']:.2f}x")


if __name__ == "__main__":
    main()
