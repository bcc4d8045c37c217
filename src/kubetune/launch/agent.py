"""torchrun's agent, without its traceback: when a rank fails, torchrun's `main` raises
ChildFailedError and Python prints a traceback and a summary box on top of the rank's own clear
error. The rank already said what went wrong (and left its exit code for the launcher); the agent
exits 1 with one line."""

from __future__ import annotations

import sys


def main() -> None:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # its per-failure log lines ("failed (exitcode: 2) ...", "Sending process ... SIGTERM") repeat, in
    # torch's internal terms, what the rank and the line below say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    try:
        torchrun()
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"torchrun: rank {rank} exited with code {failure.exitcode}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
