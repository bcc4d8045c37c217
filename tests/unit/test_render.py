"""`kubetune render`: every example renders for train (stage and serve where they apply), every
object passes the official schemas strictly for Kubernetes 1.29 and 1.33, output is byte-stable
(golden files), and the quickstart's overrides produce the right objects.

Refresh the golden files after an intended change:  KUBETUNE_REFRESH_GOLDEN=1 pytest tests/unit/test_render.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.errors import SpecError, UsageError
from kubetune.k8s.render import render, to_yaml
from kubetune.k8s.serving import served_set
from kubetune.serve.tool_parser import resolve_reasoning_parser, resolve_tool_parser
from kubetune.spec.load import load_spec
from tests.conftest import kubetune_argv

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
VERSIONS = ["1.29.0", "1.33.0"]
CRDS = {"LocalQueue", "ServiceMonitor", "PodMonitoring"}


def cases() -> list[tuple[str, str]]:
    out = []
    for name in EXAMPLES:
        spec = load_spec(ROOT / "examples" / name)
        for what in ("train", "serve", "setup", *(["stage"] if spec.stage.model or spec.stage.data else [])):
            out.append((name, what))
    return out


def rendered(name: str, what: str, *overrides: str) -> list[dict[str, Any]]:
    """What `kubetune render` prints (the serving tool-call parser resolved as the CLI does)."""
    spec = load_spec(ROOT / "examples" / name, list(overrides))
    if what != "serve":
        return render(spec, what)
    plan = served_set(spec)
    return render(plan.spec, what, plan.served, plan.tool_parser, plan.reasoning_parser)


@pytest.mark.parametrize("name, what", cases())
def test_examples_render_valid_objects_for_1_29_and_1_33(name: str, what: str) -> None:
    for obj in rendered(name, what):
        if obj["kind"] in CRDS:  # custom resources: not in the core schemas (their shapes are tested by kind)
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} --what {what}: {obj['kind']} {obj['metadata']['name']} invalid for {version}: "
                            f"{exc.message} at {'.'.join(map(str, exc.path))}")


@pytest.mark.parametrize("name, what", cases())
def test_rendering_matches_the_golden_file(name: str, what: str) -> None:
    text = to_yaml(rendered(name, what))
    assert text == to_yaml(rendered(name, what))  # pure: same spec, same bytes
    golden = GOLDEN / f"{Path(name).stem}.{what}.yaml"
    if os.environ.get("KUBETUNE_REFRESH_GOLDEN") or not golden.exists():
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden} differs; if intended: KUBETUNE_REFRESH_GOLDEN=1 pytest {__file__}"


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    owner = (by_kind(objects, "Job") or by_kind(objects, "Deployment"))[0]
    return owner["spec"]["template"]["spec"]


def test_quickstart_with_kueue_queue() -> None:
    objs = rendered("quickstart.yaml", "train", "kubernetes.queue=team-a")
    job = by_kind(objs, "Job")[0]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kubetune.dev/run"] == "quickstart"


@pytest.mark.parametrize("accelerator, resource", [("nvidia", "nvidia.com/gpu"), ("amd", "amd.com/gpu"),
                                                   ("gaudi", "habana.ai/gaudi"), ("cpu", None)])
def test_accelerator_resources(accelerator: str, resource: str | None) -> None:
    objs = rendered("quickstart.yaml", "train", f"resources.accelerator={accelerator}", "resources.devices_per_node=2")
    res = pod_of(objs)["containers"][0]["resources"]
    assert res["requests"] == res["limits"] and {"cpu", "memory"} <= set(res["requests"])
    devices = {k: v for k, v in res["limits"].items() if k in {"nvidia.com/gpu", "amd.com/gpu", "habana.ai/gaudi"}}
    assert devices == ({resource: "2"} if resource else {})
    assert ("hugepages-2Mi" in res["limits"]) == (accelerator == "gaudi")


def test_two_nodes_render_an_indexed_job_and_a_headless_service() -> None:
    objs = rendered("quickstart.yaml", "train", "resources.nodes=2", "resources.devices_per_node=2",
                    "resources.accelerator=nvidia")
    job = by_kind(objs, "Job")[0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    svc = by_kind(objs, "Service")[0]
    assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    env = {e["name"]: e.get("value") for e in pod_of(objs)["containers"][0]["env"]}
    assert env["KUBETUNE_RDZV_ENDPOINT"] == "quickstart-0.quickstart.default.svc:29500"


def test_job_retries_disruptions_but_fails_at_once_on_configuration_errors() -> None:
    job = by_kind(rendered("quickstart.yaml", "train"), "Job")[0]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In", "values": [2]}} in rules
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    assert job["spec"]["backoffLimit"] > 0


@pytest.mark.parametrize("name, what", [c for c in cases() if c[1] != "setup"])  # setup has no pods
def test_secure_defaults_on_every_pod(name: str, what: str) -> None:
    pod = pod_of(rendered(name, what))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["requests"] and c["resources"]["limits"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert "/dev/shm" in mounts


def test_storage_by_reference() -> None:
    pod = pod_of(rendered("d-minio-lora-sweep.yaml", "train"))
    c = pod["containers"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "minio-credentials"}}]
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc.cluster.local:9000"
    a = pod_of(rendered("a-mistral-lora-gcs.yaml", "train"))
    assert a["serviceAccountName"] == "kubetune-gcs"
    assert any(v.get("csi", {}).get("driver") == "gcsfuse.csi.storage.gke.io" for v in a["volumes"])
    job = by_kind(rendered("a-mistral-lora-gcs.yaml", "train"), "Job")[0]
    assert job["spec"]["template"]["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    hf = {e["name"]: e for e in a["containers"][0]["env"]}["HF_TOKEN"]
    assert hf["valueFrom"] == {"secretKeyRef": {"name": "hf-secret", "key": "hf_api_token"}}
    c_pod = pod_of(rendered("c-gaudi-pvc.yaml", "train"))
    assert {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "shared-data"}} in c_pod["volumes"]
    assert c_pod["securityContext"]["runAsUser"] == 1001


def test_serve_objects_for_an_adapter_run() -> None:
    objs = rendered("b-summarise-qlora-serve.yaml", "serve")
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    pod = pod_of(objs)
    args = pod["containers"][0]["args"]
    assert args[args.index("--lora-modules") + 1] == "llama32-3b-samsum=/models/models/adapter"
    assert "--enable-lora" in args and args[args.index("--max-lora-rank") + 1] == "16"
    # Llama 3.2 writes tool calls as JSON: vLLM reads them back with its llama3_json parser
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "llama3_json"
    assert kubetune_argv(pod["initContainers"][0])[:4] == ["kubetune", "stage", "--model",
                                                       "s3://kubetune-runs/runs/llama32-3b-samsum/final/adapter"]
    hpa = objs[3]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["startupProbe"]["httpGet"]


def test_tool_call_parser_follows_the_chat_template_or_the_spec(tmp_path: Path) -> None:
    """auto: the format the template training uses writes (read from a local base folder), else the
    family by name; serve.tool_parser names it outright, or none drops the flags."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ '<|im_start|>' }}{{ '<think></think>' }}{{ '<tool_call>' }}"}))

    def args(*overrides: str) -> list[str]:
        spec = load_spec(ROOT / "examples" / "quickstart.yaml", list(overrides))
        return pod_of(render(spec, "serve", tool_parser=resolve_tool_parser(spec),
                             reasoning_parser=resolve_reasoning_parser(spec)))["containers"][0]["args"]

    assert "--tool-call-parser" not in args()  # the quickstart's ChatML template writes no tool calls
    local = args(f"model.base={base}")
    assert local[local.index("--tool-call-parser") + 1] == "hermes"
    assert local[local.index("--reasoning-parser") + 1] == "qwen3"  # <think> reasoning back as reasoning_content
    by_name = args("model.base=hf://Qwen/Qwen3-8B")
    assert by_name[by_name.index("--tool-call-parser") + 1] == "hermes"
    named = args(f"model.base={base}", "serve.tool_parser=mistral")
    assert named[named.index("--tool-call-parser") + 1] == "mistral"
    assert "--enable-auto-tool-choice" not in args(f"model.base={base}", "serve.tool_parser=none")
    assert "--tool-call-parser" not in args(f"model.base={base}", "model.chat_template=chatml")


