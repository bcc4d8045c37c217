"""The training pod's install-and-run command, executed here as the pod runs it (no image build): its
container command from `kubetune render`, its two ConfigMaps written out as the kubelet mounts them, and
a "vendor image" that has Python and the vendor's packages (torch and the rest) but no kubetune. The
command installs this exact kubetune from the wheel that travels with the Job — offline, so nothing
but what the ConfigMap carries and the image holds is used — then trains; a retried pod that finds the
install cache starts at once."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.k8s.dist import with_dist
from kubetune.k8s.render import render
from kubetune.k8s.render.common import SPEC_DIR
from kubetune.spec.load import load_spec

pytestmark = pytest.mark.integration

SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _vendor_image(root: Path) -> Path:
    """The image's Python: a venv of the base interpreter holding every package of the test venv but
    kubetune (symlinked), the way recent ROCm images keep torch in /opt/venv — the case a venv made with
    --system-site-packages does not see through, which BOOT's .pth covers. Returns its bin folder."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(root)], check=True)
    (site,) = root.glob("lib/python*/site-packages")
    for entry in SITE.iterdir():
        if entry.name.startswith(("kubetune", "__editable__")) or entry.suffix == ".pth":
            continue
        (site / entry.name).symlink_to(entry)
    return root / "bin"


def _mount(config_map: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    for key, text in (config_map.get("data") or {}).items():
        (folder / key).write_text(text)
    for key, data in (config_map.get("binaryData") or {}).items():
        (folder / key).write_bytes(base64.b64decode(data))


def test_the_pod_installs_this_kubetune_at_start_then_trains(tmp_path: Path, write_spec) -> None:
    spec = load_spec(write_spec(name="podboot", data={"eval": None}, train={"max_steps": 2, "save_every_steps": 2}))
    objects = with_dist(spec, render(spec, "train"))
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    job = by_name[("Job", "podboot")]
    (wheel,) = [o for o in objects if o["metadata"]["name"].startswith("podboot-kubetune-")]
    assert wheel["immutable"] is True and {"name": "kubetune-dist", "configMap": {"name": wheel["metadata"]["name"]}} \
        in job["spec"]["template"]["spec"]["volumes"]  # the Job mounts the content-addressed wheel
    _mount(wheel, tmp_path / "dist")
    _mount(by_name[("ConfigMap", "podboot-spec")], tmp_path / "etc")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "python:3.11-slim" and container["command"][:2] == ["/bin/sh", "-c"]
    command = [a.replace(SPEC_DIR, str(tmp_path / "etc")) for a in container["command"]]
    env = {"PATH": f"{_vendor_image(tmp_path / 'vendor')}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "KUBETUNE_DIST": str(tmp_path / "dist"), "KUBETUNE_INSTALL_ROOT": str(tmp_path / "cache"),
           "KUBETUNE_CACHE": str(tmp_path / "kt-cache"), "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error"}
    (tmp_path / "scratch").mkdir()
    bare = subprocess.run(["python3", "-c", "import kubetune"], env=env, cwd=tmp_path, capture_output=True)
    assert bare.returncode != 0  # the image has no kubetune: what runs below is what the wheel installed
    first = subprocess.run(command, env=env, cwd=tmp_path / "scratch", capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "installing kubetune 0.1.0 and its pinned dependencies" in first.stderr
    key = (tmp_path / "dist" / "key").read_text()
    (install,) = (tmp_path / "cache").glob(f"python-3.11-slim-py*-{key}")  # per image, Python, wheel and pins
    (installed,) = install.glob("lib/python*/site-packages/kubetune/__init__.py")
    assert (install / ".installed").exists()
    assert (install.parent / f"{install.name}.constraints").read_text().startswith("torch==")  # the image's torch held
    assert not str(installed).startswith(str(Path(__file__).parents[2]))  # the wheel's copy, not this checkout
    assert (Path(spec.output_uri) / "final" / "COMPLETE").exists()
    # a retried pod that finds the install cache: no second install, the same command ends at once (run finished)
    again = subprocess.run(command, env=env, cwd=tmp_path / "scratch", capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "installing" not in again.stderr


def test_a_broken_install_fails_the_pod_and_is_retried_from_scratch(tmp_path: Path, write_spec) -> None:
    """Every step fails the pod when it fails (nothing half-installed is ever used): a requirement the
    image lacks, with no index to fetch it from, stops the pod before kubetune runs."""
    spec = load_spec(write_spec(name="podfail", data={"eval": None}))
    objects = with_dist(spec, render(spec, "train"))
    (cm,) = [o for o in objects if o["metadata"]["name"].startswith("podfail-kubetune-")]
    cm["data"]["requirements.txt"] += "no-such-package-kubetune-test==1.0\n"
    _mount(cm, tmp_path / "dist")
    (job,) = [o for o in objects if o["kind"] == "Job"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    env = {"PATH": f"{_vendor_image(tmp_path / 'vendor')}:/usr/bin:/bin", "HOME": str(tmp_path),
           "KUBETUNE_DIST": str(tmp_path / "dist"), "KUBETUNE_INSTALL_ROOT": str(tmp_path / "cache"),
           "PIP_NO_INDEX": "1"}
    res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "no-such-package-kubetune-test" in res.stderr
    assert not list((tmp_path / "cache").glob("*/.installed"))
    assert os.path.isdir(tmp_path / "cache")
