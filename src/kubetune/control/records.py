"""The control plane's records: API keys (hashed), uploaded files, fine-tuning jobs and their events.

SQLAlchemy Core over SQLite by default (one file beside the server) or PostgreSQL (`--database
postgresql://...`) when several replicas share it. Rows are plain dicts; the API shapes them. Every
read and write of a file or job names its owner, so one key never sees another's records. A status
change that two replicas could race on (claiming a queued job) is one conditional UPDATE.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kubetune.errors import UsageError

__all__ = ["Records", "database_url"]

_meta = sa.MetaData()

keys = sa.Table(
    "keys", _meta,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Integer, nullable=False),
)

files = sa.Table(
    "files", _meta,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),  # listing order
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("owner", sa.String(40), nullable=False, index=True),
    sa.Column("filename", sa.String(500), nullable=False),
    sa.Column("purpose", sa.String(40), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("uri", sa.String(2000), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Integer),                    # gone from then on (OpenAI's expires_after)
)

jobs = sa.Table(
    "jobs", _meta,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("owner", sa.String(40), nullable=False, index=True),
    sa.Column("model", sa.String(2000), nullable=False),
    sa.Column("training_file", sa.String(40), nullable=False),
    sa.Column("validation_file", sa.String(40)),
    sa.Column("training_uri", sa.String(2000), nullable=False),   # where the files' contents are
    sa.Column("validation_uri", sa.String(2000)),
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("method", sa.Text, nullable=False),           # JSON: OpenAI's method object, as resolved
    sa.Column("settings", sa.Text, nullable=False),         # JSON: the `kubetune` extension (spec overrides)
    sa.Column("spec", sa.Text, nullable=False),             # the run spec YAML the job trains (any replica runs it)
    sa.Column("metadata", sa.Text),                         # JSON: the caller's metadata
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("backend", sa.String(20), nullable=False),
    sa.Column("worker", sa.String(200)),                    # the replica (local) that validates/runs it
    sa.Column("run_uri", sa.String(2000), nullable=False),
    sa.Column("fine_tuned_model", sa.String(300), unique=True),
    sa.Column("trained_tokens", sa.BigInteger),
    sa.Column("error", sa.Text),                            # JSON: {code, message, param}
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("retry_at", sa.Float),                        # not tried again before (after an exit 75)
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("finished_at", sa.Integer),
    sa.Column("result_files", sa.Text),                     # JSON: ids of its fine-tune-results files
    sa.Column("model_deleted_at", sa.Integer),
    sa.Column("integrations", sa.Text),                     # JSON: OpenAI's integrations, as the caller sent them              # DELETE /v1/models: no longer served, run removed
)

events = sa.Table(
    "events", _meta,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("level", sa.String(10), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)

METADATA_SCAN = 10_000  # jobs a metadata filter looks through (a key's newest)
JSON_FIELDS = ("method", "settings", "metadata", "error", "result_files", "integrations")


def database_url(value: str | None, home: Path) -> str:
    """The SQLAlchemy URL of `--database`: default SQLite in the server's home; postgresql:// URLs use psycopg 3."""
    if not value:
        return f"sqlite:///{home / 'control.db'}"
    if value.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if value.startswith(("sqlite:///", "postgresql+psycopg://")):
        return value
    raise UsageError(f"--database {value.split('@')[-1]}: not a database URL",
                     "use postgresql://USER@HOST:PORT/DB (password from PGPASSWORD) or sqlite:///PATH")


