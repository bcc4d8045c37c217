"""`kubetune train`: one run from spec to final/adapter, resumable at every checkpoint.

Order matters for "nothing saved is lost": decide resume before touching the run folder; refuse to
train over a run's checkpoints when resume is `never`; write final/COMPLETE only after the adapter,
tokenizer and generation config are on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kubetune import settings
from kubetune.runs.checkpoints import latest_complete, list_checkpoints, remove_incomplete, skipped, verify
from kubetune.artifacts.events import (
    CheckpointStoredEvent, EndEvent, ErrorEvent, EventLog, LeaseEvent, PreemptedEvent, StartEvent,
)
from kubetune.runs.layout import CHECKPOINT_PREFIX, RUN_KEYS, RunLayout
from kubetune.artifacts.manifest import build_manifest
from kubetune.runs.trackers import TrackerRuns, check_trackers
from kubetune.cpus import fit_torch_threads
from kubetune.data.prepare import Prepared
from kubetune.errors import KubetuneError, Preempted, TrainingError, UsageError
from kubetune.spec.load import spec_to_yaml
from kubetune.spec.models import RunSpec
from kubetune.runs.lease import Lease, lease_for
from kubetune.runs.run import Run, apply_storage_env
from kubetune.storage.store import Store, retry_transient
from kubetune.uris import scheme
from kubetune.runs.sync import Uploader, pull
from kubetune.train.batching import optimizer_steps, batch_shape
from kubetune.train.arguments import training_arguments
from kubetune.train.build import build_trainer
from kubetune.train.devices import check_accelerator
from kubetune.train.dist import DistInfo, finish_distributed
from kubetune.train.measure import peak_memory_bytes
from kubetune.train.memory import check_fits, plan_for_run, resolve_strategy
from kubetune.train.objectives import Objective, objective_for


@dataclass
class TrainResult:
    layout: RunLayout
    status: str  # "finished" | "already-finished"
    global_step: int = 0
    resumed_from: str | None = None


def preflight(spec: RunSpec, check_storage: bool = True) -> Run:
    """Checks that need no data and no torch, shared by `validate` and `train`: where the run goes,
    that an explicit resume point is a complete checkpoint, and — before any training — that every
    object-storage input is readable and the output writable with the credentials at hand."""
    apply_storage_env(spec)
    check_trackers(spec)
    output = Run.for_spec(spec)
    if spec.resume not in ("auto", "never") and (why := verify(Path(spec.resume))) is not None:
        raise UsageError(f"resume: {spec.resume} is not a complete checkpoint ({why})",
                         f"use resume: auto, or one of the folders under {output.layout.checkpoints}")
    if check_storage:
        if output.store is not None:
            retry_transient(lambda: output.store.check_writable("output"))
        inputs = [("model.base", spec.model.base)] + [("data source", s.path) for s in spec.data.sources()]
        inputs += [("model.adapter", spec.model.adapter)] if spec.model.adapter else []
        for what, uri in inputs:
            if scheme(uri) in ("s3", "gs"):
                retry_transient(lambda w=what, u=uri: Store(u).check_readable(w))
    return output


def prepare_output(spec: RunSpec, log: Any = print, wait: bool = False, lease: bool = True) -> tuple[Run, Lease | None]:
    """Before any training: pre-flight, this machine's devices, the run's lease (this process
    becomes its only writer, or LeaseHeld), then a remote run's state into the local working copy.
    The lease comes before the pull: the pull deletes incomplete checkpoints, which, while another
    trainer writes, may be its checkpoint in flight."""
    output = preflight(spec)
    check_accelerator(spec)
    held: Lease | None = None
    taken_from: str | None = None
    if lease:
        held = lease_for(output.uri, output.store, settings.lease_holder(), settings.lease_seconds(), log)
        taken_from = held.acquire(wait)
        if taken_from:
            log(f"took over the run's lease from {taken_from} (it was no longer renewed)")
    try:
        if output.store is not None:
            pulled = pull(output.store, output.layout, log, writer=held is not None)  # only the lease holder cleans
            if pulled.checkpoint is not None:
                log(f"found {output.store.url(RUN_KEYS.checkpoint(pulled.checkpoint))} (complete)")
        if spec.model.adapter:  # found and checked (and a remote run's final/ fetched) before the ranks start
            from kubetune.train.start import describe, start_adapter

            folder = start_adapter(spec)
            if folder is not None:
                log(f"starting from the adapter of {spec.model.adapter} ({describe(folder)}; method.lora is not used)")
    except BaseException:
        if held is not None:
            held.release()
        raise
    if held is not None and taken_from:
        EventLog(output.layout.events).emit(LeaseEvent(holder=settings.lease_holder(), taken_over_from=taken_from))
    return output, held


@dataclass
class Fit:
    """One training process's state, from set-up to the final save."""

    spec: RunSpec
    dist: DistInfo
    output: Run
    say: Any
    objective: Objective
    lease: Lease | None = None
    after_training: AfterTraining | None = None
    resume_from: Path | None = None
    uploader: Uploader | None = None
    data: Any = None
    events: Any = None
    trainer: Any = None
    graceful: Any = None
    args: Any = None
    trackers: TrackerRuns | None = None

    @property
    def layout(self) -> RunLayout:
        return self.output.layout

    @property
    def main(self) -> bool:
        return self.dist.rank == 0


