"""The memory plan against measured peaks, side by side.

    python bench/memory_plan.py [--steps 4] [--only quickstart|bench]

For the quickstart model and the bench model (a random ~21M-parameter Llama, long-tailed chat data
at max_length 512), LoRA and full fine-tuning, one process and two (ddp, and fsdp for full): train a
few steps with `kubetune train` and compare the plan's peak per device (`kubetune plan`'s figure,
computed before anything loads) with the peak the main process reports in its end event (resident
set on CPU, CUDA allocated on a GPU). Prints one row per configuration and the worst ratio; the
target is every ratio within 0.75-1.25.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))


def configs(only: str | None) -> list[tuple[str, dict]]:
    from train_throughput import build_assets

    quick_model = ROOT / "examples" / "assets" / "tiny-llama"
    if not (quick_model / "config.json").exists():
        from kubetune.quickstart.assets import build_model

        build_model(quick_model)
    quick = {"model": {"base": str(quick_model)},
             "data": {"train": str(ROOT / "examples/data/quickstart/train.jsonl"), "eval": None, "max_length": 128},
             "train": {"total_batch_size": 8, "max_per_device_batch_size": 8}}
    bench_model, bench_data = build_assets(320, 512, 6)
    bench = {"model": {"base": str(bench_model)},
             "data": {"train": str(bench_data), "eval": None, "max_length": 512, "format": "messages"},
             "train": {"total_batch_size": 8, "max_per_device_batch_size": 8, "gradient_checkpointing": False}}
    out = []
    for name, base in (("quickstart", quick), ("bench", bench)):
        if only and only != name:
            continue
        for method in ("lora", "full"):
            for procs, strategy in ((1, "ddp"), (2, "ddp")) + (((2, "fsdp"),) if method == "full" else ()):
                out.append((f"{name:10s} {method:4s} {procs}x {strategy if procs > 1 else 'single':6s}",
                            {**base, "method": {"type": method},
                             "resources": {"accelerator": "cpu", "devices_per_node": procs, "strategy": strategy}}))
    return out


def spec_file(folder: Path, name: str, cfg: dict, steps: int) -> Path:
    import yaml

    spec = {"name": name, **cfg, "output": str(folder / name),
            "train": {**cfg["train"], "max_steps": steps, "save_every_steps": 10000, "logging_steps": 1,
                      "sampling": "length_buckets"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def predicted(path: Path) -> tuple[float, str]:
    from kubetune.spec.load import load_spec
    from kubetune.train.memory import plan_for_run
    from kubetune.train.objectives import objective_for

    spec = load_spec(path)
    plan = plan_for_run(spec, objective_for(spec).prepare(spec), local=True)
    return plan.peak, plan.strategy


def measured(path: Path, out: Path) -> float:
    from kubetune.artifacts.events import read_events

    res = subprocess.run([sys.executable, "-m", "kubetune", "train", str(path)], capture_output=True, text=True,
                         cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"{path.name} failed:\n{res.stderr[-3000:]}")
    end = [e for e in read_events(out / "events.jsonl") if e.event == "end"][-1]
    return float(end.peak_memory_bytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", choices=["quickstart", "bench"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'configuration':32s} {'planned':>10s} {'measured':>10s} {'ratio':>7s}")
        for i, (label, cfg) in enumerate(configs(args.only)):
            path = spec_file(folder, f"m{i}", cfg, args.steps)
            plan, _ = predicted(path)
            peak = measured(path, folder / f"m{i}")
            rows.append({"config": label.strip(), "planned_mb": round(plan / 1e6), "measured_mb": round(peak / 1e6),
                         "ratio": round(plan / peak, 3)})
            print(f"{label:32s} {plan / 1e6:8.0f} MB {peak / 1e6:8.0f} MB {plan / peak:7.2f}", flush=True)
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    ok = all(0.75 <= r["ratio"] <= 1.25 for r in rows)
    print(f"worst planned/measured: {worst['ratio']:.2f} ({worst['config']}); target 0.75-1.25: "
          f"{'met' if ok else 'NOT met'}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
