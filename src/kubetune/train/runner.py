"""`kubetune train`: one run from spec to final/adapter, resumable at every checkpoint.

Order matters for "nothing saved is lost": decide resume before touching the run folder; refuse to
train over a run's checkpoints when resume is `never`; write final/COMPLETE only after the adapter,
tokenizer and generation config are on disk.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import settings
from kubetune.artifacts.checkpoints import latest_complete, list_checkpoints, remove_incomplete
from kubetune.artifacts.events import (
    CheckpointStoredEvent, EndEvent, ErrorEvent, EventLog, LeaseEvent, PreemptedEvent, StartEvent,
)
from kubetune.artifacts.export import save_tokenizer_and_config
from kubetune.artifacts.layout import RunLayout
from kubetune.artifacts.manifest import build_manifest
from kubetune.artifacts.trackers import TrackerRuns, check_trackers
from kubetune.data.prepare import Prepared, prepare
from kubetune.errors import KubetuneError, Preempted, Problem, SpecError, TrainingError, UsageError
from kubetune.hf import quiet_progress_bars
from kubetune.spec.load import spec_to_yaml
from kubetune.spec.models import RunSpec
from kubetune.storage import read_model_config, resolve_model
from kubetune.storage.lease import Lease, lease_for
from kubetune.storage.runs import RunOutput, apply_storage_env, run_output
from kubetune.storage.store import Store, retry_transient, scheme
from kubetune.storage.sync import Uploader, pull
from kubetune.train.batching import optimizer_steps, plan_batches
from kubetune.train.devices import check_accelerator


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def launched(self) -> bool:
        return "LOCAL_RANK" in os.environ

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


@dataclass
class TrainResult:
    layout: RunLayout
    status: str  # "finished" | "already-finished"
    global_step: int = 0
    resumed_from: str | None = None


def preflight(spec: RunSpec, check_storage: bool = True) -> RunOutput:
    """Checks that need no data and no torch, shared by `validate` and `train`: where the run goes,
    that an explicit resume point is a complete checkpoint, and — before any training — that every
    object-storage input is readable and the output writable with the credentials at hand."""
    apply_storage_env(spec)
    check_trackers(spec)
    output = run_output(spec)
    if spec.resume not in ("auto", "never") and not (Path(spec.resume) / "COMPLETE").exists():
        raise UsageError(f"resume: {spec.resume} is not a complete checkpoint (no COMPLETE marker)",
                         f"use resume: auto, or one of the folders under {output.layout.checkpoints}")
    if check_storage:
        if output.store is not None:
            retry_transient(lambda: output.store.check_writable("output"), say=print)
        inputs = [("model.base", spec.model.base)] + [("data source", s.path) for s in spec.data.sources()]
        for what, uri in inputs:
            if scheme(uri) in ("s3", "gs"):
                retry_transient(lambda w=what, u=uri: Store(u).check_readable(w), say=print)
    return output


def prepare_output(spec: RunSpec, log: Any = print, wait: bool = False, lease: bool = True) -> tuple[RunOutput, Lease | None]:
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
            pulled = pull(output.store, output.layout, log)
            if pulled.checkpoint is not None:
                log(f"found {output.store.url(f'checkpoints/checkpoint-{pulled.checkpoint}')} (complete)")
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
    output: RunOutput
    say: Any
    lease: Lease | None = None
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


def train(spec: RunSpec, log: Any = print, wait: bool = False) -> TrainResult:
    """Train here, in this process (torchrun ranks each call this; see launcher for >1 device):
    open the run, resume, set up, fit, finalize."""
    dist = DistInfo.from_env()
    say = log if dist.rank == 0 else (lambda *_a, **_k: None)
    if spec.resources.nodes > 1 and not dist.launched:
        raise UsageError("resources.nodes > 1 needs a cluster", "run it with `kubetune submit`, or set resources.nodes: 1")
    apply_storage_env(spec)
    # Under torchrun the launcher already checked, took the lease and pulled: ranks only find the folder.
    output, lease = (run_output(spec), None) if dist.launched else prepare_output(spec, say, wait)
    fit = Fit(spec, dist, output, say, lease)
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
    fit.say(f"run {spec.name} already finished: {layout.adapter if spec.method.type != 'full' else layout.merged}")
    return TrainResult(layout, "already-finished")


def _set_up(fit: Fit) -> None:
    """Data, batch plan, model and Trainer; the run's files and the start event."""
    spec, layout, say = fit.spec, fit.layout, fit.say
    events = EventLog(layout.events, enabled=fit.main)
    if fit.output.store is not None and fit.main:
        store_uri = fit.output.store.uri
        fit.uploader = Uploader(fit.output.store, layout, spec.train.keep_checkpoints, log=say, on_stored=lambda step: (
            events.emit(CheckpointStoredEvent(step=step, uri=f"{store_uri}/checkpoints/checkpoint-{step}"))))
    data = prepare(spec)
    batches = plan_batches(spec.train.total_batch_size, spec.train.max_per_device_batch_size, fit.dist.world_size)
    args = training_arguments(spec, layout, batches, bool(data.eval.rows), data.model_dir)
    # Loads the model: target_modules and qlora mistakes surface here, before anything is written.
    trainer = build_trainer(spec, data, layout, events, batches, args, fit.uploader)
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
    total_steps = optimizer_steps(len(data.train.rows), batches.total, spec.train.epochs, spec.train.max_steps)
    stop = data.formatter.stop if data.has_chat else None
    if stop is not None and not stop.consistent:
        say(f"note: generation stopped at {stop.generation_eos_ids} but the chat template ends turns with "
            f"{stop.eot_token} (id {stop.eot_id}); the saved generation_config stops at {stop.fixed_eos_ids}")
    events.emit(StartEvent(
        name=spec.name, resumed_from=str(fit.resume_from) if fit.resume_from else None,
        train_rows=len(data.train.rows), eval_rows=len(data.eval.rows), total_steps=total_steps,
        per_device_batch=batches.per_device, accumulation=batches.accumulation, world_size=fit.dist.world_size,
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        truncated=data.train.truncated, dropped=data.train.dropped, skipped_rows=len(data.samples.skipped)))
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
            saved = layout.checkpoints / f"checkpoint-{step}"
            events.emit(PreemptedEvent(step=step, checkpoint=fit.output.remote(saved)))
            _finish_distributed()
            _drain(fit.uploader, layout, fit.say, timeout=settings.preempt_upload_seconds())
            raise Preempted(f"stopped at step {step} after saving {saved}",
                            "run the same command again: resume: auto continues from that checkpoint")
        if fit.data.eval.rows:
            trainer.evaluate()
        _save_final(fit.spec, trainer, fit.data, layout, fit.main)
        if fit.uploader:
            fit.uploader.tree(layout.final)  # final/COMPLETE goes last
        _finish_distributed()
        return trained
    except KubetuneError:
        raise
    except Exception as exc:  # training blew up: record it where `status` and logs will look
        events.emit(ErrorEvent(error=f"{type(exc).__name__}: {exc}"))
        try:
            _drain(fit.uploader, layout, fit.say, timeout=60)
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
                             train_runtime=trained.metrics.get("train_runtime")))
    say(f"done: {step} steps; {'model' if spec.method.type == 'full' else 'adapter'} in "
        f"{layout.merged if spec.method.type == 'full' else layout.adapter}")
    if fit.main and spec.eval.metrics and (fit.data.eval.rows or fit.data.samples.eval):
        _evaluate_after_training(layout, say)  # sends the eval metrics and report to the trackers too
        if fit.uploader:
            fit.uploader.tree(layout.eval)
    if fit.uploader and fit.trackers is not None and fit.trackers.tensorboard_dir.exists():
        fit.uploader.tree(fit.trackers.tensorboard_dir)
    if fit.uploader:
        say(f"waiting for uploads to {fit.output.uri} ...")
        _drain(fit.uploader, layout, say)
        say(f"stored in {fit.output.uri}")
    resumed = fit.output.remote(fit.resume_from) if fit.resume_from else None
    return TrainResult(layout, "finished", step, resumed)


