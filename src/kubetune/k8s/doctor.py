"""`kubetune doctor [SPEC]`: what must hold before a first submit, checked against the cluster and
the storage, as a checklist with one fix per failed line.

The API answers; the namespace exists; every verb kubetune uses is allowed to the caller
(SelfSubjectAccessReview, the API's own answer); Kueue's CRD and the LocalQueue exist when the spec
queues; some node offers the accelerator the spec asks for; the spec's storage can be read (inputs)
and written (the output), with the caller's credentials; with --probe, the same from inside the cluster
under the pods' identity, and the serving image pulled by its nodes. A check that cannot be made (nodes are
often not readable to users) says so and does not fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kubetune.errors import KubetuneError
from kubetune.k8s.client import Cluster, pull_failure, unschedulable
from kubetune.k8s.render.common import ACCELERATOR_RESOURCE, GCS_DRIVER, gcs_buckets
from kubetune.k8s.dist import with_dist
from kubetune.k8s.render.probe import PULL_SECONDS, device_probe_pod, probe_pod, probe_seconds, serving_probe_pod
from kubetune.k8s.render.setup import RULES
from kubetune.spec.models import RunSpec


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str = ""
    skipped: bool = False       # could not be checked from here: not a failure


def doctor(cluster: Cluster, spec: RunSpec | None, probe: bool = False, probe_timeout: float | None = None,
           poll: float = 2.0) -> list[Check]:
    """`probe`: also run the probe pod (render/probe.py) and report what it found from inside."""
    checks = [_api(cluster)]
    if not checks[0].ok:
        return checks  # nothing else can answer
    checks.append(_namespace(cluster))
    checks += _verbs(cluster, spec)
    if spec is not None:
        if spec.kubernetes.queue:
            checks += _kueue(cluster, spec.kubernetes.queue)
        if spec.resources.accelerator in ACCELERATOR_RESOURCE:
            checks.append(_accelerators(cluster, spec))
        checks += _storage(spec)
        if spec.serve.autoscaling is not None:
            checks += _metrics_path(cluster, spec)
        if gcs_buckets(spec):
            checks.append(_gcs_fuse(cluster))
        if probe:
            checks += probe_from_inside(cluster, spec, probe_timeout or probe_seconds(spec), poll)
            checks += probe_serving_image(cluster, spec, probe_timeout or PULL_SECONDS, poll)
            if spec.resources.accelerator == "amd":
                checks += probe_devices(cluster, spec, probe_timeout or PULL_SECONDS, poll)
    return checks


def _gcs_fuse(cluster: Cluster) -> Check:
    found = _exists(cluster, f"/apis/storage.k8s.io/v1/csidrivers/{GCS_DRIVER}")
    if found is None:
        return Check(True, f"CSIDriver {GCS_DRIVER}: not allowed to read CSI drivers, not checked", skipped=True)
    return Check(True, f"the GCS FUSE CSI driver ({GCS_DRIVER}) is installed") if found else Check(
        False, f"the GCS FUSE CSI driver ({GCS_DRIVER}) is not installed: the pods mount gs:// buckets with it",
        "gcloud container clusters update CLUSTER --update-addons GcsFuseCsiDriver=ENABLED (on by default on "
        "Autopilot)")


def probe_from_inside(cluster: Cluster, spec: RunSpec, timeout: float, poll: float) -> list[Check]:
    """Create the probe pod, follow it until it ends (or cannot start), read its findings from its
    log, and delete it whatever happened."""
    pod = probe_pod(spec)
    name, image = pod["metadata"]["name"], pod["spec"]["containers"][0]["image"]
    wheels = [o for o in with_dist(spec, [pod]) if o is not pod]  # the wheel it installs at start, if it does
    cluster.apply(wheels)
    path = f"/api/v1/namespaces/{cluster.namespace}/pods/{name}"
    who = f"as service account {spec.kubernetes.service_account or 'default'}"
    try:
        failed, status = _run_pod(cluster, pod, timeout, poll, "set kubernetes.image to an image your registry "
                                  "serves (deploy/Dockerfile; docs/kubernetes.md)")
        if failed:
            return failed
        try:
            text = "".join(cluster.log(name))
        except KubetuneError as exc:  # ended before its container started (the pod's deadline)
            text = f"(no log: {exc.message})"
        results = [row for row in map(_json_line, text.splitlines())
                   if isinstance(row, dict) and {"uri", "access", "ok"} <= row.keys()]
        out = [Check(True, f"the cluster pulled and ran the image {image}")]
        if not results:
            return out + [Check(False, f"the probe pod {name} ended {status.get('phase')} without a finding "
                                       f"(log: {text.strip()[-300:] or 'empty'})",
                                "check that the image has kubetune (python -m kubetune.storage.probe)")]
        for r in results:
            verb = "readable" if r["access"] == "read" else "writable"
            out.append(Check(True, f"in the cluster, {who}: {r['uri']} is {verb}") if r["ok"] else
                       Check(False, f"in the cluster, {who}: {r.get('message') or r['uri'] + ' is not ' + verb}",
                             str(r.get("hint") or "grant the pods' identity access (kubernetes.service_account, "
                                                      "kubernetes.cloud_identity) or reference the credentials "
                                                      "(kubernetes.secrets.storage)")))
        return out
    finally:
        cluster.request("DELETE", path, tolerate=(404,))
        for cm in wheels:
            cluster.request("DELETE", f"/api/v1/namespaces/{cluster.namespace}/configmaps/{cm['metadata']['name']}",
                            tolerate=(404,))


def _run_pod(cluster: Cluster, pod: dict[str, Any], timeout: float, poll: float,
             other_image: str) -> tuple[list[Check], dict[str, Any]]:
    """Create a probe pod (replacing one an interrupted doctor left) and follow it until it ends:
    ([], its status), or ([what stopped it], status) when it cannot start, cannot pull its image or does
    not end in time. The caller deletes it."""
    import time

    name, image = pod["metadata"]["name"], pod["spec"]["containers"][0]["image"]
    path = f"/api/v1/namespaces/{cluster.namespace}/pods/{name}"
    deadline = time.monotonic() + timeout
    # a probe left by an interrupted doctor: deleted, and gone (a pod takes a while) before ours
    while cluster.request("DELETE", path, tolerate=(404,)) != 404 and time.monotonic() < deadline:
        time.sleep(poll)
    cluster.request("POST", f"/api/v1/namespaces/{cluster.namespace}/pods", pod)
    while True:
        found = cluster.request("GET", path, tolerate=(404,))
        status = found[1].get("status") or {} if not isinstance(found, int) else {}
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("CreateContainerConfigError", "CreateContainerError"):
                return [Check(False, f"the probe pod cannot start: {waiting['reason']}: "
                                     f"{waiting.get('message', '')}",
                              "create the Secret or key it names (kubetune setup SPEC makes placeholders)")], status
        pulling = pull_failure(status)
        if pulling:
            return [Check(False, f"the cluster cannot pull the image {image} ({pulling['reason']}: "
                                 f"{pulling.get('message', '')})".replace(": )", ")"),
                          f"let the nodes reach the image's registry (or mirror it), or {other_image}")], status
        if status.get("phase") in ("Succeeded", "Failed"):
            return [], status
        if time.monotonic() > deadline:
            placing = unschedulable(status)
            why = f" (unschedulable: {placing})" if placing is not None else ""
            return [Check(False, f"the probe pod {name} did not finish in {timeout:.0f} s{why}",
                          f"kubectl -n {cluster.namespace} describe pod {name}")], status
        time.sleep(poll)


def probe_devices(cluster: Cluster, spec: RunSpec, timeout: float, poll: float) -> list[Check]:
    """AMD: whether the run's non-root pods can open their GPU's devices (/dev/kfd, /dev/dri/renderD*),
    which belong to the node's video and render groups — ids that differ by node OS."""
    import json

    pod = device_probe_pod(spec)
    name = pod["metadata"]["name"]
    groups = pod["spec"]["securityContext"].get("supplementalGroups", [])
    try:
        failed, status = _run_pod(cluster, pod, timeout, poll, "set kubernetes.image to an image your registry serves")
        if failed:
            return failed
        try:
            text = "".join(cluster.log(name))
        except KubetuneError as exc:
            text = f"(no log: {exc.message})"
        rows = [r for r in (_json_line(line) for line in text.splitlines()) if isinstance(r, dict)]
        devices = [r for r in rows if "device" in r]
        if not devices:
            return [Check(False, f"the device probe pod {name} ended {status.get('phase')} without a report "
                                 f"(log: {text.strip()[-200:] or 'empty'})",
                          "the run's image must have python3 (kubernetes.image)")]
        if any(r["device"] == "/dev/kfd" and "gid" not in r for r in devices):
            return [Check(False, "in the cluster, a pod given an amd.com/gpu has no /dev/kfd",
                          "install the AMD GPU device plugin (or AMD's GPU operator) on the GPU nodes")]
        denied = [r for r in devices if not r.get("ok")]
        if not denied:
            return [Check(True, f"in the cluster, a non-root pod in groups {groups} opened "
                                f"{', '.join(r['device'] for r in devices)}")]
        gids = sorted({int(r["gid"]) for r in devices if isinstance(r.get("gid"), int)})
        shown = "; ".join(f"{r['device']} (group {r.get('gid', '?')}): {r.get('error', 'denied')}" for r in denied)
        return [Check(False, f"in the cluster, a non-root pod in groups {groups} cannot open {shown}",
                      f"set kubernetes.device_groups: {json.dumps(gids)} (the groups that own the devices on "
                      "these nodes)")]
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{cluster.namespace}/pods/{name}", tolerate=(404,))


