"""One small interface over every place a run can read from or write to: local folders, S3 (AWS,
MinIO, any S3-compatible endpoint), GCS, the Hugging Face Hub (read) and PVC mounts.

fsspec does the work (s3fs, gcsfs, huggingface_hub's HfFileSystem); this module picks the
filesystem for a URI, sets timeouts, and turns the libraries' exceptions into errors that name
the URI and say what to do. Credentials never pass through here: s3fs/botocore read the standard
AWS chain (environment, profile, web identity), gcsfs Google's ADC, HfFileSystem HF_TOKEN.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from kubetune import settings
from kubetune.errors import KubetuneError, TransientError, UsageError
from kubetune.uris import is_remote, scheme, uri_basename  # noqa: F401 (uri_basename: storage's callers)

T = TypeVar("T")


def pvc_path(uri: str) -> Path:
    """pvc://claim/path → the mount path inside a pod (KUBETUNE_PVC_ROOT/claim/path)."""
    body = uri.removeprefix("pvc://").strip("/")
    if not body:
        raise UsageError(f"{uri}: expected pvc://CLAIM/path")
    return settings.pvc_root() / body


def local_path(uri: str) -> Path | None:
    """The local path of a local or pvc:// URI, None for object storage."""
    if uri.startswith("pvc://"):
        return pvc_path(uri)
    mount = settings.gcs_mount()
    if uri.startswith("gs://") and mount:
        # inside a pod the bucket is mounted by the GCS FUSE CSI driver (kubetune render does it)
        return Path(mount) / uri.removeprefix("gs://")
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


