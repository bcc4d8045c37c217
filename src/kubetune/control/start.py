"""Where a job starts, from the caller's `model`: one of the caller's own models (`ft:...` of a
succeeded job, or `ft:...:ckpt-step-N` of one of its checkpoints), or a base the operator offers.
A tenant never names a path or URI: the server resolves both to the run folders it keeps."""

from __future__ import annotations

import re
from typing import Any

from kubetune.runs.layout import RUN_KEYS, serves_merged
from kubetune.control.jobs import Start
from kubetune.control.policy import ModelsPolicy, Refused, resolve_model
from kubetune.runs.view import RunView
from kubetune.control.records import Records
from kubetune.spec.load import load_spec_text

__all__ = ["resolve_start"]

CHECKPOINT = re.compile(r"(?P<model>ft:.+):ckpt-step-(?P<step>\d{1,9})")


def resolve_start(records: Records, owner: str, model: str, models: ModelsPolicy) -> Start:
    if not model.startswith("ft:"):
        base, revision, trust = resolve_model(model, models)
        return Start(base, revision, trust)
    found = CHECKPOINT.fullmatch(model)
    name, step = (found["model"], int(found["step"])) if found else (model, None)
    parent = _own_job(records, owner, name, checkpoint=step is not None)
    spec = load_spec_text(parent["spec"], f"job {parent['id']}")
    run = parent["run_uri"].rstrip("/")
    if step is not None and step not in RunView(run).complete_steps():
        raise Refused("model", f"{model!r}: no complete checkpoint at step {step} (list them: "
                               "fine_tuning.jobs.checkpoints.list)")
    if serves_merged(spec):  # a full fine-tune: its whole model (or checkpoint) is the next run's base
        where = f"{run}/{RUN_KEYS.checkpoint(step) if step is not None else RUN_KEYS.merged}"
        return Start(where, None, spec.model.trust_remote_code)
    adapter = f"{run}/{RUN_KEYS.checkpoint(step)}" if step is not None else run
    return Start(spec.model.base, spec.model.revision, spec.model.trust_remote_code, adapter)


def _own_job(records: Records, owner: str, name: str, checkpoint: bool) -> dict[str, Any]:
    """The caller's job whose model is `name`: a succeeded one, or (for a checkpoint) any with checkpoints."""
    for job in records.jobs_of(owner):
        if job["fine_tuned_model"] == name and job.get("model_deleted_at") is None \
                and (job["status"] == "succeeded" or checkpoint):
            return job
    raise Refused("model", f"{name!r} is not one of your models (a succeeded job's fine_tuned_model, or one of "
                           "its checkpoints)", "list yours: models.list()")
