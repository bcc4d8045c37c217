"""The upload process behind runs.sync.Uploader: reads jobs (JSON lines) on stdin, uploads them
in order, reports on stdout; ends when stdin closes and the queue is done, or when its parent dies.

    python -m kubetune.runs.upload_worker URI ROOT KEEP RETRY_SECONDS
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def _die_with_parent() -> None:
    """A SIGKILLed training process must not leave an uploader behind (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    try:
        os.nice(10)  # the cores belong to training first
    except OSError:
        pass
    from kubetune.storage.store import Store
    from kubetune.runs.sync import UploadWorker, GaveUp, UploadJob

    uri, root, keep, retry = argv[0], Path(argv[1]), int(argv[2]), float(argv[3])
    out_lock = threading.Lock()

    def report(**fields: Any) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()

    worker = UploadWorker(Store(uri), root, keep, retry, lambda m: report(kind="log", message=m))
    jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read() -> None:  # stdin is read while uploads run, so the parent never blocks writing jobs
        for line in sys.stdin:
            if line.strip():
                jobs.put(json.loads(line))
        jobs.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (raw := jobs.get()) is not None:
        job = UploadJob(raw["kind"], [Path(p) for p in raw["paths"]], raw.get("step"))
        try:
            worker.run(job)
            report(kind="done", step=job.step)
        except GaveUp as exc:
            report(kind="failure", message=str(exc), step=job.step)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            report(kind="failure", message=f"{type(exc).__name__}: {exc}", step=job.step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
