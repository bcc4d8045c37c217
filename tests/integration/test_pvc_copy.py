"""Workflow C's data path (WORKFLOWS.md: "a ReadWriteMany PVC holds data and outputs; a data-access pod
to copy data in and results out"): `kubetune copy` puts local files onto a PVC and copies a trained run
out of one, through a data-access pod reached over the API server's pod proxy (Kubernetes API
reference: Pod "proxy" subresource, /api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH).

The API server is tests/k8s_server.py (real HTTP, the official client); a "kubelet" here runs each
data-access pod's own container command — `python3 -c SOURCE /data PORT IDLE`, with its token resolved
from the Secret the way a secretKeyRef is — on 127.0.0.1, the claim's mount at a local folder, and
stops it when the pod is deleted."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import QUICKSTART_DATA, run_kubetune
from tests.k8s_server import FakeKubernetes


class Kubelet:
    """Runs every data-access pod the API server gets: its command and env, /data → pvc_root/CLAIM."""

    def __init__(self, fake: FakeKubernetes, pvc_root: Path) -> None:
        self.fake, self.pvc_root = fake, pvc_root
        self.procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        self.started: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for (plural, ns, name), pod in list(self.fake.objects.items()):
                if plural == "pods" and (ns, name) not in self.procs and \
                        pod["metadata"]["labels"].get("app.kubernetes.io/component") == "data-access":
                    self._start(ns, name, pod)
            for (ns, name), proc in list(self.procs.items()):
                if ("pods", ns, name) not in self.fake.objects and proc.poll() is None:
                    proc.kill()  # the pod was deleted
                    proc.wait()
            time.sleep(0.05)

    def _start(self, ns: str, name: str, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        (self.pvc_root / claim).mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ["PATH"]}
        for e in container["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.fake.objects[("secrets", ns, ref["name"])]
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable if c == "python3" else c for c in container["command"]]
        command[command.index("/data")] = str(self.pvc_root / claim)
        command[command.index(str(container["ports"][0]["containerPort"]))] = str(port)
        self.started.append(pod)
        self.procs[(ns, name)] = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL)
        for _ in range(200):  # listening
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        self.fake.pod_ports[(ns, name, container["ports"][0]["containerPort"])] = port
        pod["status"] = {"phase": "Running", "podIP": "127.0.0.1"}

    def port(self, ns: str, name: str) -> int:
        return self.fake.pod_ports[(ns, name, 8080)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def kubelet(k8s: FakeKubernetes, tmp_path: Path) -> Iterator[Kubelet]:
    node = Kubelet(k8s, tmp_path / "pvc")
    yield node
    node.close()


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def gone(k8s: FakeKubernetes) -> bool:
    return not [k for k in k8s.objects if k[0] in ("pods", "secrets")]


def test_workflow_c_data_in_train_on_the_pvc_run_out(k8s: FakeKubernetes, kubelet: Kubelet, cli, tiny_model: Path,
                                                     tmp_path: Path, write_spec) -> None:
    import kubernetes_validate

    pvc = tmp_path / "pvc" / "shared-data"
    # local data and model onto the claim
    data = tmp_path / "local-data"
    (data / "nested").mkdir(parents=True)
    (data / "train.jsonl").write_bytes((QUICKSTART_DATA / "train.jsonl").read_bytes())
    (data / "nested" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several proxy chunks
    code, out, err = cli("copy", str(data), "pvc://shared-data/datasets", "-n", "ml", "--poll", "0.05")
    assert code == 0, out + err
    assert "copied 2 file(s)" in out and "skipped 0 identical" in out
    assert digest(pvc / "datasets") == digest(data)
    assert gone(k8s)  # pod and token Secret deleted
    code, out, err = cli("copy", str(tiny_model), "pvc://shared-data/models/tiny", "-n", "ml", "--poll", "0.05")
    assert code == 0, out + err
    assert digest(pvc / "models" / "tiny") == digest(tiny_model)

    # a re-run copies nothing that is already whole; a changed file is copied again
    (data / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes() + b"\n")
    code, out, err = cli("copy", str(data), "pvc://shared-data/datasets", "-n", "ml", "--poll", "0.05")
    assert code == 0 and "copied 1 file(s)" in out and "skipped 1 identical" in out, out + err
    assert digest(pvc / "datasets") == digest(data)

    # one file into a folder keeps its name
    code, out, err = cli("copy", str(QUICKSTART_DATA / "eval.jsonl"), "pvc://shared-data/datasets/", "-n", "ml",
                         "--poll", "0.05")
    assert code == 0, out + err
    assert (pvc / "datasets" / "eval.jsonl").read_bytes() == (QUICKSTART_DATA / "eval.jsonl").read_bytes()

    # the pod as rendered: a valid Pod, non-root, no service account token, the token only by reference
    pod = kubelet.started[0]
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    body = pod["spec"]
    assert body["automountServiceAccountToken"] is False and body["securityContext"]["runAsNonRoot"] is True
    assert body["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert body["containers"][0]["image"] == "python:3.11-slim"
    (env,) = [e for e in body["containers"][0]["env"] if e["name"] == "KUBETUNE_COPY_TOKEN"]
    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert "token" not in out.lower()

    # train where the pods would (the claim mounted at KUBETUNE_PVC_ROOT), then copy the run out
    spec = write_spec("c", model={"base": "pvc://shared-data/models/tiny"},
                      data={"train": "pvc://shared-data/datasets/train.jsonl", "eval": {"split_ratio": 0.05},
                            "max_length": 128},
                      train={"max_steps": 2, "total_batch_size": 4, "max_per_device_batch_size": 4,
                             "save_every_steps": 2, "logging_steps": 1},
                      output="pvc://shared-data/runs/c")
    res = run_kubetune("train", str(spec), KUBETUNE_PVC_ROOT=str(tmp_path / "pvc"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = tmp_path / "out" / "c"
    code, out, err = cli("copy", "pvc://shared-data/runs/c", str(run), "-n", "ml", "--poll", "0.05")
    assert code == 0, out + err
    assert digest(run) == digest(pvc / "runs" / "c") and (run / "final" / "COMPLETE").is_file()
    from kubetune.runs.checkpoints import listing
    from kubetune.storage.store import Store

    states = listing(Store(str(run)))
    assert states and all(s.state == "ok" for s in states), states
    code, out, err = cli("copy", "pvc://shared-data/runs/c", str(run), "-n", "ml", "--poll", "0.05")
    assert code == 0 and "copied 0 file(s)" in out, out + err
    assert gone(k8s)


def test_the_pod_refuses_strangers_and_paths_out_of_the_volume(k8s: FakeKubernetes, kubelet: Kubelet,
                                                                tmp_path: Path) -> None:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.pvc_copy import PodFiles, _wait
    from kubetune.k8s.render.data_access import data_access_pod
    from kubetune.spec.models import KubernetesSpec

    (tmp_path / "outside.txt").write_text("secret of another team")
    (tmp_path / "pvc" / "vol").mkdir(parents=True)
    (tmp_path / "pvc" / "vol" / "escape").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "pvc" / "vol" / "ok.txt").write_text("ok")
    token = "t" * 43
    k8s.objects[("secrets", "ml", "p")] = {"metadata": {"name": "p"},
                                          "data": {"token": base64.b64encode(token.encode()).decode()}}
    k8s.objects[("pods", "ml", "p")] = data_access_pod(KubernetesSpec(namespace="ml"), "vol", "p", "p")
    cluster = Cluster("ml")
    files = PodFiles(cluster, "p", token)
    _wait(cluster, files, "p", "img", 30, 0.05)
    port = kubelet.port("ml", "p")

    def direct(path: str, header: str | None) -> int:  # another pod in the cluster, straight to the pod's IP
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"X-Kubetune-Token": header} if header
                                     else {})
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert direct("/list?path=", None) == 403 and direct("/file?path=ok.txt", "wrong" * 9) == 403
    assert direct("/file?path=ok.txt", token) == 200
    assert direct("/file?path=../../outside.txt", token) == 400
    assert direct("/file?path=/etc/passwd", token) == 400
    assert direct("/file?path=escape", token) == 400  # a symlink that leads out of the volume
    assert files.listing("") == [("ok.txt", 2)]  # symlinks are not listed

    from kubetune.errors import UsageError

    with pytest.raises(UsageError, match="would land outside"):
        from kubetune.k8s.pvc_copy import safe_join

        safe_join(tmp_path / "dest", "../x")


def test_refusals_name_what_to_do_and_leave_nothing_behind(k8s: FakeKubernetes, kubelet: Kubelet, cli,
                                                           tmp_path: Path) -> None:
    code, out, err = cli("copy", str(tmp_path / "missing"), "pvc://vol/x", "-n", "ml")
    assert code == 2 and "no such file or folder" in err and not k8s.requests, err
    code, out, err = cli("copy", str(tmp_path), str(tmp_path / "b"), "-n", "ml")
    assert code == 2 and "one side must be pvc://CLAIM/path" in err
    code, out, err = cli("copy", "pvc://vol/../etc", str(tmp_path / "b"), "-n", "ml")
    assert code == 2 and "without .." in err
    code, out, err = cli("copy", "pvc://vol/nothing-here", str(tmp_path / "b"), "-n", "ml", "--poll", "0.05")
    assert code == 2 and "pvc://vol/nothing-here does not exist on the volume" in err, out + err
    (tmp_path / "pvc" / "vol" / "dir").mkdir(parents=True)
    (tmp_path / "pvc" / "vol" / "dir" / "a.txt").write_text("a")
    (tmp_path / "f.txt").write_text("mine")
    code, out, err = cli("copy", "pvc://vol/dir", str(tmp_path / "f.txt"), "-n", "ml", "--poll", "0.05")
    assert code == 2 and "is a folder and" in err and (tmp_path / "f.txt").read_text() == "mine", out + err
    assert gone(k8s)
    code, out, err = cli("stage", "--data", str(QUICKSTART_DATA / "eval.jsonl"), "--to", "pvc://vol/data")
    assert code == 2 and "mounted only in the cluster's pods" in err and "kubetune copy SRC pvc://" in err, out + err
    k8s.forbidden.add(("GET", "pods/proxy"))
    code, out, err = cli("copy", str(QUICKSTART_DATA), "pvc://vol/d", "-n", "ml", "--poll", "0.05")
    assert code == 2 and "forbidden: get pods/proxy" in err and "kubetune setup" in err, out + err
    assert gone(k8s)