class Records:
    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        args = {"connect_args": {"check_same_thread": False, "timeout": 30}} if sqlite else {"pool_pre_ping": True}
        self.engine: Engine = sa.create_engine(url, **args)
        if sqlite:
            @sa.event.listens_for(self.engine, "connect")
            def _wal(conn: Any, _: Any) -> None:  # readers never wait on the worker's writes
                conn.execute("PRAGMA journal_mode=WAL")
        try:
            _meta.create_all(self.engine)
            _add_new_columns(self.engine)
        except sa.exc.OperationalError as exc:
            where = self.engine.url.render_as_string(hide_password=True)
            raise UsageError(f"cannot open the database {where}: {exc.orig}",
                             "check --database (host, port, user; the password goes in PGPASSWORD)") from None

    def close(self) -> None:
        self.engine.dispose()

    # keys
    def add_key(self, key_id: str, name: str, digest: str) -> None:
        with self.engine.begin() as c:
            if c.execute(sa.select(keys.c.id).where(keys.c.hash == digest)).first() is None:
                c.execute(keys.insert().values(id=key_id, name=name, hash=digest, created_at=int(time.time())))

    def key_by_hash(self, digest: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(keys).where(keys.c.hash == digest)).mappings().first()
        return dict(row) if row else None

    def list_keys(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(sa.select(keys.c.id, keys.c.name, keys.c.created_at)).mappings()]

    def key_name(self, key_id: str) -> str | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(keys.c.name).where(keys.c.id == key_id)).scalar()

    def has_keys(self) -> bool:
        with self.engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(keys)).scalar_one() > 0

    # files
    def add_file(self, **row: Any) -> dict[str, Any]:
        with self.engine.begin() as c:
            c.execute(files.insert().values(**row))
        return row

    def file(self, owner: str, file_id: str) -> dict[str, Any] | None:
        """The owner's file, None once it expired (even before the worker removes it)."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(files).where(files.c.id == file_id, files.c.owner == owner,
                                                   _unexpired())).mappings().first()
        return dict(row) if row else None

    def files(self, owner: str, purpose: str | None, after: str | None, limit: int, newest_first: bool = True
              ) -> list[dict[str, Any]]:
        return self._page(files, owner, after, limit, newest_first,
                          [_unexpired(), *([files.c.purpose == purpose] if purpose else [])])

    def expired_files(self, now: float) -> list[dict[str, Any]]:
        """Expired files that no active job reads: the worker removes them (one a job still trains
        on goes when the job ends)."""
        active = ("validating_files", "queued", "running", "paused")
        in_use = sa.select(jobs.c.training_file).where(jobs.c.status.in_(active)).union(
            sa.select(jobs.c.validation_file).where(jobs.c.status.in_(active), jobs.c.validation_file.is_not(None)))
        with self.engine.connect() as c:
            rows = c.execute(sa.select(files).where(files.c.expires_at.is_not(None), files.c.expires_at <= now,
                                                    files.c.id.not_in(in_use))).mappings()
            return [dict(r) for r in rows]

    def stored_bytes(self, owner: str) -> int:
        """Bytes of the owner's files kept now (its upload budget's use)."""
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(
                files.c.owner == owner)).scalar_one())

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self.engine.begin() as c:
            return c.execute(files.delete().where(files.c.id == file_id, files.c.owner == owner)).rowcount > 0

    # jobs
    def add_job(self, **row: Any) -> dict[str, Any]:
        with self.engine.begin() as c:
            c.execute(jobs.insert().values(**_dumped(row)))
        return self.job(row["owner"], row["id"]) or row

    def job(self, owner: str | None, job_id: str) -> dict[str, Any] | None:
        where = [jobs.c.id == job_id] + ([jobs.c.owner == owner] if owner is not None else [])
        with self.engine.connect() as c:
            row = c.execute(sa.select(jobs).where(*where)).mappings().first()
        return _loaded(row) if row else None

    def jobs(self, owner: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        return [_loaded(r) for r in self._page(jobs, owner, after, limit, True, [])]

    def jobs_of(self, owner: str, statuses: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every job of one owner (oldest first), optionally only in some statuses."""
        where = [jobs.c.owner == owner] + ([jobs.c.status.in_(list(statuses))] if statuses is not None else [])
        with self.engine.connect() as c:
            return [_loaded(r) for r in c.execute(sa.select(jobs).where(*where).order_by(jobs.c.n)).mappings()]

    def count_jobs(self, owner: str, statuses: Sequence[str]) -> int:
        with self.engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(jobs).where(
                jobs.c.owner == owner, jobs.c.status.in_(list(statuses)))).scalar_one()

    def jobs_in(self, statuses: Sequence[str], backend: str | None = None) -> list[dict[str, Any]]:
        where = [jobs.c.status.in_(statuses)] + ([jobs.c.backend == backend] if backend else [])
        with self.engine.connect() as c:
            return [_loaded(r) for r in c.execute(sa.select(jobs).where(*where).order_by(jobs.c.n)).mappings()]

    def jobs_with_metadata(self, owner: str, wanted: dict[str, str] | None, after: str | None = None
                           ) -> list[dict[str, Any]]:
        """The owner's jobs, newest first, whose metadata holds every key: value of `wanted` (None: the
        jobs without metadata), among its METADATA_SCAN jobs older than `after` (any job of the owner is a
        cursor, as in the unfiltered list: a page's last id, whether or not a filter matched it).
        Filtered here, not in SQL: metadata is JSON text in either database."""
        rows = [_loaded(r) for r in self._page(jobs, owner, after, METADATA_SCAN, True, [jobs.c.metadata.is_not(None)]
                                               if wanted is not None else [])]
        if wanted is None:
            return [r for r in rows if not r.get("metadata")]
        return [r for r in rows if all((r.get("metadata") or {}).get(k) == v for k, v in wanted.items())]

    def succeeded_models(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Jobs whose model exists: succeeded, and not deleted since."""
        where = [jobs.c.status == "succeeded", jobs.c.model_deleted_at.is_(None)]
        where += [jobs.c.owner == owner] if owner is not None else []
        with self.engine.connect() as c:
            return [_loaded(r) for r in c.execute(sa.select(jobs).where(*where).order_by(jobs.c.n)).mappings()]

    def update_job(self, job_id: str, expect: Iterable[str] | None = None, unclaimed: bool = False,
                   **values: Any) -> bool:
        """Set fields of a job; with `expect`, only while its status is one of those (and with `unclaimed`
        only while no worker has it): a claim, True if this call made the change, False if another
        replica or a cancel got there first."""
        where = [jobs.c.id == job_id] + ([jobs.c.status.in_(list(expect))] if expect is not None else [])
        where += [jobs.c.worker.is_(None)] if unclaimed else []
        with self.engine.begin() as c:
            return c.execute(jobs.update().where(*where).values(**_dumped(values))).rowcount > 0

    # events
    def add_event(self, job_id: str, message: str, level: str = "info") -> None:
        with self.engine.begin() as c:
            c.execute(events.insert().values(job_id=job_id, created_at=round(time.time(), 3), level=level,
                                             message=message))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(events).where(events.c.job_id == job_id).order_by(events.c.n)).mappings()
            return [dict(r) for r in rows]

    def _page(self, table: sa.Table, owner: str, after: str | None, limit: int, newest_first: bool,
              where: list[Any]) -> list[Any]:
        """One page of an owner's rows in listing order, starting after the row with id `after`."""
        query = sa.select(table).where(table.c.owner == owner, *where)
        with self.engine.connect() as c:
            if after:
                n = c.execute(sa.select(table.c.n).where(table.c.id == after, table.c.owner == owner)).scalar()
                if n is None:
                    return []
                query = query.where(table.c.n < n if newest_first else table.c.n > n)
            order = table.c.n.desc() if newest_first else table.c.n
            return list(c.execute(query.order_by(order).limit(limit)).mappings())


def _unexpired() -> Any:
    return sa.or_(files.c.expires_at.is_(None), files.c.expires_at > time.time())


def _add_new_columns(engine: Engine) -> None:
    """A database made by an older kubetune gets the columns added since (all nullable): the schema
    only grows by such columns, so an upgrade needs no migration tool."""
    inspector = sa.inspect(engine)
    for table in _meta.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        if not missing:
            continue
        with engine.begin() as c:
            for column in missing:
                if not column.nullable:
                    raise UsageError(f"the database's table {table.name} lacks the required column {column.name}",
                                     "it was made by another kubetune version; start with a new --database")
                kind = column.type.compile(engine.dialect)
                c.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _dumped(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v) for k, v in row.items()}


def _loaded(row: Any) -> dict[str, Any]:
    out = dict(row)
    for k in JSON_FIELDS:
        if out.get(k) is not None:
            out[k] = json.loads(out[k])
    return out
