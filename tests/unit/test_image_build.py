"""`kubetune image build`: the build context (the packaged Dockerfile, this kubetune's wheel, the pins fitted
to the accelerator's vendor image: what a pod installs at start), built and pushed with the build tool on
PATH. No docker here: the tool is a script that records what it was asked and the context it was given;
the wheel in the context is installed for real."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.k8s.render.image import VENDOR_IMAGES


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.mark.parametrize("accelerator", ["nvidia", "amd", "gaudi", "cpu"])
def test_the_context_is_what_a_pod_installs_on_the_vendors_image(accelerator: str, tmp_path: Path) -> None:
    code, said = run("image", "build", "--accelerator", accelerator, "--tag", f"reg.example/kt:1-{accelerator}",
                     "--tool", "none", "--context", str(tmp_path / "ctx"))
    assert code == 0, said
    base = VENDOR_IMAGES[accelerator][0]
    assert f"docker build --build-arg BASE={base} -t reg.example/kt:1-{accelerator} {tmp_path / 'ctx'}" in said
    files = sorted(p.name for p in (tmp_path / "ctx").iterdir())
    assert files[0] == "Dockerfile" and files[1].startswith("kubetune-") and files[1].endswith(".whl")
    requirements = (tmp_path / "ctx" / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch==") for r in requirements) == (accelerator == "cpu")  # vendors' torch kept
    assert ("--extra-index-url https://download.pytorch.org/whl/cpu" in requirements) == (accelerator == "cpu")
    assert any(r.startswith("bitsandbytes==") for r in requirements) == (accelerator == "nvidia")
    dockerfile = (tmp_path / "ctx" / "Dockerfile").read_text()
    assert "|| true" not in dockerfile and dockerfile.count("RUN set -eu;") == 2
    with zipfile.ZipFile(tmp_path / "ctx" / files[1]) as wheel:
        assert "kubetune/k8s/Dockerfile" in wheel.namelist()  # an installed kubetune can build its image again


def test_the_wheel_in_the_context_installs_and_runs(tmp_path: Path) -> None:
    run("image", "build", "--accelerator", "cpu", "--tag", "t", "--tool", "none", "--context", str(tmp_path / "ctx"))
    (wheel,) = (tmp_path / "ctx").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    shown = subprocess.run([sys.executable, "-c", "import kubetune, sys; print(kubetune.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert shown.startswith(str(tmp_path / "site"))


def test_build_and_push_run_the_tool_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "docker.log"
    (tools / "docker").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                                  f"if [ \"$1\" = build ]; then ls \"$6\" >> {log}; fi\n"
                                  f"[ -z \"$FAIL_PUSH\" ] || [ \"$1\" != push ]\n")
    (tools / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}/usr/bin:/bin")
    code, said = run("image", "build", "--accelerator", "gaudi", "--tag", "reg.example/kt:1-gaudi", "--push")
    assert code == 0, said
    lines = log.read_text().splitlines()
    assert lines[0].startswith(f"build --build-arg BASE={VENDOR_IMAGES['gaudi'][0]} -t reg.example/kt:1-gaudi ")
    assert lines[1:4] == ["Dockerfile", lines[2], "requirements.txt"] and lines[2].endswith(".whl")
    assert lines[4] == "push reg.example/kt:1-gaudi" and "kubernetes: {image: reg.example/kt:1-gaudi}" in said
    monkeypatch.setenv("FAIL_PUSH", "1")
    code, said = run("image", "build", "--accelerator", "gaudi", "--tag", "reg.example/kt:1-gaudi", "--push")
    assert code == 1 and "docker push failed" in said and "Traceback" not in said
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, said = run("image", "build", "--accelerator", "cpu", "--tag", "t")
    assert code == 2 and "no docker or podman on PATH" in said and "--context DIR --tool none" in said


def test_a_context_that_cannot_be_written_is_said_not_raised(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    code, said = run("image", "build", "--accelerator", "cpu", "--tag", "t", "--tool", "none",
                     "--context", str(tmp_path / "a-file"))
    assert code == 2 and "cannot write the build context there" in said and "Traceback" not in said
