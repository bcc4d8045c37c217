"""A tenant's `python` grader, run in its own process (see _sandbox_child.py for what that process can
do): empty environment, empty working directory, a seccomp filter that leaves no files, network,
subprocesses or signals to others, and limits on memory, CPU time and wall time per sample.

The parent here owns the clock: it reads one result line per sample and kills the process group of
a grader that does not answer in time; that sample scores as `unresponsive_reward_error` and a fresh
process grades the rest (a process that dies — CPU or memory limit, a crash — likewise). Nothing the
process writes is trusted beyond its own scores: lines are size-capped and parsed as data.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["Outcome", "SandboxLimits", "check_python", "run_python", "sandbox_problem"]

CHILD = Path(__file__).with_name("_sandbox_child.py")
MAX_LINE = 64 * 1024
MAX_RESTARTS = 3
_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class SandboxLimits:
    seconds: float = 5.0           # wall time a sample may take
    memory_mb: int = 1024          # address space of the process (numpy alone maps ~300 MiB)
    startup_seconds: float = 10.0  # starting the interpreter and loading the grader


@dataclass(frozen=True)
class Outcome:
    """A sample's score, or why it has none: `kind` is OpenAI's error name."""
    score: float | None
    kind: str | None = None
    detail: str | None = None


def run_python(source: str, cases: list[tuple[dict[str, Any], Any]], limits: SandboxLimits = SandboxLimits()
               ) -> list[Outcome]:
    """`grade(sample, item)` of `source` for each (sample, item), in as few processes as the grader allows."""
    try:
        return _run(source, cases, limits)
    except Exception as exc:  # noqa: BLE001 - whatever the grader made happen, a grading never crashes its caller
        return [Outcome(None, "python_grader_server_error", f"{type(exc).__name__}: {exc}"[:300]) for _ in cases]


def _run(source: str, cases: list[tuple[dict[str, Any], Any]], limits: SandboxLimits) -> list[Outcome]:
    out: list[Outcome | None] = [None] * len(cases)
    start, restarts = 0, 0
    while start < len(cases):
        fatal, done, failure = _one_process(source, cases, start, out, limits)
        if fatal is not None:
            return [o or Outcome(None, "python_grader_runtime_error", fatal) for o in out]
        if failure is None:
            break
        out[done] = failure
        start, restarts = done + 1, restarts + 1
        if restarts > MAX_RESTARTS:
            reason = f"not graded: the grader failed {restarts} times in this batch ({failure.detail})"
            return [o or Outcome(None, failure.kind, reason) for o in out]
    return [o or Outcome(None, "python_grader_server_error", "no result") for o in out]


def check_python(source: str, limits: SandboxLimits = SandboxLimits()) -> str | None:
    """Why the grader cannot be loaded (a syntax error, no grade function, an import that is not
    there, ...), or None: loading runs the module's top level in the sandbox."""
    try:
        fatal, _, failure = _one_process(source, [], 0, [], limits)
    except Exception as exc:  # noqa: BLE001
        return f"the grader could not be loaded: {type(exc).__name__}"
    return fatal or (failure.detail if failure else None)


@lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """Why python graders cannot run on this machine (no libseccomp, a kernel without seccomp), or None."""
    try:
        result = run_python("def grade(sample, item):\n    return 1.0\n", [({}, {})])
    except OSError as exc:
        return f"the sandbox process does not start: {exc}"
    if result[0].score != 1.0:
        return f"the sandbox does not load here: {result[0].detail}"
    return None


def _one_process(source: str, cases: list[tuple[dict[str, Any], Any]], start: int, out: list[Outcome | None],
                 limits: SandboxLimits) -> tuple[str | None, int, Outcome | None]:
    """Grade cases[start:] in one process: (fatal load error, index of the failed sample, its outcome)."""
    cpu = int(limits.startup_seconds + limits.seconds * max(1, len(cases) - start)) + 1
    request = json.dumps({"source": source, "samples": [{"sample": s, "item": i} for s, i in cases[start:]]}).encode()
    with tempfile.TemporaryDirectory(prefix="kubetune-grader-") as cwd:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(CHILD), json.dumps({"memory": limits.memory_mb << 20, "cpu": cpu})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(_ENV), cwd=cwd,
            close_fds=True, start_new_session=True)
        log = _Tail(proc.stderr)
        try:
            _feed(proc, request)
            return _read(proc, start, len(cases), out, limits, log)
        finally:
            _kill(proc)
            log.join()