def _json_line(line: str) -> Any:
    import json

    try:
        return json.loads(line)
    except ValueError:
        return None


def probe_serving_image(cluster: Cluster, spec: RunSpec, timeout: float, poll: float) -> list[Check]:
    """The serving image, pulled by the cluster's nodes and holding vLLM (a pod that only looks for it)."""
    pod = serving_probe_pod(spec)
    name, image = pod["metadata"]["name"], pod["spec"]["containers"][0]["image"]
    try:
        failed, status = _run_pod(cluster, pod, timeout, poll, "set serve.image to an image your registry serves")
        if failed:
            return failed
        if status.get("phase") != "Succeeded":
            return [Check(False, f"the serving image {image} was pulled but has no vLLM (python3 cannot find it)",
                          "serve.image must be a vLLM OpenAI server image for resources.accelerator")]
        return [Check(True, f"the cluster pulled the serving image {image} (vLLM found in it)")]
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{cluster.namespace}/pods/{name}", tolerate=(404,))


def _api(cluster: Cluster) -> Check:
    host = cluster.api.configuration.host
    try:
        _, version = cluster._request("GET", "/version")  # raw: a failure here is the finding, not an error
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
        return Check(False, f"Kubernetes API at {host} does not answer ({type(exc).__name__})",
                     "check KUBECONFIG / `kubectl config current-context`, the VPN and that the cluster is up")
    return Check(True, f"Kubernetes API at {host} answers ({version.get('gitVersion', '?')})")


