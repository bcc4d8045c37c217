"""Where a run trains, chosen in one place: in this process, under torchrun on this machine (several
devices, or one node of several in a pod), or as a Job on Kubernetes. The CLI's `train` and `submit`
and `sweep` go through `launcher_for`; a new launcher (Ray, Slurm) is one class here.

The launcher is also where training is composed with what follows it: the in-process launcher
hands `train` the evaluation to run at the end (eval.metrics), so train and evaluate stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

from kubetune.spec.models import RunSpec

Target = Literal["local", "k8s"]


@dataclass(frozen=True)
class Launch:
    spec: RunSpec
    spec_path: str                      # the file, for processes that load it again (torchrun ranks)
    overrides: tuple[str, ...] = ()
    wait: bool = False                  # wait for another writer of the run instead of exit 75
    log: Callable[[str], None] = field(default=print, compare=False)


class Launcher(Protocol):
    name: str

    def launch(self, job: Launch) -> int:
        """Run (or submit) the training; the exit code of errors.py."""


class InProcess:
    """This process trains (also each torchrun rank), then evaluates when eval.metrics asks for it."""

    name = "in-process"

    def launch(self, job: Launch) -> int:
        from kubetune.evaluate.run import evaluate_after_training
        from kubetune.train.runner import train

        train(job.spec, log=job.log, wait=job.wait, after_training=evaluate_after_training)
        return 0


class Torchrun:
    """torchrun on this machine: one process per device (resources.devices_per_node > 1, or nodes > 1 in a pod)."""

    name = "torchrun"

    def launch(self, job: Launch) -> int:
        from kubetune.launch.torchrun import run_torchrun

        return run_torchrun(job.spec, job.spec_path, list(job.overrides), wait=job.wait)


class Kubernetes:
    """The run's ConfigMap and Job applied to the cluster (idempotent by run name); Kueue queues it."""

    name = "kubernetes"

    def launch(self, job: Launch) -> int:
        from kubetune.k8s.client import Cluster
        from kubetune.k8s.dist import with_dist
        from kubetune.k8s.render import render
        from kubetune.k8s.storage import sized

        cluster = Cluster(job.spec.kubernetes.namespace)
        spec = sized(job.spec)  # disk sizes from the base's size, where this machine can read it
        existing = cluster.job_scratch_size(spec.name) if job.spec.kubernetes.scratch_size == "auto" else None
        if existing:  # a Job's pod template cannot change: a re-submit from another machine keeps its size
            spec = spec.model_copy(update={"kubernetes": spec.kubernetes.model_copy(
                update={"scratch_size": existing})})
        for line in cluster.apply(with_dist(spec, render(spec, "train"))):
            job.log(line)
        return 0


def launcher_for(spec: RunSpec, target: Target = "local") -> Launcher:
    if target == "k8s":
        return Kubernetes()
    from kubetune.train.dist import DistInfo

    if (spec.resources.devices_per_node > 1 or spec.resources.nodes > 1) and not DistInfo.from_env().launched:
        return Torchrun()
    return InProcess()


__all__ = ["InProcess", "Kubernetes", "Launch", "Launcher", "Target", "Torchrun", "launcher_for"]