# What runs on rank 0 once training is done and before the uploads drain (eval, with eval.metrics):
# given by the caller, so training never imports evaluation.
AfterTraining = Callable[[RunLayout, Callable[[str], None]], None]


def train(spec: RunSpec, log: Any = print, wait: bool = False, after_training: AfterTraining | None = None) -> TrainResult:
    """Train here, in this process (torchrun ranks each call this; kubetune.launch picks the
    launcher): open the run, resume, set up, fit, finalize."""
    dist = DistInfo.from_env()
    say = log if dist.rank == 0 else (lambda *_a, **_k: None)
    if spec.resources.nodes > 1 and not dist.launched:
        raise UsageError("resources.nodes > 1 needs a cluster", "run it with `kubetune submit`, or set resources.nodes: 1")
    apply_storage_env(spec)
    fit_torch_threads()  # a pod's CPU limit, not the node's cores (torchrun ranks get OMP_NUM_THREADS instead)
    # Under torchrun the launcher already checked, took the lease and pulled: ranks only find the folder.
    output, lease = (Run.for_spec(spec), None) if dist.launched else prepare_output(spec, say, wait)
    fit = Fit(spec, dist, output, say, objective_for(spec), lease, after_training)
    try:
        done = _already_finished(fit)
        if done is not None:
            return done
        fit.resume_from = _resume_point(spec, fit.layout, fit.main)
        if fit.resume_from:
            say(f"resuming from {output.remote(fit.resume_from)}")
        _set_up(fit)
        trained = _fit(fit)
        return _finalize(fit, trained)
    finally:
        if fit.trackers is not None:
            fit.trackers.finish()
        if lease is not None:
            lease.release()


def _already_finished(fit: Fit) -> TrainResult | None:
    spec, layout = fit.spec, fit.layout
    if not layout.is_finished() or spec.resume == "never":
        return None
    changed = spec_changes(layout, spec)
    if changed:
        raise UsageError(
            f"run {spec.name} in {layout.root} already finished with a different spec ({'; '.join(changed)})",
            "give the new run another name (--set name=...), or another output folder",
        )
    fit.say(f"run {spec.name} already finished: {layout.served(spec)}")
    return TrainResult(layout, "already-finished")