def _namespace(cluster: Cluster) -> Check:
    ns = cluster.namespace
    found = cluster.request("GET", f"/api/v1/namespaces/{ns}", tolerate=(403, 404))
    if found == 404:
        return Check(False, f"namespace {ns} does not exist", f"kubetune setup SPEC (or kubectl create namespace {ns})")
    if found == 403:
        return Check(True, f"namespace {ns}: not allowed to read namespaces, not checked", skipped=True)
    return Check(True, f"namespace {ns} exists")


def _verbs(cluster: Cluster, spec: RunSpec | None) -> list[Check]:
    monitoring = spec.serve.autoscaling.monitoring if spec is not None and spec.serve.autoscaling else "none"
    used = {"monitoring.coreos.com": monitoring in ("servicemonitor", "keda"), "keda.sh": monitoring == "keda",
            "monitoring.googleapis.com": monitoring == "podmonitoring",
            "kueue.x-k8s.io": bool(spec and spec.kubernetes.queue)}
    denied: list[str] = []
    for group, resources, verbs in RULES:
        if not used.get(group, True):
            continue  # only what this spec uses
        for resource in resources:
            plural, _, sub = resource.partition("/")
            for verb in verbs:
                review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {
                    "resourceAttributes": {"namespace": cluster.namespace, "verb": verb, "group": group,
                                           "resource": plural, **({"subresource": sub} if sub else {})}}}
                _, answer = cluster.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
                if not (answer.get("status") or {}).get("allowed"):
                    denied.append(f"{verb} {resource}{'.' + group if group else ''}")
    if denied:
        return [Check(False, f"not allowed in namespace {cluster.namespace}: {', '.join(denied)}",
                      "an admin runs `kubetune setup SPEC` with you in kubernetes.operators (or applies "
                      "deploy/rbac.yaml bound to you)")]
    return [Check(True, f"every verb kubetune uses is allowed in namespace {cluster.namespace}")]


def _kueue(cluster: Cluster, queue: str) -> list[Check]:
    crd = cluster.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/localqueues.kueue.x-k8s.io",
                          tolerate=(403, 404))
    out = []
    if crd == 404:
        return [Check(False, "Kueue is not installed (no localqueues.kueue.x-k8s.io CRD)",
                      "install Kueue (kubectl apply --server-side -f .../kueue/releases/.../manifests.yaml), "
                      "or remove kubernetes.queue")]
    out.append(Check(True, "Kueue is installed") if crd != 403 else
               Check(True, "Kueue CRD: not allowed to read CRDs, not checked", skipped=True))
    found = cluster.request("GET", f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{cluster.namespace}/localqueues/{queue}",
                            tolerate=(403, 404))
    if found == 404:
        out.append(Check(False, f"LocalQueue {queue} does not exist in namespace {cluster.namespace}",
                         "kubetune setup SPEC (with kubernetes.cluster_queue set)"))
    else:
        out.append(Check(True, f"LocalQueue {queue} exists"))
    return out