def test_planted_secrets_appear_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    planted = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret-9f8e7d", "AWS_ACCESS_KEY_ID": "AKIAPLANTED123",
               "HF_TOKEN": "hf_plantedtoken123456", "KUBETUNE_API_KEY": "planted-api-key-42",
               "VLLM_API_KEY": "planted-vllm-key-43"}
    for k, v in planted.items():
        monkeypatch.setenv(k, v)
    text = "".join(to_yaml(rendered(name, what)) for name, what in cases())
    for value in planted.values():
        assert value not in text


def job_reaction(policy: dict[str, Any], container: str, exit_code: int, disrupted: bool = False) -> str:
    """What the Job controller does with a failed pod under `policy` (batch/v1 podFailurePolicy: the
    first rule that matches decides; no match counts the failure against backoffLimit)."""
    for rule in policy["rules"]:
        on_exit = rule.get("onExitCodes")
        if on_exit and on_exit.get("containerName", container) == container:
            inside = exit_code in on_exit["values"]
            if inside == (on_exit["operator"] == "In"):
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if disrupted and cond["type"] == "DisruptionTarget" and cond["status"] == "True":
                return rule["action"]
    return "Count"


@pytest.mark.parametrize("what", ["train", "stage"])
def test_exit_codes_are_the_contract_the_job_acts_on(what: str) -> None:
    from kubetune.errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_TRANSIENT, EXIT_USAGE

    name = "d-minio-lora-sweep.yaml"
    (job,) = by_kind(rendered(name, what), "Job")
    policy, container = job["spec"]["podFailurePolicy"], job["spec"]["template"]["spec"]["containers"][0]["name"]
    assert job_reaction(policy, container, EXIT_USAGE) == "FailJob"          # fix your input: no retry
    assert job_reaction(policy, container, EXIT_TRANSIENT) == "Count"        # storage blip: retried
    assert job_reaction(policy, container, EXIT_FAILURE) == "Count"
    assert job_reaction(policy, container, EXIT_PREEMPTED, disrupted=True) == "Ignore"  # not even counted
    assert job["spec"]["backoffLimit"] >= 1
    # no replacement pod while the old one is still terminating: one writer per run
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    if what == "train":
        assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "--wait"


