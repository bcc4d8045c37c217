"""Background checkpoint upload vs local output: the same run, checkpointing every 25 steps,
written to a local folder and to s3:// (a moto_server on 127.0.0.1), in one invocation.

    python bench/upload.py [--steps 200] [--rounds 3] [--save-every 25]

Prints the mean optimizer-step time of each (train_runtime / steps, from the run's `end` event)
and the ratio s3 / local. Target: <= 1.05x (uploads run in a background thread while training
continues; the run still waits for the last upload before it ends, which is reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.servers import start_s3  # noqa: E402  (the same server the tests use)
from kubetune.artifacts.events import CheckpointEvent, EndEvent, read_events  # noqa: E402


def spec(path: Path, name: str, output: str, steps: int, args_every: int) -> Path:
    import yaml

    body = {"name": name, "model": {"base": str(ROOT / "examples/assets/tiny-llama")},
            "data": {"train": str(ROOT / "examples/data/quickstart/train.jsonl"), "max_length": 128},
            "method": {"lora": {"r": 64, "alpha": 128}},
            "train": {"max_steps": steps, "total_batch_size": 16, "max_per_device_batch_size": 16,
                      "save_every_steps": args_every, "keep_checkpoints": 2, "logging_steps": 50},
            "output": output, "resources": {"accelerator": "cpu"}}
    path.write_text(yaml.safe_dump(body))
    return path


def run(spec_path: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds per step while training, wall seconds of the whole command, checkpoints saved)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "kubetune", "train", str(spec_path)], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
    events_path = next(Path(env["KUBETUNE_WORKDIR"]).rglob("events.jsonl"), None) if "s3://" in spec_path.read_text() \
        else Path(json.loads(json.dumps(str(spec_path.parent / "runs" / spec_path.stem / "events.jsonl"))))
    events = read_events(Path(events_path))
    end = [e for e in events if isinstance(e, EndEvent)][-1]
    return (end.train_runtime or 0.0) / end.step, wall, sum(isinstance(e, CheckpointEvent) for e in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=25, help="checkpoint interval in steps")
    args = parser.parse_args()
    if not (ROOT / "examples/assets/tiny-llama/config.json").exists():
        raise SystemExit("build the tiny model first: make assets")
    # The S3 server shares this machine's cores only because it must run somewhere here; in a real
    # cluster it is remote. Niced, it takes the cores the training leaves rather than the training's.
    server = start_s3(nice=19)
    server.client().create_bucket(Bucket="bench")
    local, remote, walls = [], [], {"local": [], "s3": []}
    try:
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                tmpdir = Path(tmp)
                env = {**os.environ, **server.env(), "KUBETUNE_WORKDIR": str(tmpdir / "work"),
                       "KUBETUNE_CACHE": str(tmpdir / "cache"), "OMP_NUM_THREADS": str(os.cpu_count() or 1),
                       "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT / "src")}
                a = run(spec(tmpdir / f"local{r}.yaml", f"local{r}", str(tmpdir / "runs" / f"local{r}"), args.steps, args.save_every), env)
                b = run(spec(tmpdir / f"s3{r}.yaml", f"s3{r}", f"s3://bench/runs/s3{r}", args.steps, args.save_every), env)
                local.append(a[0]); remote.append(b[0])
                walls["local"].append(a[1]); walls["s3"].append(b[1])
                print(f"round {r + 1}: local {a[0] * 1000:.1f} ms/step ({a[2]} checkpoints), "
                      f"s3 {b[0] * 1000:.1f} ms/step ({b[2]} checkpoints uploaded)", flush=True)
    finally:
        server.stop()
    ratio = statistics.mean(remote) / statistics.mean(local)
    print(f"step time: local {statistics.mean(local) * 1000:.1f} ms, s3 {statistics.mean(remote) * 1000:.1f} ms "
          f"→ {ratio:.3f}x (target <= 1.05x)")
    print(f"whole command incl. start-up and the final upload wait: local {statistics.mean(walls['local']):.1f} s, "
          f"s3 {statistics.mean(walls['s3']):.1f} s")


if __name__ == "__main__":
    main()
