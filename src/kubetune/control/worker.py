"""The local backend: jobs run as `kubetune validate` and `kubetune train` processes on this machine.

One thread moves jobs along: it validates new jobs' files, claims queued jobs up to the concurrency
setting (a conditional UPDATE, so replicas sharing a database never run a job twice), watches the
processes and records how each ended. The exit codes are kubetune's contract (errors.py): 0 done,
2 the input is wrong (failed at once), 75 try again (requeued, up to MAX_ATTEMPTS), 143 stopped
after a checkpoint (cancelled if the user asked, else requeued: it resumes).

Training processes die with the server (PDEATHSIG: SIGTERM, so they checkpoint first). A server
that starts again finds its jobs still `running` and starts them again; `kubetune train --wait`
resumes from the newest complete checkpoint, waiting out the lease of a process that outlived it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import settings
from kubetune.artifacts.events import CheckpointEvent, CheckpointStoredEvent, ErrorEvent
from kubetune.control.environment import job_environment
from kubetune.control.files import remove_upload
from kubetune.control.policy import Budgets, ServerConfig
from kubetune.control.results import publish_results
from kubetune.control.runinfo import trained_tokens
from kubetune.runs.view import RunView
from kubetune.control.records import Records
from kubetune.errors import EXIT_PREEMPTED, EXIT_TRANSIENT, EXIT_USAGE, KubetuneError
from kubetune.spec.load import load_spec_text

__all__ = ["LocalWorker"]

MAX_ATTEMPTS = 3
STOP_GRACE_S = 60.0
SWEEP_EVERY_S = 60.0
SWEEP_BATCH = 50


@dataclass
class _Proc:
    kind: str                       # validate | train
    popen: subprocess.Popen[bytes]
    log: Path
    signalled: bool = False


@dataclass
class LocalWorker:
    records: Records
    home: Path                      # jobs/JOB_ID/{spec.yaml, validate.log, train.log}
    worker_id: str
    concurrency: int = 1
    config: ServerConfig = field(default_factory=ServerConfig)
    storage: str | None = None      # where files/ live (result files are written there); default: home
    poll_s: float = 0.5
    _procs: dict[str, _Proc] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _next_sweep: float = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kubetune-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop training processes after their checkpoint (SIGTERM); their jobs stay `running` and
        resume when a server with this worker id starts again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 10)

    def cancelled(self, job: dict[str, Any]) -> None:
        """Nothing to do at once: the next tick of whichever replica runs the job stops its process."""

    def paused(self, job: dict[str, Any]) -> None:
        """As cancelled: the next tick stops the process at a checkpoint; resume queues the job again."""

    def unserve(self, job: dict[str, Any]) -> None:
        """A model about to be deleted: served here only by the ModelHub, which forgets it."""

    def _shutdown(self) -> None:
        # In the thread that started the processes: their PDEATHSIG fires when it ends, so it ends last.
        for job_id, proc in self._procs.items():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
                self.records.add_event(job_id, "The server is stopping: training stops at a checkpoint and resumes "
                                             "when the server starts again", "warn")
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self._procs.values():
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the worker
                print(f"worker: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self._stop.wait(self.poll_s)
        self._shutdown()

    backend = "local"

    def tick(self) -> None:
        self._reap()
        self._stop_cancelled()
        if time.monotonic() >= self._next_sweep:  # a minute apart, a batch at a time: never a long tick
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            self.remove_expired(time.time())
        for job in self.records.jobs_in(["validating_files"], self.backend):
            if job["id"] in self._procs or not _due(job):
                continue
            if sum(p.kind == "validate" for p in self._procs.values()) >= self.config.validations:
                break  # a bounded pool: a flood of jobs waits its turn instead of starting a process each
            if self._mine(job) or self.records.update_job(job["id"], expect=["validating_files"], unclaimed=True,
                                                        worker=self.worker_id):
                self._spawn(job, "validate")
        self._advance()

    def _mine(self, job: dict[str, Any]) -> bool:
        return job["worker"] == self.worker_id

    def remove_expired(self, now: float) -> list[str]:
        """Files past their expires_at (and read by no active job): their content and record removed."""
        gone = []
        for row in self.records.expired_files(now)[:SWEEP_BATCH]:
            try:
                remove_upload(row["uri"])
            except (KubetuneError, OSError) as exc:  # storage away: the next tick tries again
                print(f"worker: could not remove expired {row['id']}: {exc}", file=sys.stderr, flush=True)
                continue
            self.records.delete_file(row["owner"], row["id"])
            gone.append(row["id"])
        return gone

    def _stop_cancelled(self) -> None:
        """A cancelled or paused job's process stops at a checkpoint."""
        for job in self.records.jobs_in(["cancelled", "paused"], self.backend):
            proc = self._procs.get(job["id"])
            if proc is not None and not proc.signalled and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)  # training saves a checkpoint, then exits 143
                proc.signalled = True

    def _advance(self) -> None:
        """Resume this replica's running jobs after a restart; start queued jobs up to the concurrency."""
        for job in self.records.jobs_in(["running"], self.backend):
            if self._mine(job) and job["id"] not in self._procs:
                self.records.add_event(job["id"], "Resuming after a server restart")
                self._spawn(job, "train")
        for job in self.records.jobs_in(["paused"], self.backend):
            if self._mine(job) and job["id"] not in self._procs:  # paused, and its process died with a server
                self.records.update_job(job["id"], expect=["paused"], worker=None)
        running = Counter(j["owner"] for j in self.records.jobs_in(["running"], self.backend))
        # A key's jobs start in the order it created them: one still validating holds back its later ones
        # (validations run side by side, and the newer may finish first).
        validating: dict[str, int] = {}
        for j in self.records.jobs_in(["validating_files"], self.backend):
            validating[j["owner"]] = min(validating.get(j["owner"], j["n"]), j["n"])
        # (A job resumed while its paused process is still on its way out waits for it to end.)
        queued = [j for j in self.records.jobs_in(["queued"], self.backend)
                  if _due(j) and j["n"] < validating.get(j["owner"], j["n"] + 1) and not self._training(j["id"])]
        while queued and sum(p.kind == "train" for p in self._procs.values()) < self.concurrency:
            # Fair across keys: the oldest job of the key training least goes first, and a key at its
            # own limit waits however long its queue is.
            ready = [j for j in queued if running[j["owner"]] < self._budgets(j["owner"]).max_running_jobs]
            if not ready:
                break
            job = min(ready, key=lambda j: (running[j["owner"]], j["n"]))
            queued.remove(job)
            if self.records.update_job(job["id"], expect=["queued"], status="running", worker=self.worker_id):
                running[job["owner"]] += 1
                self.records.add_event(job["id"], f"Fine-tuning job started (worker {self.worker_id})")
                self._spawn(job, "train")

    def _training(self, job_id: str) -> bool:
        proc = self._procs.get(job_id)
        return proc is not None and proc.kind == "train"

    def _budgets(self, owner: str) -> Budgets:
        return self.config.budgets_for(self.config.team_of(owner, self.records.key_name(owner)))

    def _spawn(self, job: dict[str, Any], kind: str) -> None:
        folder = self.home / "jobs" / job["id"]
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / "spec.yaml"
        spec.write_text(job["spec"])
        log = folder / f"{kind}.log"
        cmd = [sys.executable, "-m", "kubetune", kind, str(spec)] + (["--wait"] if kind == "train" else [])
        with log.open("ab") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._environment(job), cwd=folder, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._procs[job["id"]] = _Proc(kind, popen, log)

    def _environment(self, job: dict[str, Any]) -> dict[str, str]:
        """Only what this job needs of the server's environment (environment.py)."""
        spec = load_spec_text(job["spec"], f"job {job['id']}")
        return {**job_environment(spec, os.environ, self.config.env), "PYTHONUNBUFFERED": "1"}

    def _reap(self) -> None:
        for job_id, proc in list(self._procs.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            del self._procs[job_id]
            job = self.records.job(None, job_id)
            if job is None:
                continue
            if proc.kind == "validate":
                self._validated(job, code, proc.log)
            else:
                self._trained(job, code, proc.log)

    def _validated(self, job: dict[str, Any], code: int, log: Path) -> None:
        if code == 0:
            if self.records.update_job(job["id"], expect=["validating_files"], status="queued", worker=None):
                self.records.add_event(job["id"], "Files validated, moving job to queued state")
            return
        text = _tail(log, 40)
        if code == EXIT_TRANSIENT and self._retry(job, "validating_files", code, _readable(text, job)):
            return
        param = "training_file"
        if job.get("validation_file") and job["validation_file"] in text:
            param = "validation_file"
        message = _readable(text, job)
        code_name = "invalid_file" if code == EXIT_USAGE else "validation_failed"
        self._fail(job, {"code": code_name, "message": message, "param": param if code == EXIT_USAGE else None},
                   expect=["validating_files"])

    def _trained(self, job: dict[str, Any], code: int, log: Path) -> None:
        events = RunView(job["run_uri"]).events()
        tokens = trained_tokens(events)
        now = int(time.time())
        if job["status"] == "cancelled":
            self.records.update_job(job["id"], trained_tokens=tokens)
            self.records.add_event(job["id"], "Training stopped; the last complete checkpoint is kept")
            return
        if job["status"] == "paused" and code != 0:
            # its process is gone: the job holds no worker now, and resume may queue it
            self.records.update_job(job["id"], expect=["paused"], trained_tokens=tokens, worker=None)
            steps = [e.step for e in events if isinstance(e, (CheckpointEvent, CheckpointStoredEvent))]
            at = f" at step {max(steps)}" if steps else ""
            self.records.add_event(job["id"], f"Training paused{at}: the checkpoint is kept and resume continues from it")
            return
        if code == 0:  # (a job paused as its last step finished has finished: it succeeds)
            self.succeed(job, events, ["running", "paused"], finished_at=now, trained_tokens=tokens)
            return
        if self._stop.is_set():
            return  # stopped with the server: stays running, resumes on restart
        if code in (EXIT_TRANSIENT, EXIT_PREEMPTED):
            self.records.update_job(job["id"], trained_tokens=tokens)
            if self._retry(job, "running", code, "it resumes from its last checkpoint"):
                return
        errors = [e.error for e in events if isinstance(e, ErrorEvent)]
        message = errors[-1] if errors else _readable(_tail(log, 20), job)
        self._fail(job, {"code": "invalid_request" if code == EXIT_USAGE else "training_failed",
                         "message": message, "param": None}, expect=["running"], tokens=tokens)

    def succeed(self, job: dict[str, Any], events: list[Any], expect: list[str], **values: Any) -> bool:
        """Mark the job succeeded with its result file in one update, so no reader sees a succeeded job
        without it; the file is stored first and removed again if the job changed meanwhile."""
        result = None
        try:
            result = publish_results(self.records, self.storage or str(self.home), job, events)
        except (KubetuneError, OSError) as exc:
            self.records.add_event(job["id"], f"Could not records the result file: {exc}", "warn")
        if not self.records.update_job(job["id"], expect=expect, status="succeeded",
                                     result_files=[result["id"]] if result else None, **values):
            if result is not None:  # cancelled, or another replica got there first
                remove_upload(result["uri"])
                self.records.delete_file(job["owner"], result["id"])
            return False
        self.records.add_event(job["id"], f"New fine-tuned model created: {job['fine_tuned_model']}")
        self.records.add_event(job["id"], "The job has successfully completed")
        return True

    def _retry(self, job: dict[str, Any], status: str, code: int, why: str) -> bool:
        """Try a job again later (exit 75: storage or the Hub may answer then; 143: stopped by someone
        else), with a longer wait each time; False once MAX_ATTEMPTS are spent."""
        attempt = job["attempts"] + 1
        if attempt >= MAX_ATTEMPTS:
            return False
        wait = settings.job_retry_seconds() * attempt
        again = "validating_files" if status == "validating_files" else "queued"
        if self.records.update_job(job["id"], expect=[status], status=again, worker=None, attempts=attempt,
                                 retry_at=time.time() + wait):
            first = why.splitlines()[0] if why else "no message"
            self.records.add_event(job["id"], f"Exit {code} ({first}); trying again in {wait:.0f} s "
                                            f"(attempt {attempt + 1} of {MAX_ATTEMPTS})", "warn")
        return True

    def _fail(self, job: dict[str, Any], error: dict[str, Any], expect: list[str], tokens: int | None = None) -> None:
        if self.records.update_job(job["id"], expect=expect, status="failed", error=error,
                                 finished_at=int(time.time()), trained_tokens=tokens):
            self.records.add_event(job["id"], f"Job failed: {error['message']}", "error")


def _due(job: dict[str, Any]) -> bool:
    return job.get("retry_at") is None or job["retry_at"] <= time.time()




def _tail(log: Path, lines: int) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _readable(text: str, job: dict[str, Any]) -> str:
    """A process's error as the caller should read it: from `error:` on, and an uploaded file named as
    the caller named it (train.jsonl:3, not its storage path or the local cache copy of a bucket's)."""
    start = text.rfind("error:")
    text = text[start + len("error:"):] if start >= 0 else text
    for key in ("training_uri", "validation_uri"):
        uri = job.get(key)
        if uri:
            name = uri.rsplit("/", 1)[-1]
            text = re.sub(rf"[^\s'\"(]*/{re.escape(name)}", name, text)
    return text.strip() or "the process ended without a message"


def _die_with_parent() -> None:
    """In the child: SIGTERM when the server dies (Linux), so training checkpoints instead of running on
    as an orphan that a restarted server would wait for."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
