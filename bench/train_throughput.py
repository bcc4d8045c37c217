"""Training throughput: plain TRL vs TRL + group_by_length vs kubetune's defaults, side by side.

    python bench/train_throughput.py [--rows 320] [--hidden 512] [--layers 6]

One invocation, same machine, same model, same data, same effective batch (8 sequences per step),
one epoch each, so every configuration trains on the same real (non-pad) tokens:
  (a) TRL SFTTrainer defaults: per-device batch 8, no packing, random order
  (b) (a) + train_sampling_strategy="group_by_length" (the best one-line stock option)
  (c) `kubetune train` with kubetune's defaults
Each runs in its own process; peak RSS is that process's (wait4). The model is a random Llama
(~20M parameters, built offline); the data is generated chat with a long-tailed length distribution.
The last line compares (c) with (a), then with (b).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

T0 = time.time()  # process start, for "time to first step" of the TRL workers
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
BATCH, LR, MAX_LEN, R, ALPHA, DROPOUT = 8, 2e-4, 1024, 16, 32, 0.05
# ChatML without a newline after <|im_end|>: TRL's completion (text after the prompt) is then exactly
# the assistant content + end-of-turn token, the same tokens kubetune trains on.
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the a model answer question data train token length batch summary short long colour animal fox owl "
         "river stone cloud number seven twelve because therefore however quickly slowly bright dark green blue "
         "light heavy open close read write count spell describe explain compare list").split()


def build_assets(rows: int, hidden: int, layers: int, seed: int = 0) -> tuple[Path, Path]:
    from kubetune.quickstart.assets import build_model

    model = CACHE / f"llama-h{hidden}-l{layers}"
    if not (model / "config.json").exists():
        build_model(model, hidden=hidden, layers=layers, heads=max(1, hidden // 64), init_std=0.02)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        (model / "chat_template.jinja").write_text(TEMPLATE)
        cfg.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = CACHE / f"chat-{rows}-{seed}.jsonl"
    if not data.exists():
        rng = random.Random(seed)

        def text(mean_words: float, sigma: float, cap: int) -> str:
            n = max(2, min(cap, int(rng.lognormvariate(mean_words, sigma))))
            return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

        with data.open("w") as fh:
            for _ in range(rows):
                # Real instruction data: most rows short, a long tail of long answers.
                user, answer = text(2.6, 0.6, 120), text(3.3, 1.1, 420)
                fh.write(json.dumps({"prompt": [{"role": "user", "content": user}],
                                     "completion": [{"role": "assistant", "content": answer}],
                                     "messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return model, data


def trl_worker(model: Path, data: Path, grouped: bool, out: Path) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    ds = load_dataset("json", data_files=str(data), split="train").remove_columns(["messages"])
    marks: dict[str, float] = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            marks.setdefault("first_step", time.time() - T0)

    cfg = SFTConfig(output_dir=str(out.parent / "trl-out"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                    learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=5,
                    save_strategy="no", report_to="none", max_length=MAX_LEN, use_cpu=True, seed=42,
                    include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                    train_sampling_strategy="group_by_length" if grouped else "random")
    peft = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(model), args=cfg, train_dataset=ds, peft_config=peft, callbacks=[FirstStep()])
    counts = {"real": 0, "positions": 0}
    collate = trainer.data_collator

    def counting(features):  # noqa: ANN001, ANN202
        batch = collate(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["positions"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting
    result = trainer.train()
    out.write_text(json.dumps({
        "real_tokens": trainer.state.num_input_tokens_seen, "runtime": result.metrics["train_runtime"],
        "padding": 1 - counts["real"] / counts["positions"], "first_step": marks["first_step"],
        "loss": result.training_loss, "steps": trainer.state.global_step,
    }))


def kubetune_spec(model: Path, data: Path, out: Path) -> Path:
    import yaml

    spec = {
        "name": "bench", "model": {"base": str(model)},
        "data": {"train": str(data), "eval": None, "max_length": MAX_LEN, "format": "messages"},
        "method": {"type": "lora", "lora": {"r": R, "alpha": ALPHA, "dropout": DROPOUT}},
        "train": {"epochs": 1, "learning_rate": LR, "lr_scheduler": "cosine", "warmup_ratio": 0.03,
                  "total_batch_size": BATCH, "max_per_device_batch_size": BATCH, "save_every_steps": 100000,
                  "logging_steps": 5, "seed": 42},
        "output": str(out), "resources": {"accelerator": "cpu"},
    }
    path = out.parent / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def kubetune_result(run: Path, started: float) -> dict[str, float]:
    from kubetune.artifacts.events import EndEvent, FirstStepEvent, StepEvent, read_events

    events = read_events(run / "events.jsonl")
    steps = [e for e in events if isinstance(e, StepEvent)]
    end = next(e for e in events if isinstance(e, EndEvent))
    first = next(e for e in events if isinstance(e, FirstStepEvent))
    pads = [e.padding for e in steps if e.padding is not None]
    return {"real_tokens": end.tokens_seen, "runtime": end.train_runtime or 0.0,
            "padding": sum(pads) / len(pads), "first_step": first.time - started, "loss": end.train_loss or 0.0,
            "steps": end.step}


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; return (start time, its peak RSS in GB) — wait4 gives this child's own maximum."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return started, usage.ru_maxrss / 2**20  # KiB → GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--worker", choices=["trl", "trl-grouped"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trl_worker(args.model, args.data, args.worker == "trl-grouped", args.out)
        return

    import shutil

    model, data = build_assets(args.rows, args.hidden, args.layers)
    work = CACHE / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf-datasets"), TOKENIZERS_PARALLELISM="false")
    from kubetune.train.plan import count_params

    print(f"model: random Llama, {count_params(model) / 1e6:.1f}M parameters (hidden {args.hidden}, "
          f"{args.layers} layers); data: {args.rows} long-tailed chat rows; LoRA r={R}; batch {BATCH}; 1 epoch; "
          f"{os.cpu_count()} CPU cores", flush=True)
    results: dict[str, dict[str, float]] = {}
    for name, worker in (("(a) TRL defaults", "trl"), ("(b) TRL + group_by_length", "trl-grouped")):
        out = work / f"{worker}.json"
        _, rss = run_measured([sys.executable, __file__, "--worker", worker, "--model", str(model), "--data", str(data),
                               "--out", str(out)], env)
        results[name] = {**json.loads(out.read_text()), "rss": rss}
        print(f"  done {name}", flush=True)
    run = work / "kubetune-run"
    spec = kubetune_spec(model, data, run)
    started, rss = run_measured([sys.executable, "-m", "kubetune", "train", str(spec)], env)
    results["(c) kubetune defaults"] = {**kubetune_result(run, started), "rss": rss}

    print(f"\n{'':28}{'real tok/s':>11}{'padding':>9}{'peak RSS':>10}{'1st step':>10}{'loss':>8}{'tokens':>9}{'steps':>7}")
    for name, r in results.items():
        r["tps"] = r["real_tokens"] / r["runtime"]
        print(f"{name:28}{r['tps']:>11.0f}{r['padding']:>8.1%}{r['rss']:>8.2f}GB{r['first_step']:>9.1f}s"
              f"{r['loss']:>8.4f}{r['real_tokens']:>9}{r['steps']:>7}")
    a, b, c = results.values()
    if len({a["real_tokens"], b["real_tokens"], c["real_tokens"]}) != 1:
        print("warning: the configurations saw different numbers of real tokens")
    print(f"\ntokens/s: {c['tps'] / a['tps']:.2f}x (vs grouped: {c['tps'] / b['tps']:.2f}x)  "
          f"memory: {c['rss'] / a['rss']:.2f}x  loss: {100 * (c['loss'] - a['loss']) / a['loss']:+.2f}%")


if __name__ == "__main__":
    main()
