"""How many engine workers `--workers auto` picks, and each one's share of the threads."""

from __future__ import annotations

import pytest
import torch

from kubetune.serve import workers
from kubetune.serve.workers import WORKER_WEIGHTS, auto_workers, worker_threads


def model_of(nbytes: int) -> torch.nn.Module:
    return torch.nn.Embedding(nbytes // 4 // 256, 256)  # fp32


@pytest.mark.parametrize(("nbytes", "threads", "expected"), [
    (800_000, 2, 1),                   # the quickstart's model: a step is mostly fixed cost, one process
    (85_000_000, 2, 2),                # the bench's 21M model: two workers
    (85_000_000, 1, 1),                # one core (or OMP_NUM_THREADS=1): nothing to share out
    (WORKER_WEIGHTS[0] - 4096, 8, 1),
])
def test_auto_workers(monkeypatch: pytest.MonkeyPatch, nbytes: int, threads: int, expected: int) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert auto_workers([model_of(nbytes)]) == expected


def test_shared_weights_count_once_and_big_weights_stay_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    model = model_of(12 << 20)
    assert auto_workers([model, model]) == 1  # one model served under two names: 12 MiB, not 24
    monkeypatch.setattr(workers, "WORKER_WEIGHTS", (1 << 20, 8 << 20))
    assert auto_workers([model]) == 1


def test_worker_threads() -> None:
    assert [worker_threads(2, t) for t in (1, 2, 3, 16)] == [1, 1, 1, 8]
