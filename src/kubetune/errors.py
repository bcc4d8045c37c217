"""kubetune's exceptions. Every error a user can cause is one of these; the CLI prints it and exits.

The tree::

    KubetuneError                 exit 1  something failed; the message says what and what to do
    ├── UsageError                exit 2  the user's input is wrong (spec, data, flags, paths)
    │   ├── SpecError             exit 2  the run spec: a list of Problems (field path, line, message)
    │   └── DataError             exit 2  the datasets: a list of Problems (file:line, message)
    ├── TrainingError             exit 1  training itself failed (not a configuration mistake)
    ├── TransientError            exit 75  infrastructure that may work again: storage, Hub or Kubernetes API
    │   │                                  unreachable, timeouts, HTTP 5xx, throttling (EX_TEMPFAIL)
    │   └── LeaseHeld             exit 75  another trainer holds the run's lease: it is being written now
    └── Preempted                 exit 143  stopped by SIGTERM/Ctrl-C after saving a checkpoint: rerun to resume

The codes are a contract that Kubernetes acts on (podFailurePolicy in k8s/render/train.py): 2 fails
the Job at once ("fix your input"), 75 and 1 are retried within backoffLimit (each retry resumes from
the newest complete checkpoint), and a pod disrupted by preemption or a drain is not counted.
Errors are classified by exception type and HTTP status, never by message text.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EXIT_FAILURE",
    "EXIT_PREEMPTED",
    "EXIT_TRANSIENT",
    "EXIT_USAGE",
    "DataError",
    "KubetuneError",
    "LeaseHeld",
    "Preempted",
    "Problem",
    "SpecError",
    "TrainingError",
    "TransientError",
    "UsageError",
    "capped",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h): try again later; Kubernetes retries it
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a terminated process reports; retried by Kubernetes


@dataclass(frozen=True)
class Problem:
    """One thing wrong, and where: ``where`` is ``file:line``, a field path, or both."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def capped(problems: list[Problem], limit: int = 200) -> list[Problem]:
    """The first ``limit`` problems and a count of the rest: enough to fix a pattern, short enough to read."""
    if len(problems) <= limit:
        return list(problems)
    return [*problems[:limit], Problem("", f"... and {len(problems) - limit} more")]


class KubetuneError(Exception):
    """Base of all kubetune errors; ``hint`` says what to do next."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class UsageError(KubetuneError):
    exit_code = EXIT_USAGE


class _ProblemList(UsageError):
    title = "problems"

    def __init__(self, problems: list[Problem], hint: str | None = None, title: str | None = None) -> None:
        self.problems = list(problems)
        if title:
            self.title = title
        super().__init__(f"{len(self.problems)} {self.title}", hint)

    def render(self) -> str:
        lines = [f"error: {self.message}:"]
        lines += [f"  {p}" for p in self.problems]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class SpecError(_ProblemList):
    title = "problem(s) in the run spec"


class DataError(_ProblemList):
    title = "problem(s) in the data"


class TrainingError(KubetuneError):
    exit_code = EXIT_FAILURE


class TransientError(KubetuneError):
    """The infrastructure failed in a way that may pass: retrying the same command can succeed."""

    exit_code = EXIT_TRANSIENT


class LeaseHeld(TransientError):
    """Another trainer is writing this run (its lease is live)."""


class Preempted(KubetuneError):
    exit_code = EXIT_PREEMPTED
