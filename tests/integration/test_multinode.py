"""Two nodes on one host, from exactly what the rendered Indexed Job gives its pods: the spec from its
ConfigMap, the container's command and env (node index from JOB_COMPLETION_INDEX, the rendezvous
endpoint), each "pod" with its own scratch (HOME, working copy, caches) and the output in S3. Two
torchrun agents (2 nodes × 1 process, gloo) rendezvous over c10d on 127.0.0.1 and train; one node is
SIGKILLed after a checkpoint is stored; the restarted pair resumes from it and finishes, with one
final adapter and no checkpoint marked COMPLETE without its files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.k8s.render import render
from kubetune.k8s.render.common import SCRATCH, SPEC_DIR
from kubetune.spec.load import load_spec
from tests.conftest import QUICKSTART_DATA, ROOT, kubetune_argv, quiet_env
from tests.s3_runs import BUCKET, assert_complete_means_complete, remote_checkpoints
from tests.servers import S3Server

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pods(tmp: Path, spec_path: Path, s3: S3Server, port: int) -> list[tuple[list[str], dict[str, str]]]:
    """(command, env) of each pod of the rendered Indexed Job, made to run on this host."""
    objects = render(load_spec(spec_path), "train")
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    container = job["spec"]["template"]["spec"]["containers"][0]
    out = []
    for index in range(2):
        scratch = tmp / f"pod-{index}"
        etc = scratch / "etc"
        etc.mkdir(parents=True)
        (etc / "spec.yaml").write_text(config["data"]["spec.yaml"])
        env = quiet_env(**s3.env(), PYTHONPATH=str(ROOT / "src"), KUBETUNE_LEASE_SECONDS="10")
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"].replace(SCRATCH, str(scratch))
        host, _, rendezvous_port = env["KUBETUNE_RDZV_ENDPOINT"].rpartition(":")
        name = load_spec(spec_path).name
        assert host == f"{name}-0.{name}.default.svc" and rendezvous_port == "29500"  # the headless Service of pod 0
        env["KUBETUNE_RDZV_ENDPOINT"] = f"127.0.0.1:{port}"  # that name resolves only in the cluster
        env["JOB_COMPLETION_INDEX"] = str(index)  # what Kubernetes sets in an Indexed Job's pods
        command = [a.replace(SPEC_DIR, str(etc)) for a in kubetune_argv(container)]
        assert command[:2] == ["kubetune", "train"] and command[-1] == "--wait"
        out.append(([sys.executable, "-m", "kubetune", *command[1:]], env))
    return out


def kill_pod(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of the "pod" (the launcher, torchrun and its ranks: torchrun runs in a
    session of its own, so a process group is not enough), as the kubelet kills a container."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def start(pod: tuple[list[str], dict[str, str]], log: Path) -> subprocess.Popen[bytes]:
    command, env = pod
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.long
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_rendezvous_train_and_resume_after_one_is_killed(s3: S3Server, tiny_model: Path,
                                                                   tmp_path: Path, strategy: str) -> None:
    """fsdp: each node's rank writes its own shards on its own disk; node 1's reach the bucket before
    COMPLETE, and the resumed pair loads them."""
    spec_path = tmp_path / "mn.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": f"mn-{strategy}", "model": {"base": str(tiny_model)},
        "data": {"train": str(QUICKSTART_DATA / "train.jsonl"), "eval": None, "max_length": 128},
        "train": {"max_steps": 400, "total_batch_size": 8, "max_per_device_batch_size": 4, "save_every_steps": 20,
                  "keep_checkpoints": 2, "logging_steps": 10, "learning_rate": 3e-3},
        "output": f"s3://{BUCKET}/runs/mn-{strategy}",
        "resources": {"accelerator": "cpu", "nodes": 2, "devices_per_node": 1, "strategy": strategy},
        "tracking": {"report_to": []}}))
    logs = [tmp_path / "node-0.log", tmp_path / "node-1.log"]
    port = free_port()
    first = [start(pod, log) for pod, log in zip(pods(tmp_path / "first", spec_path, s3, port), logs)]
    try:
        deadline = time.monotonic() + 300
        while not any("COMPLETE" in files for files in remote_checkpoints(s3, f"mn-{strategy}").values()):
            assert all(p.poll() is None for p in first), "a node ended early: " + logs[0].read_text()[-2000:] + \
                logs[1].read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint was stored in 300 s"
            time.sleep(0.2)
        kill_pod(first[1])  # node 1 is lost (its pod evicted without a word)
        first[1].wait(timeout=30)
        code = first[0].wait(timeout=180)  # node 0's rank loses its peer: the attempt fails
        assert code != 0
    finally:
        for p in first:
            kill_pod(p)
    stored = {int(c.split("-")[1]) for c, files in remote_checkpoints(s3, f"mn-{strategy}").items() if "COMPLETE" in files}
    assert stored and max(stored) < 400

    second = [start(pod, log) for pod, log in zip(pods(tmp_path / "second", spec_path, s3, free_port()), logs)]
    try:
        codes = [p.wait(timeout=600) for p in second]
    finally:
        for p in second:
            kill_pod(p)
    text = logs[0].read_text() + logs[1].read_text()
    assert codes == [0, 0], text[-4000:]
    run = f"runs/mn-{strategy}"
    assert f"resuming from s3://{BUCKET}/{run}/checkpoints/checkpoint-{max(stored)}" in text, text[-3000:]
    # node 1's rank state (and shards) are stored too, before COMPLETE
    assert_complete_means_complete(s3, f"mn-{strategy}", ranks=2, sharded=strategy == "fsdp")
    finals = [k for k in s3.keys(BUCKET, f"{run}/final/") if k.endswith("adapter_model.safetensors")]
    assert finals == [f"{run}/final/adapter/adapter_model.safetensors"]  # saved once, by global rank 0
    events = s3.client().get_object(Bucket=BUCKET, Key=f"{run}/events.jsonl")["Body"].read().decode()
    # (the first attempt's own start event may not have reached the bucket before its writer was killed)
    starts = [json.loads(line) for line in events.splitlines() if json.loads(line)["event"] == "start"]
    assert starts[-1]["world_size"] == 2 and starts[-1]["resumed_from"].endswith(f"checkpoint-{max(stored)}")
    assert starts[-1]["strategy"] == strategy
    ends = [json.loads(line) for line in events.splitlines() if json.loads(line)["event"] == "end"]
    assert len(ends) == 1 and ends[0]["step"] == 400
