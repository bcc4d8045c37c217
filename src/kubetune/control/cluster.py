"""The kubernetes backend: a job is the run's ConfigMap and Job, rendered and applied exactly as
`kubetune submit` does (Kueue queues it; a retried pod resumes from the run's storage). The job's
status follows the Job (suspended or pending: queued; active: running; Complete or Failed), its
events and checkpoints are read from the run's storage, and cancel deletes the Job and its pods.

Validation of the uploaded files runs here, as in the local backend, before anything reaches the
cluster: a bad row is the caller's error, not a failed pod.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kubetune.artifacts.events import ErrorEvent
from kubetune.control.runinfo import trained_tokens
from kubetune.runs.view import RunView
from kubetune.control.worker import LocalWorker
from kubetune.errors import KubetuneError, TransientError
from kubetune.k8s.client import Cluster, job_phase, pod_state
from kubetune.spec.load import load_spec_text

__all__ = ["KubernetesWorker"]


@dataclass
class KubernetesWorker(LocalWorker):
    _clusters: dict[str, Cluster] = field(default_factory=dict)
    _said: dict[str, set[str]] = field(default_factory=dict)   # what the cluster said of each job, said once
    _namespaces: dict[str, str] = field(default_factory=dict)  # job id → its spec's namespace

    backend = "kubernetes"

    def _cluster(self, namespace: str) -> Cluster:
        if namespace not in self._clusters:
            self._clusters[namespace] = Cluster(namespace)
        return self._clusters[namespace]

    def _namespace(self, job: dict[str, Any]) -> str:
        if job["id"] not in self._namespaces:  # the spec never changes; parsing it every tick would
            self._namespaces[job["id"]] = load_spec_text(job["spec"], f"job {job['id']}").kubernetes.namespace
        return self._namespaces[job["id"]]

    def _advance(self) -> None:
        for job in self.records.jobs_in(["queued"], self.backend):
            if job["worker"] is None and self.records.update_job(job["id"], expect=["queued"], unclaimed=True,
                                                               worker=self.worker_id):
                self._submit(job)
        active = [j for j in self.records.jobs_in(["queued", "running"], self.backend) if j["worker"] is not None]
        by_namespace: dict[str, list[dict[str, Any]]] = {}
        for job in active:
            by_namespace.setdefault(self._namespace(job), []).append(job)
        for namespace, jobs in by_namespace.items():
            try:
                found = {j.metadata.name: j for j in self._cluster(namespace).jobs()}
            except TransientError:
                continue  # the API server is away: ask again next tick
            for job in jobs:
                self._sync(job, found.get(job["id"]))

    def _submit(self, job: dict[str, Any]) -> None:
        from kubetune.launch import Launch, launcher_for

        spec = load_spec_text(job["spec"], f"job {job['id']}")
        done: list[str] = []
        try:
            if self._still_deleting(spec.kubernetes.namespace, job["id"]):
                # a resumed job whose paused Job's pods are still checkpointing: submitted once it is gone
                self.records.update_job(job["id"], expect=["queued"], worker=None)
                return
            # the same launcher as `kubetune submit` (the spec is in the job's ConfigMap: no file to name)
            launcher_for(spec, "k8s").launch(Launch(spec, f"job {job['id']}", log=done.append))
        except TransientError as exc:  # unclaimed again: the next tick (or another replica) retries
            self.records.update_job(job["id"], expect=["queued"], worker=None)
            self.records.add_event(job["id"], f"Could not submit to Kubernetes yet: {exc.message}", "warn")
            return
        except KubetuneError as exc:
            self._fail(job, {"code": "submit_failed", "message": exc.message, "param": None}, expect=["queued"])
            return
        self.records.add_event(job["id"], f"Submitted to Kubernetes (namespace {spec.kubernetes.namespace}): "
                                        + "; ".join(done))
        now = self.records.job(None, job["id"])
        if now is not None and now["status"] in ("cancelled", "paused"):  # while it was being submitted
            self.cancelled({**now, "status": "queued"})

    def _still_deleting(self, namespace: str, name: str) -> bool:
        return any(j.metadata.name == name and j.metadata.deletion_timestamp is not None
                   for j in self._cluster(namespace).jobs())

    def _sync(self, job: dict[str, Any], cluster_job: Any) -> None:
        if cluster_job is None:
            now = self.records.job(None, job["id"])
            if now is None or (now["status"], now["worker"]) != (job["status"], job["worker"]):
                return  # paused, resumed or cancelled since this tick read it: its Job went for that
            self._fail(job, {"code": "job_deleted", "message": f"the Kubernetes Job {job['id']} was deleted outside "
                             "kubetune", "param": None}, expect=["queued", "running"])
            return
        phase = job_phase(cluster_job)
        if phase in ("Queued", "Pending", "Running"):
            self._relay(job, cluster_job, phase)
        if phase == "Running" and job["status"] == "queued":
            if self.records.update_job(job["id"], expect=["queued"], status="running"):
                self.records.add_event(job["id"], "Fine-tuning job started")
        elif phase == "Succeeded":
            events = RunView(job["run_uri"]).events()
            if self.succeed(job, events, ["queued", "running"], finished_at=int(time.time()),
                            trained_tokens=trained_tokens(events)):
                self._list_adapter(job, added=True)
        elif phase == "Failed":
            errors = [e.error for e in RunView(job["run_uri"]).events() if isinstance(e, ErrorEvent)]
            conditions = [c for c in (cluster_job.status.conditions or []) if c.type == "Failed"]
            why = errors[-1] if errors else (f"{conditions[0].reason}: {conditions[0].message}" if conditions
                                             else "the Job failed")
            self._fail(job, {"code": "training_failed", "message": why, "param": None},
                       expect=["queued", "running"], tokens=trained_tokens(RunView(job["run_uri"]).events()))

    def _relay(self, job: dict[str, Any], cluster_job: Any, phase: str) -> None:
        """What the cluster says about a job that waits or runs, as job events: Kueue holding it, a pod
        that cannot be scheduled or pull its image, a container that exited (and is retried)."""
        said = self._said.setdefault(job["id"], set())
        notes = []
        if phase == "Queued":
            queue = (cluster_job.metadata.labels or {}).get("kueue.x-k8s.io/queue-name")
            notes.append(f"Queued by Kueue in LocalQueue {queue} until it has quota" if queue else "Suspended")
        try:
            pods = self._cluster(cluster_job.metadata.namespace).pods(job["id"])
        except KubetuneError:
            pods = []
        notes += [f"pod {p.name}: {p.detail}" for p in map(pod_state, pods) if p.detail]
        for note in notes:
            if note not in said:
                said.add(note)
                self.records.add_event(job["id"], note, "warn" if note.startswith("pod ") else "info")

    def paused(self, job: dict[str, Any]) -> None:
        """The Job is deleted as for cancel (the pods checkpoint to storage on SIGTERM and free their
        nodes); resume submits it again, and the new pod resumes from that checkpoint."""
        self.cancelled(job)
        self.records.update_job(job["id"], expect=["paused"], worker=None)  # resume may queue it again

    def unserve(self, job: dict[str, Any]) -> None:
        """Take a model about to be deleted off its base's vLLM Deployment (KubetuneError if the
        cluster cannot be told: the model is then not deleted)."""
        self._list_adapter(job, added=False)

    def _list_adapter(self, job: dict[str, Any], added: bool) -> None:
        from kubetune.control.serving import listing_for, update_listing

        spec = load_spec_text(job["spec"], f"job {job['id']}")
        ref = listing_for(spec, self.config.serving.kubernetes)
        if ref is None:
            return
        namespace, name = ref
        try:
            update_listing(self._cluster(namespace), name, spec, job["run_uri"], job["fine_tuned_model"], added,
                           self.config.serving.max_loras)
        except KubetuneError as exc:
            if not added:
                raise
            self.records.add_event(job["id"], f"Could not add the model to configmap/{name} in {namespace} (served "
                                            f"by this server only): {exc.message}", "warn")
            return
        self.records.add_event(job["id"], f"Model listed in configmap/{name} in {namespace}: the vLLM Deployment "
                                        "loads it" if added else f"Model taken off configmap/{name} in {namespace}")

    def cancelled(self, job: dict[str, Any]) -> None:
        """Delete the Job (its pods get SIGTERM: the trainer checkpoints to storage on its way out)."""
        if job["status"] not in ("queued", "running") or job["worker"] is None:
            return  # nothing was submitted
        try:
            done = self._cluster(self._namespace(job)).delete_run(job["id"])
            self.records.add_event(job["id"], "; ".join(done))
        except KubetuneError as exc:
            self.records.add_event(job["id"], f"Could not delete the Kubernetes Job: {exc.message}", "warn")
