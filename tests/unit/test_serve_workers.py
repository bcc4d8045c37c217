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


def test_workers_that_cannot_start_fall_back_under_auto_and_fail_when_asked_for(monkeypatch: pytest.MonkeyPatch,
                                                                                 tiny_model) -> None:
    from kubetune.errors import UsageError
    from kubetune.serve import engine as eng

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot share these weights")

    monkeypatch.setattr(eng, "WorkerPool", broken)
    monkeypatch.setattr(eng, "auto_workers", lambda models: 2)
    engine = eng.load_engine([str(tiny_model)], workers="auto")
    try:
        assert engine.workers == 1 and "cannot share these weights" in engine.note
        name = engine.names[0]
        ids = engine.encode_chat(name, [{"role": "user", "content": "hi"}])
        done = engine.generate(name, ids, eng.GenerationParams(max_tokens=4, temperature=0), lambda new: None)
        assert done.completion_tokens > 0  # batching in this process instead
    finally:
        engine.close()
    with pytest.raises(UsageError, match="--workers 2: the engine workers could not start: cannot share"):
        eng.load_engine([str(tiny_model)], workers=2)


def test_blocking_generate_through_two_workers_and_close(tiny_model) -> None:
    """`kubetune chat RUN`'s path (no event loop): tokens come through a worker; close ends the workers."""
    from kubetune.serve.engine import GenerationParams, load_engine

    engine = load_engine([str(tiny_model)], workers=2)
    pool = engine.served[engine.names[0]].lane.pool  # type: ignore[union-attr]
    try:
        name = engine.names[0]
        ids = engine.encode_chat(name, [{"role": "user", "content": "hi"}])
        got: list[int] = []
        done = engine.generate(name, ids, GenerationParams(max_tokens=6, temperature=0), got.extend)
        assert done.finish_reason in ("stop", "length") and len(got) >= done.completion_tokens > 0
    finally:
        engine.close()
    assert all(not w.process.is_alive() for w in pool.workers)
