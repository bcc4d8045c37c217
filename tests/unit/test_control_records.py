"""The control plane's store: per-owner pages, claims, and a database from an older version."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from kubetune.control.records import Records


def job_row(job_id: str, owner: str, n: int) -> dict:
    return {"id": job_id, "owner": owner, "model": "m", "training_file": "file-1", "training_uri": "u", "seed": 1,
            "method": {"type": "supervised"}, "settings": {}, "spec": "name: x\n", "status": "queued",
            "backend": "local", "run_uri": f"runs/{job_id}", "fine_tuned_model": f"ft:m::{n}", "attempts": 0,
            "created_at": n}


def test_pages_are_per_owner_and_newest_first(tmp_path: Path) -> None:
    store = Records(f"sqlite:///{tmp_path / 'db'}")
    for n in range(5):
        store.add_job(**job_row(f"ftjob-{n}", "a" if n % 2 == 0 else "b", n))
    assert [j["id"] for j in store.jobs("a", None, 10)] == ["ftjob-4", "ftjob-2", "ftjob-0"]
    assert [j["id"] for j in store.jobs("a", "ftjob-4", 1)] == ["ftjob-2"]
    assert store.jobs("a", "ftjob-1", 10) == []  # another owner's id is no cursor
    assert store.job("b", "ftjob-0") is None and store.job("a", "ftjob-0")["method"] == {"type": "supervised"}


def test_a_metadata_filter_pages_from_any_of_the_owners_jobs(tmp_path: Path) -> None:
    store = Records(f"sqlite:///{tmp_path / 'db'}")
    for n in range(6):
        store.add_job(**job_row(f"ftjob-{n}", "a", n), metadata={"team": "x" if n % 2 == 0 else "y"})
    wanted = {"team": "x"}
    assert [j["id"] for j in store.jobs_with_metadata("a", wanted)] == ["ftjob-4", "ftjob-2", "ftjob-0"]
    assert [j["id"] for j in store.jobs_with_metadata("a", wanted, "ftjob-4")] == ["ftjob-2", "ftjob-0"]
    # a cursor the filter does not match still says where the page starts (it gave nothing before)
    assert [j["id"] for j in store.jobs_with_metadata("a", wanted, "ftjob-3")] == ["ftjob-2", "ftjob-0"]
    assert store.jobs_with_metadata("a", wanted, "ftjob-0") == [] and store.jobs_with_metadata("b", wanted) == []


def test_a_claim_succeeds_once(tmp_path: Path) -> None:
    store = Records(f"sqlite:///{tmp_path / 'db'}")
    store.add_job(**job_row("ftjob-1", "a", 1))
    assert store.update_job("ftjob-1", expect=["queued"], unclaimed=True, status="running", worker="w1")
    assert not store.update_job("ftjob-1", expect=["queued"], unclaimed=True, status="running", worker="w2")
    assert store.job(None, "ftjob-1")["worker"] == "w1"


def test_a_database_from_an_older_version_gets_the_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db'}"
    Records(url).add_job(**job_row("ftjob-1", "a", 1))
    old = sa.create_engine(url)
    with old.begin() as c:  # as a version before retry_at made it
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN retry_at"))
    store = Records(url)
    assert store.update_job("ftjob-1", retry_at=12.5)
    assert store.job("a", "ftjob-1")["retry_at"] == 12.5


def test_a_home_that_cannot_be_made_is_a_usage_error(capsys) -> None:
    from kubetune.cli import main

    assert main(["server", "key", "list", "--home", "/proc/kubetune-server"]) == 2
    err = capsys.readouterr().err
    assert "--home /proc/kubetune-server: cannot create it" in err and "Traceback" not in err


def test_expired_files_are_removed_unless_an_active_job_reads_them(tmp_path: Path) -> None:
    import io
    import time

    from kubetune.control.files import save_upload
    from kubetune.control.worker import LocalWorker

    store = Records(f"sqlite:///{tmp_path / 'db'}")
    rows = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    now = int(time.time())
    saved = {}
    for name, expires in (("keep", None), ("later", now + 3600), ("due", now + 10), ("used", now + 10)):
        row = save_upload(io.BytesIO(rows), f"{name}.jsonl", str(tmp_path / "storage"), "a", "fine-tune", 1 << 20)
        store.add_file(**row, expires_at=expires)
        saved[name] = row
    store.add_job(**{**job_row("ftjob-1", "a", 1), "training_file": saved["used"]["id"]})
    worker = LocalWorker(store, tmp_path / "home", "w1")

    assert worker.remove_expired(now) == []
    assert store.file("a", saved["due"]["id"]) is not None
    gone = worker.remove_expired(now + 11)
    assert gone == [saved["due"]["id"]]  # `used` waits for its queued job; `later` and `keep` stay
    assert not (tmp_path / "storage" / "files" / saved["due"]["id"]).exists()
    assert (tmp_path / "storage" / "files" / saved["used"]["id"]).exists()
    store.update_job("ftjob-1", status="succeeded")
    assert worker.remove_expired(now + 11) == [saved["used"]["id"]]
    assert {f["id"] for f in store.files("a", None, None, 10)} == {saved["keep"]["id"], saved["later"]["id"]}
