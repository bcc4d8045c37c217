"""The local worker's choices, on a real store: jobs start fairly across keys (the key training
least goes first, oldest job first within a key), a key at its running limit waits however long its
queue is, and validations run in a bounded pool. Processes are recorded, not started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.control.policy import Budgets, ServerConfig, Team
from kubetune.control.records import Records
from kubetune.control.worker import LocalWorker, _Proc


class _Running:
    def poll(self) -> None:
        return None


class RecordingWorker(LocalWorker):
    started: list[tuple[str, str]]

    def _spawn(self, job: dict[str, Any], kind: str) -> None:
        self.started.append((job["id"], kind))
        self._procs[job["id"]] = _Proc(kind, _Running(), Path("/dev/null"))  # type: ignore[arg-type]


def worker(tmp_path: Path, jobs: list[tuple[str, str, str]], concurrency: int, config: ServerConfig) -> RecordingWorker:
    store = Records(f"sqlite:///{tmp_path / 'control.db'}")
    for key in ("key-a", "key-b", "key-c"):
        store.add_key(key, key.removeprefix("key-"), key)
    for n, (job_id, owner, status) in enumerate(jobs):
        store.add_job(id=job_id, owner=owner, model="m", training_file="f", training_uri="u", seed=1, method={},
                      settings={}, spec="", status=status, backend="local", run_uri=f"runs/{job_id}",
                      fine_tuned_model=f"ft:{job_id}", attempts=0, created_at=n)
    w = RecordingWorker(store, tmp_path, "w1", concurrency, config=config)
    w.started = []
    return w


def test_queued_jobs_start_fairly_across_keys(tmp_path: Path) -> None:
    jobs = [("a1", "key-a", "queued"), ("a2", "key-a", "queued"), ("a3", "key-a", "queued"),
            ("b1", "key-b", "queued"), ("c1", "key-c", "queued")]
    w = worker(tmp_path, jobs, 4, ServerConfig(budgets=Budgets(max_running_jobs=3)))
    w._advance()
    assert [j for j, _ in w.started] == ["a1", "b1", "c1", "a2"]  # one key's long queue does not starve the others


def test_a_key_at_its_running_limit_waits(tmp_path: Path) -> None:
    jobs = [("a1", "key-a", "running"), ("a2", "key-a", "queued"), ("b1", "key-b", "queued")]
    config = ServerConfig(budgets=Budgets(max_running_jobs=1),
                          teams={"big": Team(keys=["b"], budgets=Budgets(max_running_jobs=5))})
    w = worker(tmp_path, [*jobs, ("b2", "key-b", "queued")], 8, config)
    w._procs["a1"] = _Proc("train", _Running(), Path("/dev/null"))  # type: ignore[arg-type]
    w._advance()
    assert sorted(j for j, _ in w.started) == ["b1", "b2"]  # key-a holds its one slot; team big may run 5


def test_validations_run_in_a_bounded_pool(tmp_path: Path) -> None:
    jobs = [(f"v{i}", "key-a", "validating_files") for i in range(6)]
    w = worker(tmp_path, jobs, 1, ServerConfig(validations=2))
    w.tick()
    w.tick()
    assert w.started == [("v0", "validate"), ("v1", "validate")]


def test_a_keys_jobs_start_in_the_order_it_created_them(tmp_path: Path) -> None:
    jobs = [("a1", "key-a", "validating_files"), ("a2", "key-a", "queued"), ("b1", "key-b", "queued")]
    w = worker(tmp_path, jobs, 4, ServerConfig(validations=1))
    w._procs["a1"] = _Proc("validate", _Running(), Path("/dev/null"))  # type: ignore[arg-type]
    w._advance()
    assert w.started == [("b1", "train")]  # a2 waits for a1 (still validating); another key is not held back
    w.records.update_job("a1", status="queued")
    w._advance()
    assert [j for j, _ in w.started] == ["b1", "a1", "a2"]
