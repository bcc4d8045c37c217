"""submit / status / logs / cancel / list / deploy with the real `kubernetes` client against an
HTTP server on 127.0.0.1 speaking the Kubernetes API (tests/k8s_server.py): the requests made, and
the handling of 404, 409, 403, watch streams, a missing namespace and no cluster at all."""

from __future__ import annotations

import base64
import sys

from pathlib import Path

import pytest

from kubetune.k8s.render.probe import FIND_VLLM
from tests.conftest import kubetune_argv
from tests.k8s_server import FakeKubernetes

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "examples" / "quickstart.yaml")


def writes(fake: FakeKubernetes) -> list[tuple[str, str]]:
    return [(m, p.split("?")[0]) for m, p in fake.requests if m != "GET"]


def test_submit_creates_then_leaves_a_running_run_alone(k8s: FakeKubernetes, cli) -> None:
    code, out, err = cli("submit", SPEC, "--set", "kubernetes.namespace=ml")
    assert code == 0, err
    assert "configmap/quickstart-spec created" in out and "job/quickstart created" in out
    (wheel,) = [p.rsplit("/", 1)[1] for m, p in writes(k8s) if "/configmaps/quickstart-kubetune-" in p]
    assert f"configmap/{wheel} created" in out  # the wheel the pod installs at start, named by its content
    # server-side apply (field manager kubetune), not create-then-patch
    assert writes(k8s) == [("PATCH", f"/api/v1/namespaces/ml/configmaps/{wheel}"),
                           ("PATCH", "/api/v1/namespaces/ml/configmaps/quickstart-spec"),
                           ("PATCH", "/apis/batch/v1/namespaces/ml/jobs/quickstart")]
    assert all("fieldManager=kubetune" in p and "force=false" in p for m, p in k8s.requests if m == "PATCH")
    job = k8s.get("jobs", "ml", "quickstart")
    assert kubetune_argv(job["spec"]["template"]["spec"]["containers"][0])[:2] == ["kubetune", "train"]
    k8s.requests.clear()
    job["status"] = {"active": 1}
    code, out, _ = cli("submit", SPEC, "--set", "kubernetes.namespace=ml")
    assert code == 0 and "job/quickstart unchanged (running)" in out and "configmap/quickstart-spec configured" in out
    assert ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/quickstart") not in writes(k8s)  # running: not replaced