def _run_folder(root: Path, name: str, rank: int, base: str = "s3://models/TinyLlama-1.1B-Chat-v1.0") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": name, "model": {"base": base}, "data": {"train": "s3://data/train.jsonl"},
        "method": {"type": "lora", "lora": {"r": rank, "alpha": 2 * rank}}, "output": f"s3://kubetune-runs/runs/{name}"}))
    return folder


def test_the_runs_of_a_sweep_are_served_by_one_deployment_each_with_its_own_rank(tmp_path: Path, cli) -> None:
    """--run reads each run's own resolved spec: a rank-64 winner is served with --max-lora-rank 64 under
    its own name, and all the runs of one base share one vLLM Deployment as LoRA modules."""
    runs = [_run_folder(tmp_path, f"sweep-r{r}", r) for r in (8, 16, 64)]
    d = str(ROOT / "examples" / "d-minio-lora-sweep.yaml")
    code, out, err = cli("render", d, "--what", "serve", "--run", str(runs[2]))
    assert code == 0, err
    (deployment,) = [o for o in yaml.safe_load_all(out) if o["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert deployment["metadata"]["name"] == "sweep-r64-serve"
    assert args[args.index("--max-lora-rank") + 1] == "64" and f"sweep-r64={runs[2]}/final/adapter" in args
    code, out, err = cli("render", d, "--what", "serve", *[a for r in runs for a in ("--run", str(r))])
    assert code == 0, err
    objects = list(yaml.safe_load_all(out))
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    modules = args[args.index("--lora-modules") + 1:args.index("--lora-modules") + 4]
    assert modules == [f"sweep-r{r}={run}/final/adapter" for r, run in zip((8, 16, 64), runs)]
    assert args[args.index("--max-lora-rank") + 1] == "64" and args[args.index("--max-loras") + 1] == "3"
    for obj in objects:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    other = _run_folder(tmp_path, "other-base", 8, base="hf://Qwen/Qwen3-0.6B")
    code, _, err = cli("render", d, "--what", "serve", "--run", str(runs[0]), "--run", str(other))
    assert code == 2 and "one Deployment serves one base model" in err


def test_adapters_in_object_storage_are_fetched_each_to_its_own_folder() -> None:
    from kubetune.k8s.render.serve import Served, serve_objects

    spec = load_spec(ROOT / "examples" / "d-minio-lora-sweep.yaml")
    served = [Served(f"r{r}", f"s3://kubetune-runs/runs/r{r}/final/adapter", r, "s3://models/Tiny") for r in (8, 64)]
    pod = pod_of(serve_objects(spec, served))
    fetches = {c["name"]: kubetune_argv(c) for c in pod["initContainers"]}
    assert fetches["fetch-base"][-2:] == ["--to", "/models/base"]
    assert fetches["fetch-r8"] == ["kubetune", "stage", "--model", "s3://kubetune-runs/runs/r8/final/adapter",
                                   "--to", "/models/r8"]
    args = pod["containers"][0]["args"]
    assert args[0] == "/models/base/models/Tiny"
    assert "r8=/models/r8/models/adapter" in args and "r64=/models/r64/models/adapter" in args
    whole = pod_of(serve_objects(spec, [Served("Qwen3-8B", "hf://Qwen/Qwen3-8B")]))
    assert whole["containers"][0]["args"][0] == "Qwen/Qwen3-8B" and "initContainers" not in whole


def test_the_hpa_metric_is_scraped_by_a_rendered_object() -> None:
    """servicemonitor: the ServiceMonitor selects the Service and its port, the Prometheus Adapter rule
    (which deploy adds to the adapter's own config: no ConfigMap of kubetune's, the adapter never reads
    one) publishes the series under the HPA's metric name; podmonitoring: GKE's adapter name for it."""
    from kubetune.k8s.render.serve import adapter_rule
    from kubetune.spec.load import load_spec

    objs = rendered("b-summarise-qlora-serve.yaml", "serve", "serve.autoscaling.monitoring=servicemonitor")
    hpa, service = by_kind(objs, "HorizontalPodAutoscaler")[0], by_kind(objs, "Service")[0]
    monitor = by_kind(objs, "ServiceMonitor")[0]
    assert not by_kind(objs, "ConfigMap")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]
    rule = adapter_rule(load_spec(ROOT / "examples" / "b-summarise-qlora-serve.yaml",
                                  ["serve.autoscaling.monitoring=servicemonitor"]))
    assert rule["name"]["as"] == metric == "vllm:num_requests_waiting" and metric in rule["seriesQuery"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    deployment = by_kind(objs, "Deployment")[0]
    assert "replicas" not in deployment["spec"]  # the HPA's field
    gke = rendered("b-summarise-qlora-serve.yaml", "serve", "serve.autoscaling.monitoring=podmonitoring",
                   "serve.autoscaling.metric=kv_cache", "serve.autoscaling.target=null")
    hpa, pods = by_kind(gke, "HorizontalPodAutoscaler")[0], by_kind(gke, "PodMonitoring")[0]
    target = hpa["spec"]["metrics"][0]["pods"]
    assert target["metric"]["name"] == "prometheus.googleapis.com|vllm:kv_cache_usage_perc|gauge"
    assert target["target"]["averageValue"] == "800m"
    template_labels = by_kind(gke, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert pods["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    batch = by_kind(rendered("b-summarise-qlora-serve.yaml", "serve", "serve.autoscaling.metric=batch",
                             "serve.autoscaling.target=null"),
                    "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["pods"]
    assert batch["metric"]["name"] == "vllm:num_requests_running" and batch["target"]["averageValue"] == "48"


def test_gpu_sharing_is_rendered_as_gke_and_the_device_plugin_document() -> None:
    gke = ["kubernetes.node_selector={cloud.google.com/gke-accelerator: nvidia-l4}"]
    pod = pod_of(rendered("b-summarise-qlora-serve.yaml", "serve", *gke, "serve.gpu_sharing=time_sharing",
                          "serve.gpu_clients=4"))
    assert pod["nodeSelector"]["cloud.google.com/gke-gpu-sharing-strategy"] == "time-sharing"
    assert pod["nodeSelector"]["cloud.google.com/gke-max-shared-clients-per-gpu"] == "4"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mps = pod_of(rendered("b-summarise-qlora-serve.yaml", "serve", *gke, "serve.gpu_sharing=mps"))
    assert mps["nodeSelector"]["cloud.google.com/gke-gpu-sharing-strategy"] == "mps"
    mig = pod_of(rendered("b-summarise-qlora-serve.yaml", "serve", *gke, "serve.gpu_sharing=mig:1g.10gb"))
    assert mig["nodeSelector"]["cloud.google.com/gke-gpu-partition-size"] == "1g.10gb"
    plugin = pod_of(rendered("b-summarise-qlora-serve.yaml", "serve", "kubernetes.node_selector={}",
                             "serve.gpu_sharing=mig:1g.10gb"))
    limits = plugin["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/mig-1g.10gb") == "1" and "nvidia.com/gpu" not in limits
    # vLLM's memory claim (its --gpu-memory-utilization, docs.vllm.ai engine arguments): a pod sharing a GPU
    # with N-1 others takes 1/N of the default 0.9; a MIG slice and an unshared GPU keep the default
    def fraction(p: dict) -> str | None:
        args = p["containers"][0]["args"]
        return args[args.index("--gpu-memory-utilization") + 1] if "--gpu-memory-utilization" in args else None

    assert fraction(pod) == "0.225" and fraction(mps) == "0.450"  # 4 clients; the default 2
    assert fraction(mig) is None and fraction(plugin) is None
    assert fraction(pod_of(rendered("b-summarise-qlora-serve.yaml", "serve", *gke))) is None
    for p in (pod, mig, plugin):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": p},
                                     "1.33.0", strict=True)


def test_deploy_grid_serves_every_run_of_the_sweep_from_its_storage(cli) -> None:
    code, out, err = cli("render", str(ROOT / "examples" / "d-minio-lora-sweep.yaml"), "--what", "serve",
                         "--grid", "method.lora.r=8,16,64")
    assert code == 0, err
    pod = pod_of(list(yaml.safe_load_all(out)))
    args = pod["containers"][0]["args"]
    names = [f"tinyllama-chat-r{r}" for r in (8, 16, 64)]
    assert [a.split("=")[0] for a in args[args.index("--lora-modules") + 1:][:3]] == names
    assert args[args.index("--max-lora-rank") + 1] == "64" and args[args.index("--max-loras") + 1] == "3"
    fetched = {kubetune_argv(c)[3]: kubetune_argv(c)[-1] for c in pod["initContainers"] if c["name"] != "fetch-base"}
    spec = load_spec(ROOT / "examples" / "d-minio-lora-sweep.yaml")
    parent = spec.output_uri.rstrip("/").rsplit("/", 1)[0]
    assert fetched == {f"{parent}/{n}/final/adapter": f"/models/{n}" for n in names}  # each run's own output


def test_the_image_build_fails_when_an_install_step_fails() -> None:
    """deploy/Dockerfile: no step may swallow a failure (`|| true` once made a broken install an image)."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "|| true" not in text and "|| :" not in text
    install = next(block for block in text.split("\nRUN ")[1:] if "pip install -r" in block)
    assert install.startswith("set -eu;")  # each `;`-separated step stops the build when it fails


def test_rocm_pods_run_non_root_in_the_groups_that_own_the_gpu_devices() -> None:
    """ROCm's container documentation (rocm.docs.amd.com, "Running ROCm Docker containers": --group-add video
    --group-add render): /dev/kfd and /dev/dri/renderD* are owned by the node's video and render groups, which
    a non-root process must be in. The AMD device plugin passes the devices with the node's group ids and not
    the groups; a pod's supplementalGroups is how a non-root container gets them (ROCm/k8s-device-plugin
    issue #39, where the render group is 106 on Debian 11: hence kubernetes.device_groups)."""
    for what in ("train", "serve"):
        pod = pod_of(rendered("d-full-8gpu.yaml", what))
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["supplementalGroups"] == [44, 109]
        assert "amd.com/gpu" in pod["containers"][0]["resources"]["limits"]
    own = pod_of(rendered("d-full-8gpu.yaml", "train", "kubernetes.device_groups=[44, 992]"))
    assert own["securityContext"]["supplementalGroups"] == [44, 992]  # the render group of the operator's nodes
    nvidia = pod_of(rendered("d-full-8gpu.yaml", "train", "resources.accelerator=nvidia"))
    assert "supplementalGroups" not in nvidia["securityContext"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": own},
                                 "1.33.0", strict=True)


def _bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    unit = next((u for u in sorted(units, key=len, reverse=True) if q.endswith(u)), "")
    return float(q[: len(q) - len(unit)]) * units.get(unit, 1)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_pod_asks_for_the_node_disk_it_writes(example: str) -> None:
    """GKE Autopilot ("Resource requests in Autopilot": ephemeral storage defaults to 1 GiB unless
    requested) and the kubelet (evicts a pod past its ephemeral-storage limit, or an emptyDir past its
    sizeLimit): every node-local volume is bounded, and the pod asks for all of them plus its logs."""
    for what in ("train", "stage", "serve"):
        try:
            objects = rendered(example, what)
        except UsageError:
            continue  # nothing to stage for this example
        for owner in [*by_kind(objects, "Job"), *by_kind(objects, "Deployment")]:
            pod = owner["spec"]["template"]["spec"]
            local = [v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"]
            assert all("sizeLimit" in d for d in local), (example, what)
            asked = sum(_bytes(c["resources"]["requests"]["ephemeral-storage"]) for c in pod["containers"])
            assert asked >= sum(_bytes(d["sizeLimit"]) for d in local) + 2**30, (example, what)
            for c in [*pod["containers"], *pod.get("initContainers", [])]:
                r = c["resources"]
                assert r["requests"]["ephemeral-storage"] == r["limits"]["ephemeral-storage"]


def test_serving_downloads_each_model_once_onto_its_sized_volume() -> None:
    pod = pod_of(rendered("d-minio-lora-sweep.yaml", "serve", "serve.model_storage=120Gi"))
    env = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
    assert env["KUBETUNE_CACHE"].startswith("/models/") and env["HF_HOME"].startswith("/models/")
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["emptyDir"]["sizeLimit"] == "120Gi"
    assert _bytes(pod["containers"][0]["resources"]["limits"]["ephemeral-storage"]) == (126 + 4) * 2**30  # + kubetune installed at start
    with pytest.raises(SpecError) as bad:
        rendered("quickstart.yaml", "serve", "serve.model_storage=lots")
    assert "serve.model_storage" in bad.value.render() and "quantity" in bad.value.render()


def test_keda_scales_on_a_prometheus_query_of_this_deployments_pods() -> None:
    """keda: a ServiceMonitor (Prometheus scrapes the pods) and a ScaledObject whose Prometheus trigger
    KEDA evaluates itself: no adapter rule, no HPA of kubetune's (KEDA makes and owns it). The query
    sums the series over this Deployment's pods only; AverageValue makes the threshold per pod."""
    import re

    objs = rendered("b-summarise-qlora-serve.yaml", "serve", "serve.autoscaling.monitoring=keda",
                    "serve.autoscaling.metric=batch", "serve.autoscaling.target=12.5", "serve.autoscaling.max=6",
                    "serve.autoscaling.prometheus_url=http://prom.obs.svc:9090")
    assert not by_kind(objs, "HorizontalPodAutoscaler") and not by_kind(objs, "ConfigMap")
    scaled, monitor = by_kind(objs, "ScaledObject")[0], by_kind(objs, "ServiceMonitor")[0]
    deployment = by_kind(objs, "Deployment")[0]
    name, ns = deployment["metadata"]["name"], deployment["metadata"]["namespace"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["spec"]["scaleTargetRef"]["name"] == name
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 6)
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns the field
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["serverAddress"] == "http://prom.obs.svc:9090" and trigger["metadata"]["threshold"] == "12.5"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(vllm:num_requests_running{") and f'namespace="{ns}"' in query
    service = by_kind(objs, "Service")[0]["metadata"]["name"]
    assert re.search(r'service="([^"]+)"', query).group(1) == service  # type: ignore[union-attr]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= by_kind(objs, "Service")[0]["metadata"]["labels"].items()
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert monitor["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    with pytest.raises(SpecError) as bad:
        rendered("quickstart.yaml", "serve", "serve.autoscaling.monitoring=keda",
                 "serve.autoscaling.prometheus_url=file:///etc/passwd")
    assert "serve.autoscaling.prometheus_url" in bad.value.render()


def test_an_autoscaler_on_a_metric_nothing_serves_is_said(cli) -> None:
    code, out, err = cli("render", str(ROOT / "examples" / "quickstart.yaml"), "--what", "serve",
                         "--set", "serve.autoscaling.monitoring=none")
    assert code == 0 and "kind: HorizontalPodAutoscaler" in out
    assert "nothing rendered here makes Prometheus scrape the pods" in err and "kubetune doctor" in err
    code, out, err = cli("render", str(ROOT / "examples" / "quickstart.yaml"), "--what", "serve",
                         "--set", "serve.autoscaling.monitoring=servicemonitor")
    assert code == 0 and "nothing rendered here" not in err
    code, out, err = cli("render", str(ROOT / "examples" / "quickstart.yaml"), "--what", "serve",
                         "--set", "serve.autoscaling=null")
    assert code == 0 and "HorizontalPodAutoscaler" not in out and "nothing rendered here" not in err


def test_runtime_adapters_enable_vllms_runtime_lora_loading_with_a_sidecar_and_a_list() -> None:
    """serve.runtime_adapters: vLLM takes adapters while it runs (/v1/load_lora_adapter), a sidecar
    loads what the ConfigMap lists; the ConfigMap is rendered without data, so applying the manifests
    again keeps the list the control plane wrote."""
    for example in ("quickstart.yaml", "d-minio-lora-sweep.yaml"):
        objects = rendered(example, "serve", "serve.runtime_adapters=true", "serve.max_loras=4")
        pod = pod_of(objects)
        vllm, sidecar = pod["containers"]
        args = vllm["args"]
        assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == "4"
        assert args[args.index("--max-lora-rank") + 1] == "64"
        assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
        (listing,) = by_kind(objects, "ConfigMap")
        assert "data" not in listing and listing["metadata"]["name"].endswith("-serve-adapters")
        assert kubetune_argv(sidecar)[:2] == ["kubetune", "serve-adapters"]
        assert f"http://127.0.0.1:{vllm['ports'][0]['containerPort']}" in sidecar["command"]
        volume = next(v for v in pod["volumes"] if v["name"] == "adapter-list")
        assert volume["configMap"]["name"] == listing["metadata"]["name"]
        assert {m["name"] for m in sidecar["volumeMounts"]} >= {"models", "adapter-list"}  # fetched onto the models volume
        for obj in objects:
            if obj["kind"] not in CRDS:
                for version in VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
    plain = pod_of(rendered("quickstart.yaml", "serve"))
    assert len(plain["containers"]) == 1 and not any(e["name"] == "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
                                                     for e in plain["containers"][0]["env"])


@pytest.mark.parametrize("example,accelerator,image,device", [
    # Intel's vLLM image with the Gaudi plugin (docs.vllm.ai/projects/gaudi, "Quick Start": vllm-installer images)
    ("c-gaudi-pvc.yaml", "gaudi", "vault.habana.ai/gaudi-docker/1.22.0/ubuntu22.04/habanalabs/vllm-installer-2.7.1:",
     "habana.ai/gaudi"),
    # AMD's vLLM build for ROCm (ROCm docs, "vLLM inference"), the device groups a non-root pod needs
    ("d-full-8gpu.yaml", "amd", "rocm/vllm:rocm6.4.1_vllm_", "amd.com/gpu"),
    ("b-summarise-qlora-serve.yaml", "nvidia", "vllm/vllm-openai:", "nvidia.com/gpu"),
    ("quickstart.yaml", "cpu", "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:", None),
])
def test_serving_runs_vllms_build_for_the_accelerator(example: str, accelerator: str, image: str,
                                                      device: str | None) -> None:
    objs = rendered(example, "serve", f"resources.accelerator={accelerator}")
    for obj in objs:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    pod = pod_of(objs)
    vllm = pod["containers"][0]
    assert vllm["image"].startswith(image) and ":latest" not in vllm["image"]
    limits = vllm["resources"]["limits"]
    assert (device in limits) if device else not (set(limits) & {"nvidia.com/gpu", "amd.com/gpu", "habana.ai/gaudi"})
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    if accelerator == "gaudi":  # Intel Gaudi's Kubernetes guide: hugepages with the cards; TP needs lazy collectives
        assert "hugepages-2Mi" in limits and env["PT_HPU_ENABLE_LAZY_COLLECTIVES"] == "true"
    else:
        assert "PT_HPU_ENABLE_LAZY_COLLECTIVES" not in env
    if accelerator == "amd":
        assert set(pod["securityContext"]["supplementalGroups"]) >= {44, 109}
    named = rendered(example, "serve", f"resources.accelerator={accelerator}", "serve.image=registry.internal/vllm:7")
    assert pod_of(named)["containers"][0]["image"] == "registry.internal/vllm:7"


def test_a_model_graders_judge_key_reaches_the_training_pod_by_reference_only() -> None:
    judge = '{"grader-8b": {"base_url": "http://judge.serving.svc:8000/v1", "api_key_env": "JUDGE_KEY", %s}}'
    grpo = ("method.objective=grpo", "eval.metrics=[]", 'method.grpo.rewards=[{"function": "length", "max_chars": 9}]')
    objects = rendered("quickstart.yaml", "train", *grpo,
                       "method.grpo.judges=" + judge % '"api_key_secret": "judge-creds/key"')
    env = {e["name"]: e for e in pod_of(objects)["containers"][0]["env"]}
    assert env["JUDGE_KEY"] == {"name": "JUDGE_KEY", "valueFrom": {"secretKeyRef": {"name": "judge-creds",
                                                                                  "key": "key"}}}
    with pytest.raises(SpecError) as refused:
        rendered("quickstart.yaml", "train", *grpo, "method.grpo.judges=" + judge % '"timeout_s": 9')
    assert refused.value.problems[0].where == "method.grpo.judges.grader-8b.api_key_secret"


def test_gaudi_training_pods_run_transformers_in_eager_mode_unless_the_spec_says_otherwise() -> None:
    """transformers' Intel Gaudi page (huggingface.co/docs/transformers/perf_train_gaudi): its modeling code is not
    all written for HPU lazy mode, the images' default: PT_HPU_LAZY_MODE=0, and PT_ENABLE_INT64_SUPPORT=1."""
    env = {e["name"]: e.get("value") for e in pod_of(rendered("c-gaudi-8card.yaml", "train"))["containers"][0]["env"]}
    assert env["PT_HPU_LAZY_MODE"] == "0" and env["PT_ENABLE_INT64_SUPPORT"] == "1"
    lazy = pod_of(rendered("c-gaudi-8card.yaml", "train", 'kubernetes.env={"PT_HPU_LAZY_MODE": "1", "X": "y"}'))
    names = [e["name"] for e in lazy["containers"][0]["env"]]
    env = {e["name"]: e.get("value") for e in lazy["containers"][0]["env"]}
    assert env["PT_HPU_LAZY_MODE"] == "1" and env["X"] == "y" and len(names) == len(set(names))
    nvidia = {e["name"] for e in pod_of(rendered("quickstart.yaml", "train"))["containers"][0]["env"]}
    assert "PT_HPU_LAZY_MODE" not in nvidia
