"""`kubetune image build`: an image with this kubetune installed, for `kubernetes.image`.

The build context is written here — the packaged Dockerfile, the wheel of the running kubetune and
the pinned requirements fitted to the accelerator's vendor image, the same files a pod installs at
start (k8s/dist.py) — and built (and pushed) with docker or podman. Side effects at the edge: files
and the build tool's process.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubetune
from kubetune.errors import KubetuneError, UsageError
from kubetune.k8s.dist import requirements_for_accelerator, wheel
from kubetune.k8s.render.image import VENDOR_IMAGES

__all__ = ["ACCELERATORS", "build", "write_context"]

ACCELERATORS = ("nvidia", "amd", "gaudi", "cpu")
DOCKERFILE = Path(kubetune.__file__).parent / "k8s" / "Dockerfile"


def write_context(accelerator: str, folder: Path) -> str:
    """The build context in `folder` (Dockerfile, requirements.txt, the wheel); returns the base image."""
    if accelerator not in ACCELERATORS:
        raise UsageError(f"--accelerator {accelerator}: one of {', '.join(ACCELERATORS)}")
    name, data = wheel()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("kubetune-*.whl"):  # a reused context: one wheel, this one
            old.unlink()
        shutil.copyfile(DOCKERFILE, folder / "Dockerfile")
        (folder / "requirements.txt").write_text(requirements_for_accelerator(accelerator))
        (folder / name).write_bytes(data)
    except OSError as exc:
        raise UsageError(f"--context {folder}: cannot write the build context there ({exc.strerror or exc})",
                         "give a folder you can write (it is created if missing)") from None
    return VENDOR_IMAGES[accelerator][0]


def build_commands(tool: str, folder: Path, base: str, tag: str, push: bool) -> list[list[str]]:
    commands = [[tool, "build", "--build-arg", f"BASE={base}", "-t", tag, str(folder)]]
    return commands + ([[tool, "push", tag]] if push else [])


def build(accelerator: str, tag: str, push: bool = False, tool: str | None = None,
          context: Path | None = None, log=print) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """Write the context (into `context`, else a temporary folder) and run the build (and push);
    with `context` given and no build tool wanted (tool == "none"), only write it. Returns the commands."""
    import tempfile

    found = None if tool == "none" else shutil.which(tool) if tool else (shutil.which("docker")
                                                                            or shutil.which("podman"))
    if found is None and tool != "none":
        raise UsageError(f"no {tool or 'docker or podman'} on PATH to build with",
                         "install one, or write the build context with --context DIR --tool none and build it "
                         "where one runs")
    with tempfile.TemporaryDirectory(prefix="kubetune-image-") as tmp:
        folder = context or Path(tmp)
        base = write_context(accelerator, folder)
        commands = build_commands(found or "docker", folder, base, tag, push)
        if found is None:
            for command in commands:
                log(" ".join(command))
            return commands
        for command in commands:
            log("$ " + " ".join(command))
            if subprocess.run(command).returncode != 0:
                raise KubetuneError(f"{' '.join(command[:2])} failed (its output is above)")
        return commands
