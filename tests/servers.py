"""Real servers on 127.0.0.1 for tests: an S3 server (moto_server, or the MinIO in
KUBETUNE_TEST_S3_ENDPOINT) and a TCP relay the tests can cut to simulate an outage."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    proc: subprocess.Popen[bytes] | None = None

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # boto3 client for assertions
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


def start_s3(extra_env: dict[str, str] | None = None, nice: int = 0) -> S3Server:
    external = os.environ.get("KUBETUNE_TEST_S3_ENDPOINT")
    if external and not extra_env:
        return S3Server(external, os.environ.get("AWS_ACCESS_KEY_ID", "minioadmin"),
                        os.environ.get("AWS_SECRET_ACCESS_KEY", "minioadmin"))
    port = free_port()
    beside = Path(sys.executable).parent / "moto_server"  # the venv's own, not whatever PATH finds first
    exe = str(beside) if beside.exists() else (shutil.which("moto_server") or "moto_server")
    proc = subprocess.Popen([*(["nice", "-n", str(nice)] if nice else []), exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(extra_env or {})})
    wait_port(port)
    return S3Server(f"http://127.0.0.1:{port}", "testing-key-id", "testing-secret", proc)


class Relay:
    """A TCP relay in front of a server: `cut()` closes the listening port and every connection
    (clients see connection refused), `restore()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener:
            self._listener.close()
            self._listener = None
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def start_s3_with_auth(bucket: str) -> S3Server:
    """A moto_server that checks credentials (IAM): the first three calls create a user, its key and
    an allow-all policy; from then on a wrong key is refused like AWS refuses it."""
    import json

    import boto3

    server = start_s3({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="kubetune")
    key = iam.create_access_key(UserName="kubetune")["AccessKey"]
    iam.put_user_policy(UserName="kubetune", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    server.key_id, server.secret = key["AccessKeyId"], key["SecretAccessKey"]
    server.client().create_bucket(Bucket=bucket)
    return server


@dataclass
class PostgresServer:
    url: str
    proc: subprocess.Popen[bytes]
    data: Path

    def stop(self) -> None:
        self.proc.terminate()  # smart shutdown: sessions end, then the server
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)


def postgres_bindir() -> Path:
    """Where initdb and postgres are: on PATH, or Debian's /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise AssertionError("PostgreSQL is not installed: `make test` installs it (scripts/system-deps.sh), or "
                             "apt-get install postgresql")
    return versions[-1].parent


def start_postgres() -> PostgresServer:
    """A real PostgreSQL server on 127.0.0.1 in a fresh data folder (trust auth, no fsync: a test
    database). As root it runs as the `postgres` user, which the server insists on."""
    import tempfile

    bindir = postgres_bindir()
    data = Path(tempfile.mkdtemp(prefix="kubetune-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "kubetune", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([*prefix, str(bindir / "postgres"), "-D", str(data / "db"), "-p", str(port),
                             "-h", "127.0.0.1", "-k", str(data), "-c", "fsync=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 30)
    return PostgresServer(f"postgresql://kubetune@127.0.0.1:{port}/postgres", proc, data)
