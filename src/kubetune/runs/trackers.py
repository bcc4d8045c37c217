"""Experiment trackers (tracking.report_to: mlflow, wandb, tensorboard), for real.

- `check_trackers` (validate and train): each tracker is installed and configured, or a SpecError
  that names the package to install and the variable to set — before anything trains.
- `TrackerRuns.start` opens the tracker runs before training, so transformers' own integrations
  log parameters and losses into them, and records their ids in the run's trackers.json: a resumed
  run (on any machine: the file travels with the run) continues the same MLflow and W&B runs.
- `TrackerRuns.log_eval` sends the final eval metrics (base and tuned) and eval/report.md to each,
  from the training process or from a later `kubetune eval`.

Credentials never pass through here: MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN and W&B
WANDB_API_KEY from the environment (in pods: kubernetes.secrets.mlflow / kubernetes.secrets.wandb).
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from kubetune.errors import Problem, SpecError
from kubetune.runs.layout import RUN_KEYS, RunLayout
from kubetune.spec.models import RunSpec

TRACKERS_FILE = RUN_KEYS.trackers
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    try:  # `wandb login` stores the key in ~/.netrc
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("://")[-1]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_trackers(spec: RunSpec) -> None:
    """Every report_to entry importable and configured, else one SpecError listing each problem."""
    problems: list[Problem] = []
    for i, name in enumerate(spec.tracking.report_to):
        where = f"tracking.report_to[{i}]"
        if not _installed(PACKAGES[name]):
            problems.append(Problem(where, f"{name} is not installed: pip install {PACKAGES[name]} "
                                           "(kubetune's requirements.txt and image include it)"))
            continue
        if name == "mlflow" and not (spec.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            problems.append(Problem(where, "mlflow needs a tracking server: set tracking.mlflow_uri (or "
                                           "MLFLOW_TRACKING_URI); credentials by MLFLOW_TRACKING_USERNAME/PASSWORD or "
                                           "MLFLOW_TRACKING_TOKEN (in a pod: kubernetes.secrets.mlflow)"))
        if name == "wandb" and not _wandb_logged_in():
            problems.append(Problem(where, "wandb has no API key: set WANDB_API_KEY (in a pod: kubernetes.secrets.wandb), "
                                           "run `wandb login`, or WANDB_MODE=offline to log locally"))
    if problems:
        raise SpecError(problems, hint="or remove the tracker from tracking.report_to")


class TrackerRuns:
    """The tracker runs of one kubetune run (main process only)."""

    def __init__(self, spec: RunSpec, layout: RunLayout, log: Callable[[str], None] = print) -> None:
        self.spec, self.layout, self.log = spec, layout, log
        self.names = list(spec.tracking.report_to)
        self.ids: dict[str, Any] = self._saved()
        self._writer: Any = None

    @property
    def path(self) -> Path:
        return self.layout.trackers

    @property
    def tensorboard_dir(self) -> Path:
        return self.layout.tensorboard

    def _saved(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.ids, indent=2))

    def report_to(self) -> list[str]:
        """What transformers' integrations should report to: tensorboard is ours (its folder in the run)."""
        return [n for n in self.names if n != "tensorboard"]

    def start(self) -> list[Any]:
        """Open (or continue) each tracker's run before training; the callbacks to add to the Trainer."""
        callbacks: list[Any] = []
        if "mlflow" in self.names:
            import mlflow

            mlflow.set_tracking_uri(self.spec.tracking.mlflow_uri or os.environ["MLFLOW_TRACKING_URI"])
            if self.spec.tracking.experiment:
                mlflow.set_experiment(self.spec.tracking.experiment)
            run = mlflow.start_run(run_id=self.ids.get("mlflow_run_id"), run_name=self.spec.name)
            self.ids["mlflow_run_id"] = run.info.run_id
        if "wandb" in self.names:

            self.ids.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
            self._wandb_init()
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
            callbacks.append(TensorBoardCallback(tb_writer=self._writer))
            self.ids["tensorboard_dir"] = RUN_KEYS.tensorboard
        if self.ids:
            self._save()
        return callbacks

    def log_eval(self, metrics: dict[str, dict[str, float]], report: Path | None, step: int | None = None) -> None:
        """Final metrics as eval/<model>/<metric> (model: base, tuned) and the report, to each tracker.
        A tracker that fails is reported and skipped: the evaluation itself is already saved."""
        flat = {f"eval/{model}/{key}": float(value) for model, scores in metrics.items()
                for key, value in scores.items() if isinstance(value, (int, float))}
        for name in self.names:
            try:
                getattr(self, f"_eval_{name}")(flat, report, step)
            except Exception as exc:  # noqa: BLE001 - a tracker outage must not fail an evaluated run
                self.log(f"warning: could not send the eval metrics to {name}: {type(exc).__name__}: {exc}")

    def _eval_mlflow(self, flat: dict[str, float], report: Path | None, step: int | None) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.spec.tracking.mlflow_uri or os.environ["MLFLOW_TRACKING_URI"])
        run_id = self.ids.get("mlflow_run_id")
        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            mlflow.start_run(run_id=run_id, run_name=self.spec.name)
        mlflow.log_metrics(flat, step=step)
        if report is not None and report.exists():
            mlflow.log_artifact(str(report), artifact_path="eval")

    def _wandb_init(self) -> Any:
        """Open (or continue, by id) the run's W&B run: the same project, name and tags in training and eval."""
        import wandb

        tracking = self.spec.tracking
        return wandb.init(project=tracking.wandb_project or tracking.experiment or self.spec.name,
                          name=tracking.run_name or self.spec.name, tags=tracking.tags or None,
                          id=self.ids.get("wandb_run_id"), resume="allow", dir=str(self.layout.root))

    def _eval_wandb(self, flat: dict[str, float], report: Path | None, step: int | None) -> None:
        import wandb

        run = wandb.run
        if run is None or run.id != self.ids.get("wandb_run_id"):
            run = self._wandb_init()
        run.log(flat)
        run.summary.update(flat)
        if report is not None and report.exists():
            run.save(str(report), base_path=str(report.parent.parent), policy="now")

    def _eval_tensorboard(self, flat: dict[str, float], report: Path | None, step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        for key, value in flat.items():
            writer.add_scalar(key, value, global_step=step or 0)
        if report is not None and report.exists():
            writer.add_text("eval/report", report.read_text(), global_step=step or 0)
        writer.close()

    def finish(self) -> None:
        """Close the runs this process opened (a resumed or later eval continues them by id)."""
        if "mlflow" in self.names:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run()
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
