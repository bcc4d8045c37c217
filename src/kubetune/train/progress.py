"""Progress for humans and for pod logs: a live bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any, Protocol

from kubetune.artifacts.events import StepEvent, format_eta


def step_line(rec: StepEvent) -> str:
    """`step 30/400  loss 1.2345  lr 2.00e-04  tok/s 950  mfu 1.2%  eta 0:00:21` (status parses pod logs by it)."""
    parts = [f"step {rec.step}/{rec.total_steps}"]
    for value, fmt in ((rec.loss, "loss {:.4f}"), (rec.learning_rate, "lr {:.2e}"), (rec.tokens_per_s, "tok/s {:.0f}"),
                       (rec.mfu, "mfu {:.1%}")):
        if value is not None:
            parts.append(fmt.format(value))
    parts.append(f"eta {format_eta(rec.eta_s)}")
    return "  ".join(parts)


class Progress(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def update(self, rec: StepEvent) -> None: ...
    def tick(self, step: int) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class PlainProgress:
    """One line per logged step: readable in `kubectl logs` and CI output."""

    def start(self, total: int, done: int) -> None:
        print(f"training: {total} optimizer steps" + (f", resuming at step {done}" if done else ""), flush=True)

    def update(self, rec: StepEvent) -> None:
        print(step_line(rec), flush=True)

    def tick(self, step: int) -> None:
        pass  # plain output only at logging steps

    def message(self, text: str) -> None:
        print(text, flush=True)

    def stop(self) -> None:
        pass


class RichProgress:
    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress as Bar, TextColumn

        self.bar = Bar(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"))
        self.task: Any = None

    def start(self, total: int, done: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def update(self, rec: StepEvent) -> None:
        self.bar.update(self.task, completed=rec.step, info=step_line(rec).split("  ", 1)[-1])

    def tick(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def message(self, text: str) -> None:
        self.bar.console.print(text)

    def stop(self) -> None:
        self.bar.stop()


def make_progress() -> Progress:
    return RichProgress() if sys.stdout.isatty() else PlainProgress()