def _drain(uploader: Uploader | None, layout: RunLayout, say: Any, timeout: float | None = None) -> None:
    """Send the event log last and wait for the queue; a failed upload is an error (local files stay)."""
    if uploader is not None:
        uploader.files(layout.events)
        uploader.close(timeout)


def _finish_distributed() -> None:
    """Ranks leave together: without this a rank that is done exits while rank 0 still saves, and
    gloo/NCCL may abort (SIGABRT) in the exiting rank when its peer's connection goes away."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _evaluate_after_training(layout: RunLayout, say: Any) -> None:
    from kubetune.evaluate.run import evaluate_run

    say("evaluating base vs tuned (eval.metrics)")
    try:
        evaluate_run(str(layout.root), log=say)
    except KubetuneError:
        raise
    except Exception as exc:
        raise TrainingError(f"training finished, but evaluation failed: {type(exc).__name__}: {exc}",
                            f"the trained run is complete in {layout.root}; rerun `kubetune eval {layout.root}`") from exc


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
            remove_incomplete(layout.checkpoints)
        return latest_complete(layout.checkpoints)
    return Path(spec.resume)  # checked by preflight


def _write_run_files(spec: RunSpec, layout: RunLayout, data: Prepared, world_size: int) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    text = spec_to_yaml(spec)
    if layout.spec.exists() and layout.spec.read_text() != text:
        # A resumed run with a changed spec: keep the earlier one rather than lose it.
        n = 1
        while (layout.root / f"spec.{n}.yaml").exists():
            n += 1
        layout.spec.rename(layout.root / f"spec.{n}.yaml")
    layout.spec.write_text(text)
    manifest = build_manifest(data.file_hashes, spec.train.seed, world_size,
                              {"model_dir": str(data.model_dir), "chat_template": data.formatter.template_source})
    layout.manifest.write_text(json.dumps(manifest, indent=2))


def training_arguments(spec: RunSpec, layout: RunLayout, batches: Any, has_eval: bool, model_dir: Path) -> Any:
    """transformers TrainingArguments for the spec; a name transformers rejects is a spec error."""
    from transformers import TrainingArguments

    from kubetune.train.model import resolve_dtype, resolve_mixed_precision, use_cpu

    dtype = resolve_dtype(spec.model.dtype, spec.resources.accelerator)
    precision = resolve_mixed_precision(spec, dtype, int(read_model_config(model_dir).get("hidden_size", 0)))
    t = spec.train
    try:
        return TrainingArguments(
            output_dir=str(layout.checkpoints),
            per_device_train_batch_size=batches.per_device,
            per_device_eval_batch_size=batches.per_device,
            gradient_accumulation_steps=batches.accumulation,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=t.optim,
            logging_steps=t.logging_steps,
            save_strategy="steps",
            save_steps=t.save_every_steps,
            save_total_limit=None,  # retention is ours: it must respect COMPLETE markers
            eval_strategy="steps" if has_eval and t.eval_every_steps else "no",
            eval_steps=t.eval_every_steps,
            seed=t.seed,
            data_seed=t.seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=use_cpu(spec),
            report_to=[n for n in spec.tracking.report_to if n != "tensorboard"] or "none",  # see TrackerRuns
            run_name=spec.name,
            disable_tqdm=True,
            remove_unused_columns=False,
            activation_checkpointing=t.gradient_checkpointing is not False,
            activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing is not False else None,
            ddp_find_unused_parameters=False,
            include_num_input_tokens_seen="no",  # counted by KubetuneTrainer without a per-step host sync
            train_sampling_strategy="random" if t.sampling == "length_buckets" else t.sampling,
            dataloader_num_workers=t.dataloader_workers,
            log_level="warning",
        )
    except ValueError as exc:
        msg = str(exc)
        field = "train.optim" if "OptimizerNames" in msg else "train.lr_scheduler" if "SchedulerType" in msg else "train"
        raise SpecError([Problem(field, msg)], hint="names follow transformers' TrainingArguments") from None


def build_trainer(spec: RunSpec, data: Prepared, layout: RunLayout, events: EventLog, batches: Any,
                  args: Any = None, uploader: Uploader | None = None) -> Any:
    from transformers import PrinterCallback, set_seed

    from kubetune.train.callbacks import CheckpointCallback, EventsCallback
    from kubetune.train.collate import ListDataset, PadCollator
    from kubetune.train.model import load_model
    from kubetune.train.progress import make_progress
    from kubetune.train.trainer import KubetuneTrainer

    quiet_progress_bars()
    # peft still reads a renamed transformers attribute; the warning is theirs to fix, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Seed before the model exists: LoRA's A matrices are initialised randomly inside load_model,
    # and the Trainer seeds only later; without this a run is not reproducible from train.seed.
    set_seed(spec.train.seed)
    # data.model_dir may hold only the tokenizer and configs (enough for validate/plan): the weights now
    model = load_model(spec, resolve_model(spec.model.base, spec.model.revision))
    has_eval = bool(data.eval.rows)
    args = args or training_arguments(spec, layout, batches, has_eval, data.model_dir)
    progress = make_progress() if DistInfo.from_env().rank == 0 else None
    trainer = KubetuneTrainer(
        length_buckets=spec.train.sampling == "length_buckets",
        checkpoint_above_tokens=_checkpoint_threshold(spec, data, batches),
        model=model,
        args=args,
        train_dataset=ListDataset(data.train.rows),
        eval_dataset=ListDataset(data.eval.rows) if has_eval else None,
        data_collator=PadCollator(data.formatter.pad_id),
        callbacks=[CheckpointCallback(layout.checkpoints, spec.train.keep_checkpoints, events, uploader)],
    )
    progress_cb = EventsCallback(events, progress, *_flops(spec, model, data))
    progress_cb.trainer = trainer
    trainer.events_callback = progress_cb
    trainer.add_callback(progress_cb)
    trainer.remove_callback(PrinterCallback)  # our EventsCallback prints progress (once, formatted)
    return trainer


def _checkpoint_threshold(spec: RunSpec, data: Prepared, batches: Any) -> int | None:
    """For gradient_checkpointing: auto, the padded-token size above which a micro-batch recomputes.

    Half the longest micro-batch: activation memory grows faster than linearly with length (attention),
    so a batch of half the tokens without checkpointing needs no more than the longest one with it."""
    if spec.train.gradient_checkpointing != "auto":
        return None
    longest = max((len(r.input_ids) for r in data.train.rows), default=0)
    return batches.per_device * longest // 2


def _flops(spec: RunSpec, model: Any, data: Prepared) -> tuple[float, float]:
    """(FLOPs per trained token, peak FLOP/s of this process's device) for the MFU estimate."""
    import torch

    from kubetune.train.flops import device_peak, flops_per_token

    cfg = getattr(model, "config", None)
    params = sum(p.numel() for p in model.parameters())
    per_token = flops_per_token(params, spec.method.type == "full", getattr(cfg, "num_hidden_layers", 0),
                                getattr(cfg, "hidden_size", 0), data.train.stats()["mean"] / 2)
    on_gpu = torch.cuda.is_available() and spec.resources.accelerator != "cpu"
    kind = "cpu" if not on_gpu else (spec.resources.accelerator if spec.resources.accelerator != "auto" else "nvidia")
    name = torch.cuda.get_device_name(0) if on_gpu else None
    # tokens/s is gathered over all ranks, so the peak is that of every device (CPU ranks share the cores).
    return per_token, device_peak(kind, name, devices=DistInfo.from_env().world_size)


def _save_final(spec: RunSpec, trainer: Any, data: Prepared, layout: RunLayout, main: bool) -> None:
    target = layout.merged if spec.method.type == "full" else layout.adapter
    trainer.save_model(str(target))  # main process only; a PEFT model saves just the adapter
    if main:
        stop = data.formatter.stop if data.has_chat else None
        save_tokenizer_and_config(data.model_dir, data.formatter.template, stop, data.formatter.pad_id, target)
        layout.final_complete.write_text("ok\n")
