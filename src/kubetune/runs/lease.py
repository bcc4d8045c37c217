"""One writer per run: a lease in the run's output, held while a trainer writes it.

Two trainers on one output (a replacement pod that starts while the old one still runs, a second
`kubetune train` by mistake) would interleave checkpoints and events. The trainer that holds the
lease is the only writer; any other exits with LeaseHeld naming the holder, or waits (`--wait`).

- Object storage (s3://, MinIO): the object `.lease` is created with a conditional write
  (If-None-Match: *) and renewed every third of its lifetime with If-Match on its ETag, so two
  writers can never both succeed. A lease not renewed within its lifetime is expired and is taken
  over the same way (If-Match on the expired ETag: one taker wins).
- Local folders and PVC mounts: an exclusive flock on `.lease` in the run folder; the kernel
  releases it when the holder dies, however it dies.
- Stores without conditional writes (gs:// through gcsfs): write, wait, read back — best effort.

Expiry is judged two ways, so a skewed clock cannot steal a live lease: the holder's own deadline
has passed, or the waiter has watched the lease stay unchanged for a whole lifetime. A holder on
this same host whose process is gone is abandoned at once (a rerun after `kill -9`); in a pod the
host is the pod, so a replacement pod waits for the lapse.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from kubetune.errors import KubetuneError, LeaseHeld, UsageError
from kubetune.runs.layout import RUN_KEYS
from kubetune.storage.store import Store, describe, exception_chain, local_path

LEASE = RUN_KEYS.lease


@dataclass(frozen=True)
class Holder:
    name: str        # HOST:PID by default (settings.lease_holder)
    host: str
    pid: int
    expires: float   # unix time by the holder's clock
    renewed: float

    @classmethod
    def now(cls, name: str, ttl: float) -> Holder:
        t = time.time()
        return cls(name, socket.gethostname(), os.getpid(), round(t + ttl, 3), round(t, 3))

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data.decode() or "{}")
            return cls(str(raw["name"]), str(raw["host"]), int(raw["pid"]), float(raw["expires"]), float(raw["renewed"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # a torn or foreign file: treated as abandoned

    def abandoned_here(self) -> bool:
        """The holder, named by its host and process (the default name), ran on this host and its
        process is gone. A holder with a name of its own (KUBETUNE_LEASE_HOLDER) waits for expiry."""
        if self.host != socket.gethostname() or self.name != f"{self.host}:{self.pid}":
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class Lease(Protocol):
    lost: bool

    def acquire(self, wait: bool) -> str | None:
        """Become the run's writer; returns the holder taken over from (None if the lease was free)."""

    def release(self) -> None: ...


def lease_for(uri: str, store: Store | None, holder: str, ttl: float,
              log: Callable[[str], None] = print) -> Lease:
    path = local_path(uri)
    if store is None and path is not None:
        return FileLease(path, holder, log, ttl)
    assert store is not None
    if store.scheme == "s3":
        return ConditionalLease(store, holder, ttl, log)
    return BestEffortLease(store, holder, ttl, log)


def _held_error(uri: str, holder: Holder | None, ttl: float) -> LeaseHeld:
    who = holder.name if holder else "another trainer"
    left = f"; its lease expires in {max(0, holder.expires - time.time()):.0f} s unless renewed" if holder and ttl else ""
    return LeaseHeld(f"run {uri} is being written by {who}{left}",
                     "wait for it to finish or stop it (kubetune cancel NAME on a cluster); `kubetune train --wait` "
                     "starts as soon as it is free; or write elsewhere with --set output=...")


class FileLease:
    """flock on RUN/.lease: released by the kernel when the holder exits or is killed. A run folder
    that the lease alone created is removed again on release (a failed start writes nothing)."""

    def __init__(self, root: Path, holder: str, log: Callable[[str], None], ttl: float = 60.0) -> None:
        self.root, self.holder, self.log, self.ttl = root, holder, log, ttl
        self._fd: int | None = None
        self._created: list[Path] = []
        self._fallback: BestEffortLease | None = None  # a filesystem without flock

    @property
    def lost(self) -> bool:  # a kernel lock is never lost while its holder lives
        return self._fallback is not None and self._fallback.lost

    def acquire(self, wait: bool) -> str | None:
        import fcntl

        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first: what release may remove again
        path = self.root / LEASE
        told = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                current = Holder.decode(os.pread(fd, 4096, 0))
                os.close(fd)
                if not wait:
                    self._remove_created()
                    raise _held_error(str(self.root), current, 0) from None
                if not told:
                    self.log(f"waiting for {current.name if current else 'another trainer'} to finish writing {self.root}")
                    told = True
                time.sleep(1.0)
                continue
            except OSError as exc:  # a filesystem without flock (some FUSE mounts)
                os.close(fd)
                if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                    self._fallback = BestEffortLease(Store(str(self.root)), self.holder, self.ttl, self.log)
                    return self._fallback.acquire(wait)
                raise
            try:  # the file we locked is still the lease (a releasing holder may have removed it)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.now(self.holder, 0).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fallback is not None:
            self._fallback.release()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            if self._created and [p.name for p in self.root.iterdir()] == [LEASE]:
                (self.root / LEASE).unlink()  # while still locked: a waiter re-opens the path
            os.close(self._fd)  # closing drops the flock
            self._fd = None
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty: anything the run wrote stays
            except OSError:
                break
        self._created = []


