"""Working with a cluster through the Kubernetes API (kubeconfig or in-cluster config): apply the
rendered objects idempotently by run name, read a run's state, stream its log, delete it.

Every API failure a user can cause becomes a UsageError that says which verb on which resource in
which namespace failed and what to do (no cluster, forbidden, missing namespace)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from kubetune.errors import KubetuneError, TransientError, UsageError

JOB_LABEL = "batch.kubernetes.io/job-name"
PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")  # a pod's waiting reasons

APPLY = "application/apply-patch+yaml"
FIELD_MANAGER = "kubetune"
# kind → (plural, namespaced): every kind kubetune writes
_PLURALS = {
    "Namespace": ("namespaces", False), "ServiceAccount": ("serviceaccounts", True), "Secret": ("secrets", True),
    "ConfigMap": ("configmaps", True), "Service": ("services", True), "Job": ("jobs", True),
    "Deployment": ("deployments", True), "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True), "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True), "ServiceMonitor": ("servicemonitors", True),
    "PodMonitoring": ("podmonitorings", True), "LocalQueue": ("localqueues", True),
    "ScaledObject": ("scaledobjects", True),
}


def pull_failure(status: dict[str, Any]) -> dict[str, str] | None:
    """A pod status's waiting state of a container whose image the node cannot pull ({reason, message})."""
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in PULL_FAILURES:
            return waiting
    return None


def unschedulable(status: dict[str, Any]) -> str | None:
    """The scheduler's message when a pod status says it cannot be placed on any node."""
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message", ""))
    return None


def resource_name(obj: dict[str, Any]) -> str:
    """plural.group, as the API names a resource in messages (jobs.batch, configmaps)."""
    group = obj["apiVersion"].rpartition("/")[0]
    return _PLURALS[obj["kind"]][0] + (f".{group}" if group else "")