def _accelerators(cluster: Cluster, spec: RunSpec) -> Check:
    resource = ACCELERATOR_RESOURCE[spec.resources.accelerator]
    want = spec.resources.devices_per_node
    selector = spec.kubernetes.node_selector
    status = cluster.request("GET", "/api/v1/nodes", tolerate=(403,))
    if status == 403:
        return Check(True, f"nodes: not allowed to list nodes, {resource} not checked", skipped=True)
    assert not isinstance(status, int)
    _, nodes = status
    offers = []
    for node in nodes.get("items", []):
        labels = node.get("metadata", {}).get("labels") or {}
        if all(labels.get(k) == v for k, v in selector.items()):
            offers.append(int(str((node.get("status", {}).get("allocatable") or {}).get(resource, "0")) or 0))
    best = max(offers, default=0)
    if best >= want:
        return Check(True, f"a node offers {want} {resource} ({sum(1 for o in offers if o >= want)} such nodes)")
    where = f" among nodes labelled {selector}" if selector else ""
    adds = _adds_nodes(cluster) if best == 0 else None  # nodes of a smaller shape would be added as they are
    if adds:  # GKE Autopilot, GPU pools scaled to zero: the node appears when a pod asks for it
        return Check(True, f"no node offers {resource}{where} now; {adds} adds nodes when a pod asks for them: "
                           f"{want} per node not checked", skipped=True)
    return Check(False, f"no node offers {want} {resource}{where} (the most is {best})",
                 "add a node pool with that accelerator, install its device plugin, or lower "
                 "resources.devices_per_node")


CUSTOM_METRICS = "v1beta1.custom.metrics.k8s.io"       # what an HPA on Pods metrics asks
EXTERNAL_METRICS = "v1beta1.external.metrics.k8s.io"   # what KEDA's HPA asks (KEDA's metrics server)
CRDS = {"keda": "scaledobjects.keda.sh", "servicemonitor": "servicemonitors.monitoring.coreos.com",
        "podmonitoring": "podmonitorings.monitoring.googleapis.com"}
INSTALL = {
    "keda": "install KEDA (helm install keda kedacore/keda -n keda --create-namespace)",
    "servicemonitor": "install prometheus-operator (kube-prometheus-stack) and the Prometheus Adapter "
                      "(helm install prometheus-adapter prometheus-community/prometheus-adapter -n monitoring)",
    "podmonitoring": "on GKE: enable Managed Prometheus and deploy the custom-metrics-stackdriver-adapter "
                     "(docs/kubernetes.md, Autoscaling on GKE)",
}