class _RenewingLease:
    """Shared by the object-storage leases: the renewal thread and the wait/takeover loop."""

    def __init__(self, store: Store, holder: str, ttl: float, log: Callable[[str], None]) -> None:
        self.store, self.holder, self.ttl, self.log = store, holder, ttl, log
        self.lost = False
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what each store does --
    def _read(self) -> tuple[Holder | None, str] | None:
        """(holder, version tag) of the current lease, None when there is none."""
        raise NotImplementedError

    def _create(self, body: bytes) -> str | None:
        """Write the lease only if there is none; its version tag, or None if one exists."""
        raise NotImplementedError

    def _replace(self, body: bytes, tag: str) -> str | None:
        """Overwrite the lease only if it is still at version `tag`; the new tag, or None."""
        raise NotImplementedError

    def _delete(self) -> None:
        self.store.remove(LEASE)

    # -- the protocol --
    def acquire(self, wait: bool) -> str | None:
        seen: tuple[str, float] | None = None  # (tag, when first seen) to judge expiry by our own clock
        told = False
        while True:
            tag = self._create(Holder.now(self.holder, self.ttl).encode())
            if tag is not None:
                self._tag = tag
                self._start_renewal()
                return None
            current = self._read()
            if current is None:
                continue  # released between our create and read: try again
            holder, tag = current
            now = time.monotonic()
            if seen is None or seen[0] != tag:
                seen = (tag, now)
            expired = (holder is None or holder.name == self.holder or holder.expires < time.time()
                       or now - seen[1] > self.ttl or holder.abandoned_here())
            if expired:
                new = self._replace(Holder.now(self.holder, self.ttl).encode(), tag)
                if new is not None:
                    self._tag = new
                    self._start_renewal()
                    return holder.name if holder else "an unreadable lease"
                continue  # someone else took it first
            if not wait:
                raise _held_error(self.store.uri, holder, self.ttl)
            if not told:
                self.log(f"waiting for {holder.name} to finish writing {self.store.uri} (its lease is renewed every "
                         f"{self.ttl / 3:.0f} s; taken over if it lapses)")
                told = True
            time.sleep(min(self.ttl / 3, 5.0))

    def _start_renewal(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="kubetune-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                assert self._tag is not None
                new = self._replace(Holder.now(self.holder, self.ttl).encode(), self._tag)
            except KubetuneError:
                continue  # storage unreachable: nobody can take it over either; try again
            if new is None:
                self.lost = True
                self.log(f"lost the lease on {self.store.uri}: another trainer took over this run; stopping")
                return
            self._tag = new

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._tag is None or self.lost:
            return
        try:
            current = self._read()
            if current is not None and current[1] == self._tag:
                self._delete()
        except KubetuneError:
            pass  # it expires by itself
        self._tag = None


class ConditionalLease(_RenewingLease):
    """S3 conditional writes: If-None-Match: * to create, If-Match: ETag to renew or take over."""

    def _key(self) -> tuple[str, str]:
        bucket, _, prefix = self.store.root.partition("/")
        return bucket, f"{prefix}/{LEASE}" if prefix else LEASE

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One S3 request on s3fs's event loop; None when a condition did not hold or the lease is gone."""
        from fsspec.asyn import sync

        fs = self.store.fs
        bucket, key = self._key()

        async def request() -> Any:
            out = await fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
            if method == "get_object":  # body and ETag of one version, read together
                out = {"Body": await out["Body"].read(), "ETag": out["ETag"]}
            return out

        try:
            return sync(fs.loop, request)
        except Exception as exc:  # noqa: BLE001 - conflicts are answers here; the rest is classified
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                return None  # FileNotFoundError: nothing to read, or nothing left to replace (If-Match)
            raise describe(exc, self.store.url(LEASE)) or UsageError(
                f"{self.store.url(LEASE)}: {type(exc).__name__}: {exc}") from None

    def _read(self) -> tuple[Holder | None, str] | None:
        got = self._call("get_object")
        return None if got is None else (Holder.decode(got["Body"]), got["ETag"])

    def _create(self, body: bytes) -> str | None:
        put = self._call("put_object", Body=body, IfNoneMatch="*")
        return None if put is None else put["ETag"]

    def _replace(self, body: bytes, tag: str) -> str | None:
        put = self._call("put_object", Body=body, IfMatch=tag)
        return None if put is None else put["ETag"]


class BestEffortLease(_RenewingLease):
    """A store without conditional writes: write, pause, read back; the last writer wins the race."""

    def _read(self) -> tuple[Holder | None, str] | None:
        if not self.store.exists(LEASE):
            return None
        text = self.store.read_text(LEASE)
        return Holder.decode(text.encode()), text

    def _write_and_check(self, body: bytes) -> str | None:
        self.store.write_text(LEASE, body.decode())
        time.sleep(0.5)
        current = self._read()
        return current[1] if current and current[0] and current[0].name == self.holder else None

    def _create(self, body: bytes) -> str | None:
        return None if self.store.exists(LEASE) else self._write_and_check(body)

    def _replace(self, body: bytes, tag: str) -> str | None:
        current = self._read()
        return self._write_and_check(body) if current is not None and current[1] == tag else None


def _precondition_failed(exc: BaseException) -> bool:
    """S3 answered 412 (a condition did not hold) or 409 (a concurrent conditional write won)."""
    for cur in exception_chain(exc):
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if isinstance(cur, FileExistsError):
            return True
    return False
