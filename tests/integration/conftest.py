"""Fixtures of the integration tests: an S3 server for the module and the inputs staged into it; a
Kubernetes API server (tests/k8s_server.py) that KUBECONFIG points at."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import QUICKSTART_DATA
from tests.k8s_server import FakeKubernetes
from tests.s3_runs import BUCKET, run
from tests.servers import S3Server, start_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = start_s3()
    try:
        server.client().create_bucket(Bucket=BUCKET)
    except Exception as exc:  # an external MinIO may already have it
        if "BucketAlready" not in type(exc).__name__ + str(exc):
            raise
    yield server
    server.stop()


@pytest.fixture(scope="module")
def staged(s3: S3Server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model and the quickstart data delivered with `kubetune stage --to`."""
    tmp = tmp_path_factory.mktemp("stage")
    model = tmp / "tiny-llama"
    subprocess.run(["cp", "-r", str(tiny_model), str(model)], check=True)
    (model / "original").mkdir()
    (model / "original" / "consolidated.00.pth").write_bytes(b"duplicate weights" * 1000)
    res = run(["stage", "--model", str(model), "--data", str(QUICKSTART_DATA / "train.jsonl"),
               "--to", f"s3://{BUCKET}/inputs"], s3, tmp)
    assert res.returncode == 0, res.stderr
    assert "skipped 0 identical" in res.stdout
    return {"model": f"s3://{BUCKET}/inputs/models/tiny-llama", "data": f"s3://{BUCKET}/inputs/data/train.jsonl",
            "stage_dir": str(tmp), "local_model": str(model)}


@pytest.fixture
def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
    yield fake
    fake.stop()