class Cluster:
    def __init__(self, namespace: str, api_client: Any = None) -> None:
        import kubernetes

        self.namespace = namespace
        self._k = kubernetes
        if api_client is None:
            try:
                # KUBECONFIG read now: the client's own default is captured when it is first imported
                kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            except Exception:  # noqa: BLE001 - no kubeconfig: try the pod's service account
                try:
                    kubernetes.config.load_incluster_config()
                except Exception:  # noqa: BLE001
                    raise UsageError("no Kubernetes cluster configured (no kubeconfig, not in a pod)",
                                     "set KUBECONFIG or run `kubectl config use-context ...`; "
                                     "`kubetune render` works without a cluster") from None
            api_client = kubernetes.client.ApiClient()
        self.api = api_client

    def _api(self, cls: str) -> Any:
        return getattr(self._k.client, cls)(self.api)

    def _call(self, verb: str, resource: str, name: str | None, fn: Callable[[], Any],
              tolerate: tuple[int, ...] = ()) -> Any:
        """fn() through the API; an HTTP status in `tolerate` returns it (an int) instead of raising."""
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except self._k.client.ApiException as exc:
            if exc.status in tolerate:
                return int(exc.status)
            raise self._explain(exc, verb, resource, name) from None
        except (HTTPError, OSError) as exc:  # no answer: refused, DNS, timeout, TLS reset
            host = self.api.configuration.host
            raise TransientError(f"cannot reach the Kubernetes API at {host} ({type(exc).__name__})",
                                 "check the cluster, VPN and kubeconfig context; the same command retried later "
                                 "continues") from None

    def _explain(self, exc: Any, verb: str, resource: str, name: str | None) -> KubetuneError:
        where = f"{resource}{'/' + name if name else ''} in namespace {self.namespace}"
        try:
            body = json.loads(exc.body or "{}")
        except ValueError:
            body = {}
        message = body.get("message") or exc.reason
        if exc.status == 403:
            return UsageError(f"forbidden: cannot {verb} {resource} in namespace {self.namespace} ({message})",
                              "ask an admin for the Role in deploy/rbac.yaml, or use another namespace")
        if exc.status == 404 and body.get("details", {}).get("kind") == "namespaces":
            return UsageError(f"namespace {self.namespace} does not exist",
                              f"create it (kubectl create namespace {self.namespace}) or set kubernetes.namespace")
        if exc.status == 404 and not body.get("details", {}).get("name"):  # the resource type itself is unknown
            return UsageError(f"the cluster has no {resource} API ({message})",
                              "install what provides it (Kueue for localqueues, prometheus-operator for "
                              "servicemonitors, GKE Managed Prometheus for podmonitorings), or turn it off in the spec")
        if exc.status == 404:
            return UsageError(f"{where}: not found", "check the run name (kubetune list)")
        if exc.status == 401:
            return UsageError(f"the cluster rejected the credentials ({message})", "refresh your kubeconfig login")
        if exc.status in (0, 429) or exc.status >= 500:  # 0: the client got no HTTP answer at all
            return TransientError(f"Kubernetes API: {verb} {where} failed: HTTP {exc.status} {message}",
                                  "the API server is busy or failing; the same command retried later continues")
        causes = body.get("details", {}).get("causes") or []
        if exc.status == 409 and body.get("reason") == "Conflict" and causes:
            fields = ", ".join(f"{c.get('field')} ({c.get('message')})" for c in causes)
            return UsageError(f"apply {where}: fields owned by another manager: {fields}",
                              "another tool (kubectl apply, Helm, a controller) manages these fields: remove them "
                              "there, or delete the object and let kubetune create it")
        if exc.status == 422 and causes:
            fields = ", ".join(f"{c.get('field')}: {c.get('message')}" for c in causes)
            return UsageError(f"Kubernetes API: {verb} {where} was refused: {fields}",
                              "the field cannot be changed on an existing object; delete it and apply again")
        if exc.status in (400, 409, 410, 422):
            return UsageError(f"Kubernetes API: {verb} {where} was refused: HTTP {exc.status} {message}",
                              "the object conflicts with what is on the cluster; check the spec's kubernetes section")
        return KubetuneError(f"Kubernetes API: {verb} {where} failed: HTTP {exc.status} {message}")

    def _path(self, obj: dict[str, Any], named: bool = True) -> str:
        version = obj["apiVersion"]
        plural, namespaced = _PLURALS[obj["kind"]]
        where = f"/namespaces/{obj['metadata'].get('namespace') or self.namespace}" if namespaced else ""
        name = f"/{obj['metadata']['name']}" if named else ""
        return f"/{'apis' if '/' in version else 'api'}/{version}{where}/{plural}{name}"

    def _request(self, method: str, path: str, body: Any = None, query: tuple[tuple[str, str], ...] = (),
                 content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        """Any API path with the client's own auth, TLS and error types (kinds without a typed API too)."""
        method, url, headers, payload, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=list(query), body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": "application/json"})
        response = self.api.call_api(method, url, header_params=headers, body=payload)
        response.read()
        result = self.api.response_deserialize(response, {"2XX": "object"})  # raises ApiException on 4xx/5xx
        return int(result.status_code), result.data or {}

    def request(self, method: str, path: str, body: Any = None, tolerate: tuple[int, ...] = (),
                content_type: str = "application/json") -> Any:
        """(status, body) of any API path, errors explained; a status in `tolerate` is returned as an int."""
        return self._call(method.lower(), path, None, lambda: self._request(method, path, body, (), content_type),
                          tolerate=tolerate)

    def stream(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: Any = None, timeout: float = 600.0) -> Any:
        """A raw response (urllib3, not read) of any API path — a pod proxy's bytes, a body streamed from a
        file — with the client's auth and TLS. The caller reads it and checks its status."""
        from urllib3.exceptions import HTTPError

        _, url, auth, _, _ = self.api.param_serialize(method=method, resource_path=path, query_params=list(query.items()),
                                                      auth_settings=["BearerToken"], header_params={})
        try:
            return self.api.rest_client.pool_manager.request(method, url, headers={**auth, **headers}, body=body,
                                                             preload_content=False, timeout=timeout, retries=False)
        except (HTTPError, OSError) as exc:
            host = self.api.configuration.host
            raise TransientError(f"cannot reach the Kubernetes API at {host} ({type(exc).__name__})",
                                 "check the cluster, VPN and kubeconfig context; the same command retried later "
                                 "continues") from None

    def server_side_apply(self, obj: dict[str, Any], tolerate: tuple[int, ...] = ()) -> tuple[int, dict[str, Any]] | int:
        """Server-side apply as field manager `kubetune`: idempotent, list semantics of the API server,
        fields kubetune applied before and no longer renders are removed, fields another manager owns
        are a conflict that names them (not overwritten)."""
        name = obj["metadata"]["name"]
        query = (("fieldManager", FIELD_MANAGER), ("force", "false"))
        return self._call("apply", resource_name(obj), name,
                          lambda: self._request("PATCH", self._path(obj), obj, query, APPLY), tolerate=tolerate)

    # -- objects --
    def apply(self, objects: list[dict[str, Any]]) -> list[str]:
        """Server-side apply each object. A Job that failed is replaced (its rerun resumes), a Job that
        is running or finished is left alone; a Secret (setup's placeholders) is created only if absent,
        never overwritten."""
        results = []
        for obj in objects:
            kind, name = obj["kind"], obj["metadata"]["name"]
            if kind == "Secret":
                results.append(self._create_if_absent(obj))
            elif kind == "Job":
                results.append(self._apply_job(obj))
            else:
                code, _ = self.server_side_apply(obj)  # type: ignore[misc]
                results.append(f"{kind.lower()}/{name} {'created' if code == 201 else 'configured'}")
        return results

    def _create_if_absent(self, obj: dict[str, Any]) -> str:
        name, resource = obj["metadata"]["name"], resource_name(obj)
        found = self._call("get", resource, name, lambda: self._request("GET", self._path(obj)), tolerate=(404,))
        if found != 404:
            return f"{obj['kind'].lower()}/{name} exists (left as it is: values are never overwritten)"
        self._call("create", resource, name, lambda: self._request("POST", self._path(obj, named=False), obj))
        return f"{obj['kind'].lower()}/{name} created (placeholders: fill in the values)"

    def _apply_job(self, obj: dict[str, Any]) -> str:
        name = obj["metadata"]["name"]
        api = self._api("BatchV1Api")
        current = self._call("get", "jobs.batch", name, lambda: api.read_namespaced_job(name, self.namespace),
                             tolerate=(404,))
        if current == 404:
            self.server_side_apply(obj)
            return f"job/{name} created"
        phase = job_phase(current)
        if phase == "Failed":
            self._call("delete", "jobs.batch", name, lambda: api.delete_namespaced_job(
                name, self.namespace, propagation_policy="Background"))
            self.server_side_apply(obj)
            return f"job/{name} recreated (it failed before; the new pods resume from the latest checkpoint)"
        if self.server_side_apply(obj, tolerate=(422,)) == 422:
            raise UsageError(f"job/{name} is {phase.lower()} in namespace {self.namespace} with a different pod "
                             "template: spec.template cannot change while the Job exists",
                             f"let it finish, or `kubetune cancel {name}` and submit again (the new Job resumes "
                             "from the latest checkpoint)")
        return f"job/{name} unchanged ({phase.lower()})"

    def job_scratch_size(self, name: str) -> str | None:
        """The scratch volume's size in the pod template of the Job `name`, if it exists."""
        api = self._api("BatchV1Api")
        current = self._call("get", "jobs.batch", name, lambda: api.read_namespaced_job(name, self.namespace),
                             tolerate=(404,))
        if current == 404:
            return None
        for volume in current.spec.template.spec.volumes or []:
            claim = volume.ephemeral.volume_claim_template if volume.name == "scratch" and volume.ephemeral else None
            if claim is not None:
                return (claim.spec.resources.requests or {}).get("storage")
        return None

    def job(self, name: str) -> Any:
        api = self._api("BatchV1Api")
        return self._call("get", "jobs.batch", name, lambda: api.read_namespaced_job(name, self.namespace))

    def jobs(self) -> list[Any]:
        api = self._api("BatchV1Api")
        return self._call("list", "jobs.batch", None, lambda: api.list_namespaced_job(
            self.namespace, label_selector="app.kubernetes.io/managed-by=kubetune")).items

    def pods(self, name: str) -> list[Any]:
        api = self._api("CoreV1Api")
        pods = self._call("list", "pods", None, lambda: api.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_LABEL}={name}")).items
        return sorted(pods, key=lambda p: (_index(p), str(p.metadata.creation_timestamp or "")))

    def spec_text(self, name: str) -> str | None:
        api = self._api("CoreV1Api")
        cm = self._call("get", "configmaps", f"{name}-spec", lambda: api.read_namespaced_config_map(
            f"{name}-spec", self.namespace), tolerate=(403, 404))  # progress is optional: no spec, no events
        return None if isinstance(cm, int) else (cm.data or {}).get("spec.yaml")

    def log(self, pod: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        api = self._api("CoreV1Api")
        resp = self._call("get", "pods/log", pod, lambda: api.read_namespaced_pod_log(
            pod, self.namespace, follow=follow, tail_lines=tail, _preload_content=False))
        for chunk in resp.stream(4096):
            yield chunk.decode(errors="replace")

    def wait_for_pod(self, name: str, timeout: int = 300) -> Any:
        """Watch the run's pods until one has started (or the watch ends)."""
        api = self._api("CoreV1Api")
        watch = self._k.watch.Watch()
        stream = self._call("watch", "pods", None, lambda: watch.stream(
            api.list_namespaced_pod, self.namespace, label_selector=f"{JOB_LABEL}={name}", timeout_seconds=timeout))
        for event in stream:
            pod = event["object"]
            if pod.status and pod.status.phase in ("Running", "Succeeded", "Failed"):
                watch.stop()
                return pod
        return None

    def follow_log(self, name: str, follow: bool, waiting: Callable[[str], None]) -> Iterator[str]:
        """The leader pod's log; with `follow`, first wait for a pod of the run to start."""
        pods = self.pods(name)
        if follow and not any(p.status and p.status.phase != "Pending" for p in pods):
            waiting(f"waiting for a pod of {name} to start ...")
            pod = self.wait_for_pod(name)
            pods = [pod] if pod is not None else pods
        if not pods:
            raise KubetuneError(f"run {name} has no pods yet", f"kubetune status {name} -n {self.namespace}")
        yield from self.log(pods[0].metadata.name, follow=follow)

    def delete_run(self, name: str) -> list[str]:
        done = []
        batch, core = self._api("BatchV1Api"), self._api("CoreV1Api")
        self._call("delete", "jobs.batch", name, lambda: batch.delete_namespaced_job(
            name, self.namespace, propagation_policy="Background"))  # the Job's pods go with it
        done.append(f"job/{name} deleted")
        # the run's spec, its Service (several nodes) and the wheels its pods installed (k8s/dist.py)
        selector = f"kubetune.dev/owner={name},app.kubernetes.io/component=kubetune"
        found = self._call("list", "configmaps", name, lambda: core.list_namespaced_config_map(
            self.namespace, label_selector=selector), tolerate=(403, 404))
        wheels = [] if isinstance(found, int) else [cm.metadata.name for cm in found.items or []]
        for kind, fn, obj in (("configmap", core.delete_namespaced_config_map, f"{name}-spec"),
                              *(("configmap", core.delete_namespaced_config_map, w) for w in wheels),
                              ("service", core.delete_namespaced_service, name)):
            if self._call("delete", f"{kind}s", obj, lambda f=fn, o=obj: f(o, self.namespace), tolerate=(404,)) != 404:
                done.append(f"{kind}/{obj} deleted")
        return done


def _index(pod: Any) -> int:
    labels = pod.metadata.labels or {}
    return int(labels.get("batch.kubernetes.io/job-completion-index", 0))


def job_phase(job: Any) -> str:
    conditions = {c.type: c.status for c in (job.status.conditions or [])} if job.status else {}
    if conditions.get("Complete") == "True":
        return "Succeeded"
    if conditions.get("Failed") == "True":
        return "Failed"
    if job.spec and job.spec.suspend:
        return "Queued"
    if job.status and (job.status.active or 0) > 0:
        return "Running"
    return "Pending"


@dataclass
class PodState:
    name: str
    phase: str
    detail: str = ""


@dataclass
class RunStatus:
    name: str
    phase: str
    pods: list[PodState] = field(default_factory=list)
    reason: str = ""
    progress: dict[str, Any] = field(default_factory=dict)


def pod_state(pod: Any) -> PodState:
    phase = pod.status.phase if pod.status else "Pending"
    detail = ""
    for cs in (pod.status.container_statuses or []) if pod.status else []:
        if cs.state and cs.state.waiting and cs.state.waiting.reason:
            w = cs.state.waiting
            detail = f"{w.reason}: {w.message or ''}".strip(": ")
            if w.reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                detail = f"image pull failed ({w.reason}): {w.message or cs.image}"
        elif cs.state and cs.state.terminated:
            t = cs.state.terminated
            detail = f"exited {t.exit_code} ({t.reason or ''})".replace(" ()", "")
    if phase == "Pending" and not detail:
        for c in (pod.status.conditions or []) if pod.status else []:
            if c.type == "PodScheduled" and c.status == "False":
                detail = f"unschedulable: {c.message or c.reason}"
    return PodState(pod.metadata.name, phase, detail)
