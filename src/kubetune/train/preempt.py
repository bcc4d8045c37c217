"""Graceful stop: SIGTERM (Kubernetes preemption, node drain) or a first Ctrl-C finishes the current
optimizer step, writes a COMPLETE checkpoint and exits with EXIT_PREEMPTED; `resume: auto` then
continues from exactly that step. A second signal stops at once (the last checkpoint still stands)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from transformers import TrainerCallback


class GracefulStop:
    def __init__(self, say: Any = print) -> None:
        self.signum: int | None = None
        self.say = say
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.say(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                 "(send it again to stop at once)")

    @property
    def requested(self) -> bool:
        return self.signum is not None


class StopCallback(TrainerCallback):
    """Turns a stop request into save + stop at the end of the step, on every rank at the same step."""

    def __init__(self, stop: GracefulStop) -> None:
        self.stop = stop

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        requested = self.stop.requested
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # Ranks may receive the signal a step apart; one stopping alone would leave the others
            # waiting in a collective. A one-element all-reduce per step keeps them in step.
            import torch

            flag = torch.tensor([1.0 if requested else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
            if requested and self.stop.signum is None:
                self.stop.signum = signal.SIGTERM
        if requested:
            control.should_save = True
            control.should_training_stop = True
        return control