def _set_up(fit: Fit) -> None:
    """Data, batch plan, model and Trainer; the run's files and the start event."""
    spec, layout, say = fit.spec, fit.layout, fit.say
    events = EventLog(layout.events, enabled=fit.main)
    if fit.output.store is not None and fit.main:
        store_uri = fit.output.store.uri
        fit.uploader = Uploader(fit.output.store, layout, spec.train.keep_checkpoints, log=say, on_stored=lambda step: (
            events.emit(CheckpointStoredEvent(step=step, uri=f"{store_uri}/{RUN_KEYS.checkpoint(step)}"))))
    data = fit.objective.prepare(spec)
    batches = batch_shape(spec.train.total_batch_size, spec.train.max_per_device_batch_size, fit.dist.world_size)
    memory = plan_for_run(spec, data, local=True)
    check_fits(spec, memory)  # before the model loads: an out-of-memory plan is refused, with its fixes
    strategy = resolve_strategy(spec, memory)
    args = training_arguments(spec, layout, batches, bool(data.eval.rows), data.model_dir, strategy,
                              *fit.objective.arguments(spec))
    # Loads the model: target_modules and qlora mistakes surface here, before anything is written.
    trainer = build_trainer(spec, data, layout, events, batches, args, fit.uploader, fit.objective,
                            fit.output.store)
    check_sharding(strategy, trainer, fit.resume_from)
    from kubetune.train.callbacks import LeaseWatch
    from kubetune.train.preempt import GracefulStop, StopCallback  # imports transformers: not at module level

    graceful = GracefulStop(say)
    trainer.add_callback(StopCallback(graceful))
    if fit.lease is not None:
        trainer.add_callback(LeaseWatch(fit.lease))
    if fit.main:
        _write_run_files(spec, layout, data, fit.dist.world_size)
        if spec.tracking.report_to:
            # before train: transformers' integrations then log into these runs; their ids go with the run
            fit.trackers = TrackerRuns(spec, layout, say)
            for callback in fit.trackers.start():
                trainer.add_callback(callback)
        if fit.uploader:
            fit.uploader.files(layout.spec, layout.manifest, *([fit.trackers.path] if fit.trackers else []))
    # (the batch counts answers: GRPO's prompts are answered num_generations times each)
    total_steps = optimizer_steps(len(data.train.rows) * fit.objective.answers_per_row(spec), batches.total,
                                  spec.train.epochs, spec.train.max_steps)
    stop = data.formatter.stop if data.has_chat else None
    if stop is not None and not stop.consistent:
        say(f"note: generation stopped at {stop.generation_eos_ids} but the chat template ends turns with "
            f"{stop.eot_token} (id {stop.eot_id}); the saved generation_config stops at {stop.fixed_eos_ids}")
    events.emit(StartEvent(
        name=spec.name, resumed_from=str(fit.resume_from) if fit.resume_from else None,
        train_rows=len(data.train.rows), eval_rows=len(data.eval.rows), total_steps=total_steps,
        per_device_batch=batches.per_device, accumulation=batches.accumulation, world_size=fit.dist.world_size,
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        truncated=data.train.truncated, dropped=data.train.dropped, skipped_rows=len(data.samples.skipped),
        strategy="fsdp" if trainer.is_fsdp_enabled else "ddp" if fit.dist.world_size > 1 else "single"))
    fit.data, fit.events, fit.trainer, fit.graceful, fit.args = data, events, trainer, graceful, args


def _fit(fit: Fit) -> Any:
    """trainer.train under the graceful-stop handler; a stop request ends in a checkpoint and Preempted."""
    trainer, layout, events = fit.trainer, fit.layout, fit.events
    fit.graceful.install()
    try:
        trained = trainer.train(resume_from_checkpoint=str(fit.resume_from) if fit.resume_from else None)
        trainer.events_callback.tokens_seen += trainer.take_token_counts()[0]  # steps after the last log
        if fit.graceful.requested:
            step = trainer.state.global_step
            saved = layout.checkpoint(step)
            events.emit(PreemptedEvent(step=step, checkpoint=fit.output.remote(saved)))
            finish_distributed()
            _drain(fit.uploader, layout, timeout=settings.preempt_upload_seconds())
            raise Preempted(f"stopped at step {step} after saving {saved}",
                            "run the same command again: resume: auto continues from that checkpoint")
        if fit.data.eval.rows and trainer.eval_dataset is not None:
            trainer.evaluate()
        fit.objective.evaluate(fit.spec, trainer, fit.data, layout, fit.main)
        fit.objective.save_final(fit.spec, trainer, fit.data, layout, fit.main)
        if fit.uploader:
            fit.uploader.tree(layout.final)  # final/COMPLETE goes last
        finish_distributed()
        return trained
    except KubetuneError:
        raise
    except Exception as exc:  # training blew up: record it where `status` and logs will look
        events.emit(ErrorEvent(error=f"{type(exc).__name__}: {exc}"))
        try:
            _drain(fit.uploader, layout, timeout=60)
        except KubetuneError:
            pass  # the training error is the one to report
        raise TrainingError(f"training failed: {type(exc).__name__}: {exc}",
                            f"the run's checkpoints are kept in {layout.checkpoints}; fix the cause and rerun "
                            "(resume: auto continues from the latest complete one)") from exc
    finally:
        fit.graceful.restore()


def _finalize(fit: Fit, trained: Any) -> TrainResult:
    """The end event, evaluation (eval.metrics), and the wait for every upload."""
    spec, layout, say, trainer = fit.spec, fit.layout, fit.say, fit.trainer
    step = trainer.state.global_step
    if fit.uploader:  # the last checkpoint_stored event comes before the end event
        fit.uploader.wait_for_checkpoints(settings.upload_retry_seconds())
    fit.events.emit(EndEvent(step=step, final=str(layout.final), train_loss=trained.training_loss,
                             tokens_seen=int(trainer.events_callback.tokens_seen),
                             train_runtime=trained.metrics.get("train_runtime"), peak_memory_bytes=peak_memory_bytes(spec.resources.accelerator)))
    say(f"done: {step} steps; {'model' if spec.method.type == 'full' else 'adapter'} in "
        f"{layout.served(spec)}")
    if fit.main and fit.after_training and spec.eval.metrics and (fit.data.eval.rows or fit.data.samples.eval):
        fit.after_training(layout, say)  # eval: metrics, report, and the trackers
    if fit.uploader and layout.eval.exists():  # the after-training eval's, or the objective's own (dpo)
        fit.uploader.tree(layout.eval)
    if fit.uploader and fit.trackers is not None and fit.trackers.tensorboard_dir.exists():
        fit.uploader.tree(fit.trackers.tensorboard_dir)
    if fit.uploader:
        say(f"waiting for uploads to {fit.output.uri} ...")
        _drain(fit.uploader, layout)
        say(f"stored in {fit.output.uri}")
    resumed = fit.output.remote(fit.resume_from) if fit.resume_from else None
    return TrainResult(layout, "finished", step, resumed)