class Store:
    """Files under one URI prefix. Keys are relative paths with '/'."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.scheme = scheme(uri)
        self.fs, self.root = _filesystem(self.uri)

    def _path(self, key: str = "") -> str:
        return f"{self.root}/{key}".rstrip("/") if key else self.root

    def url(self, key: str = "") -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def exists(self, key: str) -> bool:
        with translate(self.url(key)):
            return bool(self.fs.exists(self._path(key)))

    def find(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every file under prefix: relative key → info (size, ETag/md5 where the store has one)."""
        base = self._path(prefix)
        with translate(self.url(prefix)):
            if not self.fs.exists(base):
                return {}
            found = self.fs.find(base, detail=True)
        out = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            rel = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path
            out[rel] = info
        return out

    def listdir(self, prefix: str) -> list[str]:
        """Names directly under prefix (files and folders)."""
        base = self._path(prefix)
        with translate(self.url(prefix)):
            if not self.fs.exists(base):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        # its own name per process and thread: two readers fetching one file never write into each other's
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.part")
        with translate(self.url(key)):
            self.fs.get_file(self._path(key), str(tmp))
        os.replace(tmp, local)  # a killed download never looks like a finished file

    def put(self, local: Path, key: str) -> None:
        with translate(self.url(key)):
            if self.scheme == "file":
                Path(self._path(key)).parent.mkdir(parents=True, exist_ok=True)
            self.fs.put_file(str(local), self._path(key))

    def chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        """A file's bytes a piece at a time (a large file never whole in memory)."""
        with translate(self.url(key)):
            with self.fs.open(self._path(key), "rb") as fh:
                while piece := fh.read(size):
                    yield piece

    def read_text(self, key: str) -> str:
        with translate(self.url(key)):
            return self.fs.cat_file(self._path(key)).decode()

    def write_text(self, key: str, text: str) -> None:
        with translate(self.url(key)):
            if self.scheme == "file":
                Path(self._path(key)).parent.mkdir(parents=True, exist_ok=True)
            self.fs.pipe_file(self._path(key), text.encode())

    def remove(self, prefix: str) -> None:
        with translate(self.url(prefix)):
            if self.fs.exists(self._path(prefix)):
                self.fs.rm(self._path(prefix), recursive=True)

    def check_readable(self, what: str) -> None:
        """Pre-flight for an input: it exists and the credentials may read it."""
        try:  # info, not exists: exists() turns wrong credentials into "False"
            self.fs.info(self._path())
        except Exception as exc:  # noqa: BLE001 - classified below; anything else still names the URI
            raise describe(exc, f"{what} {self.uri}") or UsageError(
                f"{what} {self.uri}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                "check the URI, the credentials and the network") from None

    def check_writable(self, what: str) -> None:
        """Pre-flight for an output: the bucket exists and the credentials may list and write it."""
        # one probe per process: the pods of a multi-node Job run this check at the same moment
        probe = f".kubetune-write-check-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.write_text(probe, "ok\n")
            self.remove(probe)
        except KubetuneError as exc:
            # the message names the output, not the probe (its name is this process's)
            raise type(exc)(f"{what} {exc.message.replace('/' + probe, '')}", exc.hint) from None


def retry_transient(check: Callable[[], T], say: Callable[[str], None] = print, attempts: int | None = None) -> T:
    """Run a check; a TransientError (storage unreachable, 5xx, throttling) is retried with backoff
    (2, 4, 8 s ... up to settings.preflight_retries() attempts) before it is raised."""
    attempts = attempts or settings.preflight_retries()
    delay = 2.0
    for attempt in range(1, attempts + 1):
        try:
            return check()
        except TransientError as exc:
            if attempt == attempts:
                raise
            say(f"{exc.message}; retrying in {delay:.0f} s ({attempt}/{attempts - 1})")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def _filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem for a URI. Connection settings come from the environment only (the spec's
    `storage:` section is exported there by runs.run.apply_storage_env): one mechanism, which
    torchrun ranks and the upload process inherit too."""
    import fsspec

    kind = scheme(uri)
    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = fsspec.filesystem(
            "s3", client_kwargs={"endpoint_url": endpoint} if endpoint else {}, skip_instance_cache=True,
            use_listings_cache=False,
            # Short timeouts and few botocore retries: kubetune's uploader retries with its own backoff,
            # and a pre-flight check must fail in seconds, not minutes.
            config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}})
        return fs, uri.removeprefix("s3://")
    if kind == "gs":
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise UsageError(f"{uri}: gs:// needs gcsfs", "pip install gcsfs (in a pod, mount the bucket with the GCS FUSE "
                                                          "CSI driver instead: kubetune render does it)") from None
        return fsspec.filesystem("gs", skip_instance_cache=True, use_listings_cache=False), uri.removeprefix("gs://")
    if kind == "hf":
        from huggingface_hub import HfFileSystem

        return HfFileSystem(), uri.removeprefix("hf://")
    path = local_path(uri)
    if path is None:
        raise UsageError(f"{uri}: unsupported URI scheme {kind}://", "use a local path, s3://, gs://, hf:// or pvc://")
    return fsspec.filesystem("file"), str(path.absolute())


@contextlib.contextmanager
def translate(uri: str) -> Iterator[None]:
    """Library exceptions → an error naming the URI: UsageError for what the user can fix (wrong
    credentials, no bucket, no key), TransientError for what may pass (no network, 5xx, throttling)."""
    try:
        yield
    except KubetuneError:
        raise
    except Exception as exc:
        error = describe(exc, uri)
        if error is None:
            raise
        raise error from None


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthFailure",
                     "InvalidClientTokenId", "UnrecognizedClientException"}
# Error codes S3 (and compatible stores) return for a busy or failing service: retrying may succeed.
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "ServerBusy",
                    "BandwidthLimitExceeded", "OperationAborted"}
_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                      "ServerDisconnectedError", "ReadTimeoutError", "ConnectionClosedError", "ClientOSError",
                      "ConnectTimeout", "ReadTimeout", "ConnectError", "TimeoutError", "ProxyConnectionError",
                      "ServerTimeoutError", "ClientPayloadError"}


def describe(exc: BaseException, uri: str = "") -> KubetuneError | None:
    """The error for a storage failure, classified by exception type, error code and HTTP status:
    UsageError for what the user can fix, TransientError for what may pass; None for anything else."""
    code = _error_code(exc)
    status = http_status(exc)
    where = uri or "storage"
    if code in _CREDENTIAL_CODES:
        return UsageError(f"{where}: the storage credentials were rejected ({code})",
                          "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the profile / Kubernetes Secret)")
    if any(type(e).__name__ in {"NoCredentialsError", "PartialCredentialsError"} for e in exception_chain(exc)):
        return UsageError(f"{where}: no storage credentials found",
                          "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (in a pod: kubernetes.secrets.storage)")
    if code == "NoSuchBucket":
        return UsageError(f"{where}: the bucket does not exist", "create it, or fix the URI")
    if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
        return TransientError(f"{where}: the storage service is failing or throttling ({code or f'HTTP {status}'})",
                              "nothing is wrong with your input: the same command retried later continues "
                              "(on Kubernetes the Job retries it)")
    if isinstance(exc, PermissionError) or code in {"AccessDenied", "AllAccessDisabled", "Forbidden"} or status == 403:
        return UsageError(f"{where}: access denied", "the credentials may not read/write this location")
    if isinstance(exc, FileNotFoundError) or code in {"NoSuchKey", "NotFound"} or status == 404:
        return UsageError(f"{where}: not found", "check the key (kubetune stage copies inputs there)")
    if is_connection_error(exc):
        return TransientError(f"{where}: cannot connect to the storage endpoint ({type(exc).__name__})",
                              "check AWS_ENDPOINT_URL / storage.endpoint_url and the network; the same command "
                              "retried later continues (on Kubernetes the Job retries it)")
    return None


def _error_code(exc: BaseException) -> str | None:
    for e in exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed request anywhere in the exception chain (botocore, requests, httpx)."""
    for e in exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def is_connection_error(exc: BaseException) -> bool:
    """No answer at all: refused, reset, DNS, or a timeout, in any HTTP library of the chain."""
    return any(type(e).__name__ in _CONNECTION_ERRORS or isinstance(e, (ConnectionError, TimeoutError))
               for e in exception_chain(exc))


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, its cause or context, and theirs: where a library's original error hides."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__