def test_a_resubmit_keeps_the_jobs_scratch_size_when_the_base_reads_otherwise(k8s: FakeKubernetes, cli,
                                                                            tmp_path: Path, tiny_model: Path) -> None:
    """scratch_size auto is worked out from the base's size where the submitting machine can read it; a Job's
    pod template cannot change, so a re-submit (another machine, the base grown) keeps the Job's size."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    sets = ["--set", "kubernetes.namespace=ml", "--set", f"model.base={base}"]

    def scratch() -> str:
        volumes = k8s.get("jobs", "ml", "quickstart")["spec"]["template"]["spec"]["volumes"]
        claim = next(v for v in volumes if v["name"] == "scratch")["ephemeral"]["volumeClaimTemplate"]
        return claim["spec"]["resources"]["requests"]["storage"]

    code, out, err = cli("submit", SPEC, *sets)
    assert code == 0, err
    first = scratch()
    k8s.get("jobs", "ml", "quickstart")["status"] = {"active": 1}
    with (base / "model.safetensors").open("r+b") as fh:
        fh.truncate(40 * 2**30)  # this machine now reads a 40 GiB base
    code, out, err = cli("submit", SPEC, *sets)
    assert code == 0 and "job/quickstart unchanged (running)" in out, out + err
    assert scratch() == first
    code, out, err = cli("render", SPEC, *sets)
    assert code == 0 and "storage: 46Gi" in out  # what a new Job would get: 40 GiB, the tiny LoRA, 5 GiB


def test_resubmitting_a_failed_run_recreates_its_job(k8s: FakeKubernetes, cli) -> None:
    cli("submit", SPEC)
    k8s.get("jobs", "default", "quickstart")["status"] = {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the backoff limit"}]}
    code, out, _ = cli("status", "quickstart")
    assert "Failed — BackoffLimitExceeded" in out
    k8s.requests.clear()
    code, out, err = cli("submit", SPEC)
    assert code == 0, err
    assert "recreated" in out
    assert ("DELETE", "/apis/batch/v1/namespaces/default/jobs/quickstart") in writes(k8s)
    assert writes(k8s)[-1] == ("PATCH", "/apis/batch/v1/namespaces/default/jobs/quickstart")


def _pod(name: str, phase: str, **status: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {
        "batch.kubernetes.io/job-name": "quickstart", "batch.kubernetes.io/job-completion-index": "0"}},
        "spec": {"containers": [{"name": "train", "image": "img"}]}, "status": {"phase": phase, **status}}


def test_status_explains_pending_queued_and_running(k8s: FakeKubernetes, cli) -> None:
    cli("submit", SPEC, "--set", "kubernetes.queue=team-a")
    code, out, _ = cli("status", "quickstart")
    assert code == 0 and "Queued — queued by Kueue in LocalQueue team-a" in out and "no pods yet" in out

    job = k8s.get("jobs", "default", "quickstart")
    job["spec"]["suspend"] = False
    k8s.put("pods", "default", _pod("quickstart-0-abc", "Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]))
    code, out, _ = cli("status", "quickstart")
    assert "unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in out

    k8s.put("pods", "default", _pod("quickstart-0-abc", "Pending", containerStatuses=[
        {"name": "train", "image": "ghcr.io/x/y:nope", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"ghcr.io/x/y:nope\""}}}]))
    code, out, _ = cli("status", "quickstart")
    assert "image pull failed (ImagePullBackOff)" in out

    job["status"] = {"active": 1}
    k8s.put("pods", "default", _pod("quickstart-0-abc", "Running"))
    k8s.logs["quickstart-0-abc"] = ("training: 800 optimizer steps\nstep 50/800  loss 2.3456  lr 3.0e-03  tok/s 900  "
                                    "eta 0:05:10\nstep 100/800  loss 1.2345  lr 2.9e-03  tok/s 950  eta 0:04:40\n")
    code, out, _ = cli("status", "quickstart")
    assert "run quickstart: Running" in out and "step 100/800  loss 1.2345  eta 0:04:40" in out


def test_logs_list_and_cancel(k8s: FakeKubernetes, cli) -> None:
    cli("submit", SPEC)
    k8s.put("pods", "default", _pod("quickstart-0-abc", "Running"))
    k8s.logs["quickstart-0-abc"] = "step 10/800  loss 5.0\n"
    code, out, _ = cli("logs", "quickstart")
    assert code == 0 and out == "step 10/800  loss 5.0\n"
    code, out, _ = cli("list")
    assert "quickstart" in out and "Pending" in out
    code, out, _ = cli("cancel", "quickstart")
    assert code == 0 and "job/quickstart deleted" in out and "configmap/quickstart-spec deleted" in out
    assert k8s.get("pods", "default", "quickstart-0-abc") is None
    code, out, err = cli("status", "quickstart")
    assert code == 2 and "jobs.batch/quickstart in namespace default: not found" in err


def test_logs_follow_watches_for_the_pod(k8s: FakeKubernetes, cli) -> None:
    cli("submit", SPEC)
    k8s.put("pods", "default", _pod("quickstart-0-abc", "Pending"))
    k8s.logs["quickstart-0-abc"] = "hello\n"

    # the watch stream reports the pod as running (ADDED event) → its log is followed
    original = k8s.dispatch

    def running_on_watch(method, r, query, body, content_type=""):  # type: ignore[no-untyped-def]
        if query.get("watch") == "true":
            k8s.get("pods", "default", "quickstart-0-abc")["status"]["phase"] = "Running"
        return original(method, r, query, body, content_type)

    k8s.dispatch = running_on_watch  # type: ignore[method-assign]
    code, out, err = cli("logs", "quickstart", "-f")
    assert code == 0 and out == "hello\n", err
    assert any("watch=true" in p for _, p in k8s.requests)
    assert any("follow=true" in p for _, p in k8s.requests)


def test_forbidden_missing_namespace_and_no_cluster(k8s: FakeKubernetes, cli, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    k8s.forbidden.add(("PATCH", "configmaps"))
    code, _, err = cli("submit", SPEC)
    assert code == 2 and "forbidden: cannot apply configmaps in namespace default" in err
    assert "deploy/rbac.yaml" in err and "Traceback" not in err
    k8s.forbidden.clear()
    code, _, err = cli("submit", SPEC, "--set", "kubernetes.namespace=nope")
    assert code == 2 and "namespace nope does not exist" in err
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, _, err = cli("list")
    assert code == 2 and "no Kubernetes cluster configured" in err


def test_deploy_applies_the_serving_objects_and_says_how_to_try_it(k8s: FakeKubernetes, cli) -> None:
    code, out, err = cli("deploy", str(ROOT / "examples" / "b-summarise-qlora-serve.yaml"))
    assert code == 0, err
    for kind in ("deployment", "service", "poddisruptionbudget", "horizontalpodautoscaler"):
        assert f"{kind}/llama32-3b-samsum-serve created" in out
    assert "kubectl -n ml port-forward service/llama32-3b-samsum-serve 8000:8000" in out
    assert "kubetune chat http://127.0.0.1:8000 --model llama32-3b-samsum" in out
    hpa = k8s.get("horizontalpodautoscalers", "ml", "llama32-3b-samsum-serve")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"


def test_status_reads_progress_from_the_runs_events_in_storage(k8s: FakeKubernetes, cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The events are those of a real short training run into s3:// (written by the trainer, not here)."""
    from kubetune.artifacts.events import StepEvent, format_eta, parse_events
    from tests.conftest import run_kubetune, tiny_overrides
    from tests.servers import start_s3

    s3 = start_s3()
    try:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        s3.client().create_bucket(Bucket="runs")
        overrides = [a for item in tiny_overrides(tmp_path / "unused") if not item.startswith("output=")
                     for a in ("--set", item)]
        overrides += ["--set", "output=s3://runs/qs", "--set", "train.max_steps=6", "--set", "train.logging_steps=2"]
        res = run_kubetune("train", SPEC, *overrides, HOME=str(tmp_path / "home"), **s3.env())
        assert res.returncode == 0, res.stderr[-2000:]
        text = s3.client().get_object(Bucket="runs", Key="qs/events.jsonl")["Body"].read().decode()
        steps = [e for e in parse_events(text.splitlines()) if isinstance(e, StepEvent)]
        assert [e.step for e in steps] == [2, 4, 6]

        cli("submit", SPEC, "--set", "output=s3://runs/qs")
        k8s.get("jobs", "default", "quickstart")["status"] = {"active": 1}
        k8s.put("pods", "default", _pod("quickstart-0-abc", "Running"))
        code, out, err = cli("status", "quickstart")
        assert code == 0, err
        assert f"step 6/6  loss {steps[-1].loss:.4f}  eta done  (from s3://runs/qs/events.jsonl)" in out
        assert "newest checkpoint in storage: s3://runs/qs/checkpoints/checkpoint-6" in out

        # the same run seen while it was still training: the events up to its second step event
        lines = text.splitlines()
        cut = [i for i, line in enumerate(lines) if '"event":"step"' in line][1]
        s3.client().put_object(Bucket="runs", Key="qs/events.jsonl", Body="\n".join(lines[:cut + 1]).encode())
        code, out, err = cli("status", "quickstart")
        assert code == 0, err
        assert steps[1].eta_s is not None and steps[1].loss is not None
        assert f"step 4/6  loss {steps[1].loss:.4f}  eta {format_eta(steps[1].eta_s)}  (from" in out
    finally:
        s3.stop()


