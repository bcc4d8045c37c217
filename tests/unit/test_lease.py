"""The local lease (flock): one writer per run folder, a clear error naming the holder, and a failed
start that leaves no folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.errors import EXIT_TRANSIENT, LeaseHeld
from kubetune.runs.lease import FileLease


def test_a_second_local_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    first = FileLease(run, "trainer-a", print)
    assert first.acquire(wait=False) is None and not first.lost
    second = FileLease(run, "trainer-b", print)
    with pytest.raises(LeaseHeld) as info:
        second.acquire(wait=False)
    assert info.value.exit_code == EXIT_TRANSIENT
    assert f"run {run} is being written by trainer-a" in info.value.message and "--wait" in (info.value.hint or "")
    first.release()
    assert not run.exists()  # the lease alone had created it: nothing is left behind
    assert second.acquire(wait=False) is None
    (run / "spec.yaml").write_text("name: r\n")  # the run wrote something: it stays
    second.release()
    assert (run / "spec.yaml").exists() and not (run / ".lease").read_text()
