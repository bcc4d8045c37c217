"""Helpers for tests of runs whose output is object storage: a fresh machine's environment, a
spec writing to the test bucket, and what the bucket holds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import ROOT, kubetune_cmd, quiet_env
from tests.servers import S3Server

BUCKET = "kubetune-test"
CKPT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
              "trainer_state.json", "rng_state.pth", "COMPLETE"}


def run(args: list[str], s3: S3Server, home: Path, endpoint: str | None = None, timeout: int = 600,
        **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kubetune_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=home,
                          env=fresh_env(s3, home, endpoint, **env))


def fresh_env(s3: S3Server, home: Path, endpoint: str | None = None, **env: str) -> dict[str, str]:
    """A new machine: its own HOME, data cache and working folder."""
    home.mkdir(parents=True, exist_ok=True)
    return quiet_env(**{"HOME": str(home), "KUBETUNE_CACHE": str(home / "cache"), "KUBETUNE_WORKDIR": str(home / "work"),
                        "PYTHONPATH": str(ROOT / "src"), **s3.env(endpoint), **env})


def spec_file(tmp: Path, name: str, staged: dict[str, str], steps: int, **extra: object) -> Path:
    spec = {"name": name, "model": {"base": staged["model"]},
            "data": {"train": staged["data"], "max_length": 128},
            "method": {"lora": {"r": 8, "alpha": 16}},
            "train": {"max_steps": steps, "total_batch_size": 8, "max_per_device_batch_size": 8,
                      "save_every_steps": 10, "keep_checkpoints": 2, "logging_steps": 10, "learning_rate": 3e-3},
            "output": f"s3://{BUCKET}/runs/{name}", "resources": {"accelerator": "cpu"}, **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def remote_checkpoints(s3: S3Server, name: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for key in s3.keys(BUCKET, f"runs/{name}/checkpoints/"):
        ckpt, _, rest = key.removeprefix(f"runs/{name}/checkpoints/").partition("/")
        out.setdefault(ckpt, set()).add(rest)
    return out


def assert_complete_means_complete(s3: S3Server, name: str, ranks: int = 1, sharded: bool = False) -> None:
    """Every checkpoint marked COMPLETE in the bucket has all its files (with several ranks: each
    rank's own RNG state; sharded (FSDP): each rank's shards of the model and the optimizer state)."""
    want = CKPT_FILES if ranks == 1 else (CKPT_FILES - {"rng_state.pth"}) | {f"rng_state_{r}.pth" for r in range(ranks)}
    if sharded:
        want = (want - {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"}) | {
            f"{part}/{f}" for part in ("pytorch_model_fsdp_0", "optimizer_0")
            for f in [".metadata", *(f"__{r}_0.distcp" for r in range(ranks))]}
    for ckpt, files in remote_checkpoints(s3, name).items():
        if "COMPLETE" in files:
            assert want <= files, f"{ckpt} carries COMPLETE without {want - files}"