def test_apply_has_the_api_servers_semantics(k8s: FakeKubernetes, cli) -> None:
    """Re-applying after an env var left the spec removes it (no stale merge); a field another tool
    owns is a conflict naming the field; a running Job's pod template cannot change: clear errors."""
    b = str(ROOT / "examples" / "b-summarise-qlora-serve.yaml")
    assert cli("deploy", b)[0] == 0
    container = k8s.get("deployments", "ml", "llama32-3b-samsum-serve")["spec"]["template"]["spec"]["containers"][0]
    assert "VLLM_API_KEY" in [e["name"] for e in container["env"]]
    code, out, err = cli("deploy", b, "--set", "kubernetes.secrets.api_key=null")
    assert code == 0 and "deployment/llama32-3b-samsum-serve configured" in out, err
    container = k8s.get("deployments", "ml", "llama32-3b-samsum-serve")["spec"]["template"]["spec"]["containers"][0]
    assert "VLLM_API_KEY" not in [e["name"] for e in container["env"]]  # gone, not merged back

    # another tool scaled a fixed-size Deployment: kubetune does not silently take the field back
    k8s.managers[("deployments", "ml", "llama32-3b-samsum-serve")]["kubectl"] = {("spec", "replicas")}
    k8s.get("deployments", "ml", "llama32-3b-samsum-serve")["spec"]["replicas"] = 3
    code, _, err = cli("deploy", b, "--set", "serve.autoscaling=null", "--set", "serve.replicas=2")
    assert code == 2 and ".spec.replicas" in err and 'conflict with "kubectl"' in err and "Traceback" not in err

    assert cli("submit", SPEC)[0] == 0
    k8s.get("jobs", "default", "quickstart")["status"] = {"active": 1}
    code, _, err = cli("submit", SPEC, "--set", "kubernetes.image=example.com/kubetune:next")
    assert code == 2 and "spec.template cannot change while the Job exists" in err and "kubetune cancel" in err