def _drain(uploader: Uploader | None, layout: RunLayout, timeout: float | None = None) -> None:
    """Send the event log last and wait for the queue; a failed upload is an error (local files stay)."""
    if uploader is not None:
        uploader.files(layout.events)
        uploader.close(timeout)


def spec_changes(layout: RunLayout, spec: RunSpec) -> list[str]:
    """Fields whose value differs from the run's saved spec.yaml (dotted path: old → new)."""
    import yaml

    if not layout.spec.exists():
        return []
    old = yaml.safe_load(layout.spec.read_text()) or {}
    new = spec.model_dump(mode="json")
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(old, new, "")
    return out


def check_sharding(strategy: str, trainer: Any, resume_from: Path | None) -> None:
    """FSDP is on exactly when the run shards (never a silent fall-back to replicas), and a checkpoint
    resumes under the strategy that wrote it: sharded state cannot be loaded into replicas, nor the reverse."""
    if (strategy == "fsdp") != bool(trainer.is_fsdp_enabled):
        raise UsageError(f"resources.strategy {strategy}: this machine's devices cannot run it "
                         f"(accelerate {'did not enable' if strategy == 'fsdp' else 'enabled'} FSDP)",
                         "set resources.strategy: ddp, or run on devices accelerate shards on")
    if resume_from is None:
        return
    sharded = any(resume_from.glob("pytorch_model_fsdp*"))
    if sharded != (strategy == "fsdp"):
        was, now = ("fsdp", strategy) if sharded else ("ddp", "fsdp")
        raise UsageError(f"{resume_from} was saved by a {was} run and this run uses {now}: its state cannot be "
                         "loaded across strategies", f"resume with resources.strategy: {was}, or start a new run "
                         "from the exported model (model.base)")
    saved_world = len(list(resume_from.glob("rng_state_*.pth")))
    if sharded and saved_world and saved_world != trainer.args.world_size:
        raise UsageError(f"{resume_from} holds the shards of {saved_world} processes and this run has "
                         f"{trainer.args.world_size}", f"resume on {saved_world} processes (resources.devices_per_node "
                         "x nodes), or start a new run from the exported model")


def _resume_point(spec: RunSpec, layout: RunLayout, main: bool) -> Path | None:
    if spec.resume == "never":
        existing = [p for _, p, ok in list_checkpoints(layout.checkpoints) if ok]
        if existing or layout.final.exists():
            raise UsageError(
                f"{layout.root} already holds a run ({len(existing)} checkpoint(s)); resume is 'never', "
                "and kubetune does not overwrite saved work",
                "set resume: auto to continue it, or choose another name/output",
            )
        return None
    if spec.resume == "auto":
        if main:
            for step, why in skipped(layout.checkpoints):  # said before the writer cleans any of them
                print(f"{CHECKPOINT_PREFIX}{step} is skipped, not loaded: {why}", flush=True)
            remove_incomplete(layout.checkpoints)
        return latest_complete(layout.checkpoints)
    return Path(spec.resume)  # checked by preflight


def _write_run_files(spec: RunSpec, layout: RunLayout, data: Prepared, world_size: int) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    text = spec_to_yaml(spec)
    if layout.spec.exists() and layout.spec.read_text() != text:
        # A resumed run with a changed spec: keep the earlier one rather than lose it.
        n = 1
        while layout.path(RUN_KEYS.earlier_spec(n)).exists():
            n += 1
        layout.spec.rename(layout.path(RUN_KEYS.earlier_spec(n)))
    layout.spec.write_text(text)
    manifest = build_manifest(data.file_hashes, spec.train.seed, world_size,
                              {"model_dir": str(data.model_dir), "chat_template": data.formatter.template_source})
    layout.manifest.write_text(json.dumps(manifest, indent=2))