def _metrics_path(cluster: Cluster, spec: RunSpec) -> list[Check]:
    """The autoscaler the spec renders scales only if the cluster serves its metric: the CRDs of what
    scrapes the pods, and the aggregated metrics API its HPA reads (Available, per the API server)."""
    a = spec.serve.autoscaling
    assert a is not None
    crds = {m: _exists(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            for m, crd in CRDS.items()}
    apis = {name: _available(cluster, name) for name in (CUSTOM_METRICS, EXTERNAL_METRICS)}
    if a.monitoring == "none":
        have = [m for m in ("keda", "servicemonitor", "podmonitoring") if crds[m] is True and
                apis[EXTERNAL_METRICS if m == "keda" else CUSTOM_METRICS] is True]
        # Not a failure: a spec that only trains never deploys its autoscaler. Said, with what to set.
        advice = f"set serve.autoscaling.monitoring: {have[0]} (this cluster has it)" if have else \
            f"{INSTALL['keda']}, then set serve.autoscaling.monitoring: keda"
        return [Check(True, "serving autoscaler: serve.autoscaling.monitoring is none, so its metric is served only "
                            f"if something already scrapes the pods and publishes it; {advice}", skipped=True)]
    out = []
    wanted = [(CRDS[a.monitoring], crds[a.monitoring])]
    if a.monitoring == "keda":
        wanted.append((CRDS["servicemonitor"], crds["servicemonitor"]))  # Prometheus scrapes what KEDA queries
    for crd, found in wanted:
        out.append(Check(True, f"CRD {crd}: not allowed to read CRDs, not checked", skipped=True) if found is None else
                   Check(True, f"CRD {crd} is installed") if found else
                   Check(False, f"CRD {crd} is not installed: serve.autoscaling.monitoring {a.monitoring} renders one",
                         INSTALL["servicemonitor" if crd == CRDS["servicemonitor"] else a.monitoring]))
    api = EXTERNAL_METRICS if a.monitoring == "keda" else CUSTOM_METRICS
    state = apis[api]
    out.append(Check(True, f"APIService {api}: not allowed to read APIServices, not checked", skipped=True)
               if state is None else Check(True, f"the metrics API {api} is served and Available") if state is True else
               Check(False, f"the metrics API {api} {state}: the autoscaler cannot read its metric",
                     INSTALL[a.monitoring]))
    if a.monitoring == "servicemonitor":
        found = _exists(cluster, f"/api/v1/namespaces/{a.adapter_namespace}/configmaps/{a.adapter_config}")
        where = f"{a.adapter_namespace}/{a.adapter_config}"
        out.append(Check(True, f"ConfigMap {where}: not allowed to read it, not checked (kubetune setup grants it)",
                         skipped=True) if found is None else
                   Check(True, f"the Prometheus Adapter's rules ConfigMap {where} exists (deploy adds the rule)")
                   if found else Check(False, f"ConfigMap {where} (serve.autoscaling.adapter_config) does not exist",
                                       INSTALL["servicemonitor"] + ", or set adapter_namespace/adapter_config"))
    if a.monitoring == "keda":
        out.append(Check(True, f"Prometheus at {a.prometheus_url}: queried by KEDA from inside the cluster, "
                               "not checked from here", skipped=True))
    return out


# What adds nodes on demand: the cluster autoscaler publishes its status here (GKE's, Autopilot's and the
# upstream one: "kubectl get configmap cluster-autoscaler-status -n kube-system"); Karpenter has its NodePools.
NODE_PROVISIONERS = {"the cluster autoscaler": "/api/v1/namespaces/kube-system/configmaps/cluster-autoscaler-status",
                     "Karpenter": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/nodepools.karpenter.sh"}


def _adds_nodes(cluster: Cluster) -> str | None:
    """Who adds nodes to this cluster when pods ask for them, if anyone visible does."""
    return next((who for who, path in NODE_PROVISIONERS.items() if _exists(cluster, path)), None)


def _exists(cluster: Cluster, path: str) -> bool | None:
    found = cluster.request("GET", path, tolerate=(403, 404))
    return None if found == 403 else found != 404


def _available(cluster: Cluster, name: str) -> bool | str | None:
    """True when the APIService is Available; None when it cannot be read; else what is wrong."""
    found = cluster.request("GET", f"/apis/apiregistration.k8s.io/v1/apiservices/{name}", tolerate=(403, 404))
    if found == 403:
        return None
    if found == 404:
        return "is not registered (no APIService)"
    _, service = found
    for condition in (service.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Available":
            return True if condition.get("status") == "True" else \
                f"is registered but not Available ({condition.get('reason') or 'no reason given'})"
    return "is registered but reports no Available condition"


def _storage(spec: RunSpec) -> list[Check]:
    from kubetune.storage.store import Store
    from kubetune.uris import scheme

    def bucket(uri: str) -> bool:  # the Hub is checked by submit's pre-flight; pvc:// only inside the cluster
        return scheme(uri) in ("s3", "gs")

    out = []
    inputs = [s.path for s in spec.data.sources()] + [spec.model.base]
    for uri in dict.fromkeys(u for u in inputs if bucket(u)):
        out.append(_storage_check(lambda u=uri: Store(u).check_readable("input"), f"{uri} is readable"))
    if bucket(spec.output_uri) or scheme(spec.output_uri) == "pvc":
        out.append(_storage_check(lambda: Store(spec.output_uri).check_writable("output"),
                                  f"{spec.output_uri} is writable") if bucket(spec.output_uri) else
                   Check(True, f"output {spec.output_uri}: a PVC, checked inside the cluster", skipped=True))
    else:
        out.append(Check(False, f"output {spec.output_uri} is a local path: in a pod it is lost with the pod",
                         "set output to s3://, gs:// or pvc://"))
    return out


def _storage_check(check: Callable[[], None], what: str) -> Check:
    try:
        check()
    except KubetuneError as exc:
        return Check(False, exc.message, exc.hint or "check the URI and the credentials")
    return Check(True, what)


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        mark = "–" if c.skipped else "✓" if c.ok else "✗"
        lines.append(f"{mark} {c.what}")
        if not c.ok and c.fix:
            lines.append(f"    fix: {c.fix}")
    return "\n".join(lines)