D_FULL = str(ROOT / "examples" / "d-full-8gpu.yaml")


def test_setup_prepares_a_namespace_and_never_overwrites_a_secret(k8s: FakeKubernetes, cli) -> None:
    sets = ["--set", "kubernetes.namespace=fresh", "--set", "kubernetes.service_account=trainer",
            "--set", "kubernetes.operators=[alice@example.com]"]
    code, out, err = cli("setup", D_FULL, *sets)
    assert code == 0, err
    for line in ("namespace/fresh created", "serviceaccount/trainer created", "role/kubetune created",
                 "rolebinding/kubetune created", "localqueue/team-a-queue created",
                 "secret/minio-credentials created (placeholders: fill in the values)"):
        assert line in out, out
    assert ("PATCH", "/api/v1/namespaces/fresh") in writes(k8s)  # cluster-scoped, applied
    assert k8s.get("localqueues", "fresh", "team-a-queue")["spec"] == {"clusterQueue": "team-a-cluster-queue"}
    secret = k8s.get("secrets", "fresh", "minio-credentials")
    filled = base64.b64encode(b"filled-in-by-the-user").decode()
    assert "stringData" not in secret  # the API server stores data, base64
    secret["data"]["AWS_SECRET_ACCESS_KEY"] = filled
    code, out, err = cli("setup", D_FULL, *sets)
    assert code == 0 and "namespace/fresh configured" in out and "role/kubetune configured" in out, err
    assert "secret/minio-credentials exists (left as it is" in out
    assert k8s.get("secrets", "fresh", "minio-credentials")["data"]["AWS_SECRET_ACCESS_KEY"] == filled