def _feed(proc: subprocess.Popen[bytes], request: bytes) -> None:
    assert proc.stdin is not None
    try:  # the child reads all of stdin before anything else; it may die first (a memory limit at start)
        proc.stdin.write(request)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass


def _read(proc: subprocess.Popen[bytes], start: int, total: int, out: list[Outcome | None], limits: SandboxLimits,
          log: _Tail) -> tuple[str | None, int, Outcome | None]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    buffer, loaded = b"", False
    current = start
    deadline = time.monotonic() + limits.startup_seconds + limits.seconds
    while current < total or not loaded:
        line, buffer, ended = _next_line(fd, selector, buffer, deadline)
        if line is None:
            if ended:
                why = _ended(proc, log)
                if not loaded:
                    return f"the grader process ended while loading ({why})", current, None
                return None, current, Outcome(None, "python_grader_runtime_error", f"the grader process ended ({why})")
            if not loaded:
                return f"the grader did not load within {limits.startup_seconds:g} s", current, None
            return None, current, Outcome(None, "unresponsive_reward_error",
                                          f"no score within {limits.seconds:g} s")
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # not a result line: the grader wrote to the pipe itself
        if not isinstance(record, dict):
            continue
        if not loaded:
            if "fatal" in record:
                return str(record["fatal"])[:1000], current, None
            loaded = record.get("loaded") is True
        elif record.get("i") == current - start:
            out[current] = _outcome(record)
            current += 1
        else:
            continue
        deadline = time.monotonic() + limits.seconds
    return None, current, None


def _outcome(record: dict[str, Any]) -> Outcome:
    """A result line as an Outcome; anything but a finite number is the grader's error (the line may
    have been written by the grader itself: NaN, a 400-digit integer, ...)."""
    score = record.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        try:
            value = float(score)
        except OverflowError:
            value = math.inf
        if math.isfinite(value):
            return Outcome(value)
        return Outcome(None, "python_grader_runtime_error", "grade returned a number that is not finite")
    return Outcome(None, "python_grader_runtime_error", str(record.get("error"))[:1000])


def _next_line(fd: int, selector: selectors.BaseSelector, buffer: bytes, deadline: float
               ) -> tuple[bytes | None, bytes, bool]:
    """(line, rest, ended): the next line, or None with ended=True at EOF / False at the deadline."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            buffer = b""  # a line this long is not ours
        left = deadline - time.monotonic()
        if left <= 0 or not selector.select(left):
            return None, buffer, False
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, buffer, True
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line, rest, False


def _ended(proc: subprocess.Popen[bytes], log: _Tail) -> str:
    try:
        code = proc.wait(timeout=0.2)
    except subprocess.TimeoutExpired:  # alive with its output closed: no result will come
        return "it closed its output"
    if code < 0:
        name = signal.Signals(-code).name
        hint = {"SIGXCPU": "CPU time limit", "SIGKILL": "CPU or memory limit", "SIGSEGV": "a crash"}.get(name)
        return f"{name}{f': {hint}' if hint else ''}"
    last = log.text().strip().splitlines()
    return f"exit code {code}{f': {last[-1][:300]}' if last else ''}"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None and not stream.closed:
            stream.close()


class _Tail(threading.Thread):
    """Drains the grader's stderr (so a chatty grader never blocks on it), keeping the last 4 KiB."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream, self.kept = stream, b""
        self.start()

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read1(65536), b""):
            self.kept = (self.kept + chunk)[-4096:]
        self.stream.close()

    def text(self) -> str:
        return self.kept.decode(errors="replace")