def test_doctor_lists_what_to_fix_then_passes(k8s: FakeKubernetes, cli, s3, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.s3_runs import BUCKET

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    sets = [a for item in ("resources.accelerator=nvidia", "resources.devices_per_node=2", "kubernetes.queue=q",
                           "kubernetes.cluster_queue=cq", f"output=s3://{BUCKET}/runs/doctor", "kubernetes.namespace=ml")
            for a in ("--set", item)]
    k8s.denied.add(("patch", "deployments.apps"))
    k8s.denied.add(("get", "pods/log"))
    code, out, err = cli("doctor", SPEC, *sets)
    assert code == 2, out + err
    assert "✓ Kubernetes API at http://127.0.0.1" in out and "(v1.33.0)" in out
    assert "✗ not allowed in namespace ml: get pods/log, patch deployments.apps" in out
    assert "✗ Kueue is not installed" in out and "✗ no node offers 2 nvidia.com/gpu (the most is 0)" in out
    assert f"✓ s3://{BUCKET}/runs/doctor is writable" in out
    assert out.count("    fix: ") == 3 and "3 to fix" in out

    k8s.denied.clear()
    k8s.put("customresourcedefinitions", "", {"metadata": {"name": "localqueues.kueue.x-k8s.io"}})
    k8s.put("localqueues", "ml", {"metadata": {"name": "q"}, "spec": {"clusterQueue": "cq"}})
    k8s.put("nodes", "", {"metadata": {"name": "gpu-1"}, "status": {"allocatable": {"nvidia.com/gpu": "4"}}})
    code, out, err = cli("doctor", SPEC, *sets)
    assert code == 0 and "✗" not in out, out + err
    assert "✓ a node offers 2 nvidia.com/gpu (1 such nodes)" in out and "✓ LocalQueue q exists" in out
    code, out, _ = cli("doctor", SPEC, *sets[:-2], "--set", "output=s3://no-such-bucket-kt/x")
    assert code == 2 and "no-such-bucket-kt" in out and "fix:" in out
    # an autoscaled cluster (GKE Autopilot, GPU pools at zero): no such node until a pod asks, not a failure;
    # nodes of the accelerator that are too small stay a failure (an autoscaler adds nodes of the shapes it has)
    h100 = ["--set", "kubernetes.node_selector={pool: h100}"]
    code, out, _ = cli("doctor", SPEC, *sets, *h100)
    assert code == 2 and "✗ no node offers 2 nvidia.com/gpu among nodes labelled {'pool': 'h100'} (the most is 0)" in out
    k8s.namespaces.add("kube-system")
    k8s.put("configmaps", "kube-system", {"metadata": {"name": "cluster-autoscaler-status"}, "data": {"status": "x"}})
    code, out, err = cli("doctor", SPEC, *sets, *h100)
    assert code == 0, out + err
    assert "no node offers nvidia.com/gpu among nodes labelled {'pool': 'h100'} now; the cluster autoscaler adds " \
           "nodes when a pod asks for them: 2 per node not checked" in out
    code, out, _ = cli("doctor", SPEC, *sets, "--set", "resources.devices_per_node=8")
    assert code == 2 and "✗ no node offers 8 nvidia.com/gpu (the most is 4)" in out


ADAPTER_CONFIG = """rules:
- seriesQuery: 'http_requests_total{namespace!="",pod!=""}'
  resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
  name: {as: http_requests_per_second}
  metricsQuery: 'sum(rate(<<.Series>>{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>)'
"""


def test_deploy_adds_the_rule_to_the_config_the_prometheus_adapter_loads(k8s: FakeKubernetes, cli) -> None:
    """servicemonitor: the rule goes into the adapter's own ConfigMap (its other rules kept), once, and
    the adapter is restarted (it reads its rules at start); no adapter, a clear error."""
    import yaml

    spec = str(ROOT / "examples" / "b-summarise-qlora-serve.yaml")
    sets = ("--set", "serve.autoscaling.monitoring=servicemonitor")
    code, out, err = cli("deploy", spec, *sets)
    assert code == 2 and "ConfigMap monitoring/prometheus-adapter does not exist" in err and "Traceback" not in err
    k8s.namespaces.add("monitoring")
    k8s.put("configmaps", "monitoring", {"metadata": {"name": "prometheus-adapter"},
                                         "data": {"config.yaml": ADAPTER_CONFIG}})
    k8s.put("deployments", "monitoring", {"metadata": {"name": "prometheus-adapter"},
                                          "spec": {"template": {"metadata": {"labels": {"app": "adapter"}}}}})
    code, out, err = cli("deploy", spec, *sets)
    assert code == 0, err
    assert "rule for vllm:num_requests_waiting added, Deployment prometheus-adapter restarted" in out
    rules = yaml.safe_load(k8s.get("configmaps", "monitoring", "prometheus-adapter")["data"]["config.yaml"])["rules"]
    assert [r["name"]["as"] for r in rules] == ["http_requests_per_second", "vllm:num_requests_waiting"]
    hpa = k8s.get("horizontalpodautoscalers", "ml", "llama32-3b-samsum-serve")
    assert rules[1]["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    template = k8s.get("deployments", "monitoring", "prometheus-adapter")["spec"]["template"]["metadata"]
    restarted = template["annotations"]["kubetune.dev/adapter-rules"]
    assert template["labels"] == {"app": "adapter"}
    code, out, err = cli("deploy", spec, *sets)
    assert code == 0 and "already serves vllm:num_requests_waiting" in out, err
    assert len(yaml.safe_load(k8s.get("configmaps", "monitoring", "prometheus-adapter")["data"]["config.yaml"])[
        "rules"]) == 2
    assert k8s.get("deployments", "monitoring", "prometheus-adapter")["spec"]["template"]["metadata"][
        "annotations"]["kubetune.dev/adapter-rules"] == restarted  # nothing changed: no restart

    # switching to KEDA: its ScaledObject scales now, and the HPA of the earlier mode is removed (two would fight)
    name = "llama32-3b-samsum-serve"
    code, out, err = cli("deploy", spec, "--set", "serve.autoscaling.monitoring=keda")
    assert code == 0, err
    assert k8s.get("scaledobjects", "ml", name) is not None and k8s.get("horizontalpodautoscalers", "ml", name) is None
    assert f"horizontalpodautoscaler/{name} deleted" in out and k8s.get("servicemonitors", "ml", name) is not None
    # a team's own object of that name is not kubetune's to remove
    k8s.put("horizontalpodautoscalers", "ml", {"metadata": {"name": name, "labels": {"team": "theirs"}}})
    code, out, err = cli("deploy", spec, "--set", "serve.autoscaling=null", "--set", "serve.replicas=1")
    assert code == 0, err
    assert k8s.get("scaledobjects", "ml", name) is None and k8s.get("servicemonitors", "ml", name) is None
    assert k8s.get("horizontalpodautoscalers", "ml", name) is not None


def test_doctor_checks_the_metrics_path_of_the_autoscaler(k8s: FakeKubernetes, cli) -> None:
    spec = str(ROOT / "examples" / "b-summarise-qlora-serve.yaml")
    keda = ("--set", "serve.autoscaling.monitoring=keda")
    code, out, _ = cli("doctor", spec, *keda)
    assert "✗ CRD scaledobjects.keda.sh is not installed" in out and "helm install keda kedacore/keda" in out
    assert "✗ CRD servicemonitors.monitoring.coreos.com is not installed" in out
    assert "✗ the metrics API v1beta1.external.metrics.k8s.io is not registered (no APIService)" in out
    for crd in ("scaledobjects.keda.sh", "servicemonitors.monitoring.coreos.com"):
        k8s.put("customresourcedefinitions", "", {"metadata": {"name": crd}})
    k8s.put("apiservices", "", {"metadata": {"name": "v1beta1.external.metrics.k8s.io"}, "status": {"conditions": [
        {"type": "Available", "status": "False", "reason": "FailedDiscoveryCheck"}]}})
    code, out, _ = cli("doctor", spec, *keda)
    assert "✓ CRD scaledobjects.keda.sh is installed" in out
    assert "is registered but not Available (FailedDiscoveryCheck)" in out
    k8s.objects[("apiservices", "", "v1beta1.external.metrics.k8s.io")]["status"]["conditions"][0]["status"] = "True"
    code, out, _ = cli("doctor", spec, *keda)
    assert "✓ the metrics API v1beta1.external.metrics.k8s.io is served and Available" in out
    assert "– Prometheus at http://prometheus-operated.monitoring.svc:9090" in out
    code, out, _ = cli("doctor", spec, "--set", "serve.autoscaling.monitoring=none")
    assert "– serving autoscaler: serve.autoscaling.monitoring is none" in out
    assert "set serve.autoscaling.monitoring: keda (this cluster has it)" in out
    code, out, _ = cli("doctor", spec, "--set", "serve.autoscaling.monitoring=servicemonitor")
    assert "✗ the metrics API v1beta1.custom.metrics.k8s.io is not registered" in out
    assert "✗ ConfigMap monitoring/prometheus-adapter (serve.autoscaling.adapter_config) does not exist" in out


class Kubelet:
    """Runs the probe pod as a node would: its command (python → this interpreter) with its env, the
    scratch mount at a local folder; then publishes the pod's phase and log. `pull_fails`: the node
    cannot pull the image, as the kubelet reports it."""

    def __init__(self, fake: FakeKubernetes, ns: str, name: str, scratch: Path, pull_fails: bool = False,
                 image_env: dict[str, str] | None = None) -> None:
        import threading

        self.fake, self.key, self.scratch, self.pull_fails = fake, ("pods", ns, name), scratch, pull_fails
        self.image_env = image_env or {}  # what the image itself sets (PYTHONPATH: the packages it holds)
        self.ran: list[list[str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import os
        import subprocess
        import sys
        import time

        for _ in range(600):
            pod = self.fake.objects.get(self.key)
            if pod is not None:
                break
            time.sleep(0.05)
        else:
            return
        if self.pull_fails:
            pod["status"] = {"phase": "Pending", "containerStatuses": [{"name": "probe", "state": {"waiting": {
                "reason": "ErrImagePull", "message": 'failed to pull "ghcr.io/x/y:1": 403 Forbidden'}}}]}
            return
        container = pod["spec"]["containers"][0]
        command = [sys.executable if c in ("python", "python3") else c for c in kubetune_argv(container)]
        env = {**os.environ, **self.image_env, **{e["name"]: e["value"].replace("/scratch", str(self.scratch))
                                                  for e in container["env"] if "value" in e}}
        self.ran.append(command)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                              cwd=self.scratch)
        self.fake.logs[self.key[2]] = done.stdout + done.stderr
        pod["status"] = {"phase": "Succeeded" if done.returncode == 0 else "Failed"}


def test_doctor_probes_the_image_and_the_pods_identity_from_inside(k8s: FakeKubernetes, cli, s3, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.s3_runs import BUCKET

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    sets = [a for item in (f"output=s3://{BUCKET}/runs/probe", f"data.train=s3://{BUCKET}/nothing-here.jsonl",
                           "kubernetes.namespace=ml", "kubernetes.service_account=trainer",
                           "resources.accelerator=nvidia", "resources.devices_per_node=8")
            for a in ("--set", item)]
    (tmp_path / "scratch").mkdir()
    (tmp_path / "vllm-image" / "vllm").mkdir(parents=True)
    (tmp_path / "vllm-image" / "vllm" / "__init__.py").write_text("")
    kubelet = Kubelet(k8s, "ml", "quickstart-doctor", tmp_path / "scratch", pull_fails=True)
    Kubelet(k8s, "ml", "quickstart-doctor-serve", tmp_path / "scratch")  # an image without vLLM
    code, out, err = cli("doctor", SPEC, *sets, "--probe", "--probe-poll", "0.1")
    assert code == 2, out + err
    assert "✗ the cluster cannot pull the image pytorch/pytorch:" in out and "ErrImagePull: failed to pull" in out
    assert "✗ the serving image vllm/vllm-openai:v0.11.0 was pulled but has no vLLM" in out, out
    assert [p for m, p in k8s.requests if m == "DELETE" and "/configmaps/quickstart-doctor-kubetune-" in p]  # cleaned
    assert k8s.get("pods", "ml", "quickstart-doctor") is None  # deleted whatever happened

    kubelet = Kubelet(k8s, "ml", "quickstart-doctor", tmp_path / "scratch")
    serving = Kubelet(k8s, "ml", "quickstart-doctor-serve", tmp_path / "scratch",
                      image_env={"PYTHONPATH": str(tmp_path / "vllm-image")})
    code, out, err = cli("doctor", SPEC, *sets, "--probe", "--probe-poll", "0.1")
    kubelet.thread.join(5)
    assert "✓ the cluster pulled the serving image vllm/vllm-openai:v0.11.0 (vLLM found in it)" in out, out + err
    assert serving.ran == [[sys.executable, "-c", FIND_VLLM]] and k8s.get("pods", "ml", "quickstart-doctor-serve") is None
    Kubelet(k8s, "ml", "quickstart-doctor", tmp_path / "scratch")
    Kubelet(k8s, "ml", "quickstart-doctor-serve", tmp_path / "scratch", pull_fails=True)
    code, out, err = cli("doctor", SPEC, *sets, "--set", "serve.image=registry.internal/vllm:1", "--probe",
                         "--probe-poll", "0.1")
    assert "✗ the cluster cannot pull the image registry.internal/vllm:1" in out and \
        "or set serve.image to an image your registry serves" in out, out
    assert "✓ the cluster pulled and ran the image" in out, out + err
    assert f"✓ in the cluster, as service account trainer: s3://{BUCKET}/runs/probe is writable" in out
    assert f"✗ in the cluster, as service account trainer: input s3://{BUCKET}/nothing-here.jsonl" in out
    assert code == 2 and k8s.get("pods", "ml", "quickstart-doctor") is None
    created = [p for m, p in k8s.requests if m == "POST" and p.startswith("/api/v1/namespaces/ml/pods")]
    assert len(created) == 6  # the run's image and the serving image, three times
    pod_args = kubelet.ran[0][kubelet.ran[0].index("kubetune.storage.probe") + 1:]
    assert pod_args == ["--read", f"s3://{BUCKET}/nothing-here.jsonl", "--write", f"s3://{BUCKET}/runs/probe"]


def test_doctor_opens_the_amd_gpus_devices_as_the_runs_pods_would(k8s: FakeKubernetes, cli, tmp_path: Path) -> None:
    """The AMD device plugin passes /dev/kfd and /dev/dri/renderD* with the node's group ids (video, render:
    they differ by node OS, ROCm/k8s-device-plugin issue #39); a pod on a GPU node, non-root in the run's
    supplementalGroups, opens them and reports the groups that own them. The "node" here is a folder:
    this machine has no AMD GPU, and runs as root, so a device it cannot open is a folder in its place."""
    import kubernetes_validate

    from kubetune.k8s.render.probe import OPEN_DEVICES, device_probe_pod
    from kubetune.spec import load_spec

    spec = load_spec(ROOT / "examples" / "d-full-8gpu.yaml", ["kubernetes.node_selector={pool: mi300}"])
    pod = device_probe_pod(spec)
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    body = pod["spec"]
    assert body["securityContext"]["runAsNonRoot"] and body["securityContext"]["supplementalGroups"] == [44, 109]
    assert body["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "1" and body["nodeSelector"] == {"pool": "mi300"}
    assert body["automountServiceAccountToken"] is False

    dev = tmp_path / "dev"
    (dev / "dri").mkdir(parents=True)
    for device in ("kfd", "dri/renderD128", "dri/renderD136"):
        (dev / device).write_text("")
    (tmp_path / "scratch").mkdir()
    sets = ["--set", "resources.accelerator=amd", "--set", "kubernetes.namespace=ml", "--probe", "--probe-poll", "0.1"]
    name = "quickstart-doctor-devices"
    devices = Kubelet(k8s, "ml", name, tmp_path / "scratch", image_env={"KUBETUNE_DEV_ROOT": str(dev)})
    Kubelet(k8s, "ml", "quickstart-doctor", tmp_path / "scratch")
    Kubelet(k8s, "ml", "quickstart-doctor-serve", tmp_path / "scratch")
    code, out, err = cli("doctor", SPEC, *sets)
    assert devices.ran == [[sys.executable, "-c", OPEN_DEVICES]], out + err
    assert "✓ in the cluster, a non-root pod in groups [44, 109] opened /dev/kfd, /dev/dri/renderD128, " \
           "/dev/dri/renderD136" in out, out + err
    assert k8s.get("pods", "ml", name) is None  # deleted
    (dev / "dri" / "renderD136").unlink()
    (dev / "dri" / "renderD136").mkdir()  # cannot be opened read-write (root opens any file)
    Kubelet(k8s, "ml", name, tmp_path / "scratch", image_env={"KUBETUNE_DEV_ROOT": str(dev)})
    Kubelet(k8s, "ml", "quickstart-doctor", tmp_path / "scratch")
    Kubelet(k8s, "ml", "quickstart-doctor-serve", tmp_path / "scratch")
    code, out, err = cli("doctor", SPEC, *sets)
    gid = (dev / "kfd").stat().st_gid
    assert code == 2 and "✗ in the cluster, a non-root pod in groups [44, 109] cannot open /dev/dri/renderD136 " \
                         f"(group {gid})" in out, out + err
    assert f"fix: set kubernetes.device_groups: [{gid}]" in out
    nvidia = [*sets, "--set", "resources.accelerator=nvidia"]  # the last --set wins
    Kubelet(k8s, "ml", "quickstart-doctor", tmp_path / "scratch")
    Kubelet(k8s, "ml", "quickstart-doctor-serve", tmp_path / "scratch")
    before = len(k8s.requests)
    code, out, err = cli("doctor", SPEC, *nvidia)
    assert "✓ the cluster pulled and ran the image" in out, out + err  # the other probes ran
    assert not [p for _, p in k8s.requests[before:] if p.endswith(f"/pods/{name}")]  # an AMD-only probe


def test_the_probe_pod_asks_for_no_accelerator_and_runs_as_the_runs_identity() -> None:
    import kubernetes_validate

    from kubetune.k8s.render.probe import probe_pod
    from kubetune.spec import load_spec

    spec = load_spec(ROOT / "examples" / "a-mistral-lora-gcs.yaml", ["kubernetes.service_account=trainer"])
    pod = probe_pod(spec)
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    body = pod["spec"]
    assert body["serviceAccountName"] == "trainer" and body["activeDeadlineSeconds"] == 300 + 600  # + the install
    assert "nodeSelector" not in body and "tolerations" not in body
    limits = body["containers"][0]["resources"]["limits"]
    assert set(limits) == {"cpu", "memory", "ephemeral-storage"}
    assert spec.kubernetes.image is None and body["containers"][0]["image"] == "pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime"
    assert any("csi" in v for v in body["volumes"]) and pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}


def test_doctor_checks_the_gcs_fuse_csi_driver(k8s: FakeKubernetes) -> None:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.doctor import _gcs_fuse

    missing = _gcs_fuse(Cluster("ml"))
    assert not missing.ok and "GcsFuseCsiDriver=ENABLED" in missing.fix
    k8s.put("csidrivers", "", {"metadata": {"name": "gcsfuse.csi.storage.gke.io"}})
    assert _gcs_fuse(Cluster("ml")).ok
    k8s.forbidden.add(("GET", "csidrivers"))
    assert _gcs_fuse(Cluster("ml")).skipped
