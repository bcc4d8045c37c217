"""`kubetune server`: open the records, pick the backend, listen. Refuses to listen beyond loopback
without an API key: the API starts training jobs on this machine and serves their models."""

from __future__ import annotations

from kubetune import settings
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.control.keys import digest, key_id, new_key
from kubetune.control.records import Records, database_url
from kubetune.control.policy import ServerConfig, check_operator_spec, load_config
from kubetune.errors import SpecError, UsageError
from kubetune.serve.server import is_loopback
from kubetune.uris import is_remote

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServerOptions", "create_key", "list_keys", "serve_control"]


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    home: Path = Path(".kubetune-server")
    storage: str | None = None           # default: HOME (files/ and runs/ in it)
    database: str | None = None          # default: sqlite in HOME
    api_keys: list[str] = field(default_factory=list)
    concurrency: int = 1
    max_upload_mb: int = 512
    worker_id: str | None = None
    max_concurrency: int = 16            # requests admitted per served engine
    adapters: str = "auto"
    runs: list[str] = field(default_factory=list)    # run folders / bucket prefixes shown in the dashboard
    backend: str = "local"                           # local | kubernetes
    namespace: str = "default"                       # kubernetes: where jobs go (unless a job says otherwise)
    clusters: list[str] = field(default_factory=list)  # namespaces whose kubetune Jobs the dashboard shows
    config: Path | None = None                       # the operator's policy (YAML): models, limits, budgets, spec
    models_root: Path | None = None                  # a folder of model folders tenants may name (over config's)


def open_records(options: ServerOptions) -> Records:
    try:
        options.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--home {options.home}: cannot create it ({exc.strerror})",
                         "give a folder this user may write") from None
    return Records(database_url(options.database, options.home.resolve()))


def create_key(options: ServerOptions, name: str) -> str:
    """A new key, stored hashed; the key itself is returned once and never stored."""
    key = new_key()
    records = open_records(options)
    records.add_key(key_id(digest(key)), name, digest(key))
    records.close()
    return key


def list_keys(options: ServerOptions) -> list[dict[str, object]]:
    records = open_records(options)
    try:
        return records.list_keys()
    finally:
        records.close()


def build(options: ServerOptions) -> tuple[FastAPI, Records]:
    """The app and its records; UsageError for a server that must not start (no key beyond loopback,
    the kubernetes backend without shared storage)."""
    from kubetune.control.app import create_app
    from kubetune.control.models import ModelHub
    from kubetune.control.state import ControlSettings
    from kubetune.control.cluster import KubernetesWorker
    from kubetune.control.worker import LocalWorker

    records = open_records(options)
    for k, key in enumerate(options.api_keys):
        records.add_key(key_id(digest(key)), f"--api-key {k + 1}", digest(key))
    has_keys = records.has_keys()
    if not has_keys and not is_loopback(options.host):
        raise UsageError(f"--host {options.host}: the server would accept jobs from the network with no API key",
                         "give --api-key KEY (or create one: kubetune server key create --name NAME), "
                         "or listen on 127.0.0.1")
    storage = options.storage or str(options.home.resolve())
    k8s = options.backend == "kubernetes"
    if k8s and not is_remote(storage):
        raise UsageError(f"--backend kubernetes with --storage {storage}: pods cannot read this machine's folders",
                         "give --storage s3://bucket/prefix or gs://bucket/prefix, which the pods and this server "
                         "both reach")
    config = load_config(options.config)
    if options.models_root is not None:
        config.models.root = str(options.models_root.expanduser().resolve())
    operator_spec = {"kubernetes": {"namespace": options.namespace}} if k8s else {}
    check_policy(config, operator_spec, str(options.config or "--config"))
    endpoints = {**{f"graders.models.{n}": j for n, j in config.graders.models.items()},
                 **({"graders.embeddings": config.graders.embeddings} if config.graders.embeddings else {})}
    for where, endpoint in endpoints.items() if k8s else ():  # found at start, not at a tenant's first job
        if endpoint.api_key_env and not endpoint.api_key_secret:
            raise UsageError(f"{options.config}: {where}.api_key_secret: the endpoint's key ({endpoint.api_key_env}) "
                             "has no Secret to come from in the job's pods",
                             "name the Kubernetes Secret holding it: api_key_secret: SECRET/KEY")
    control = ControlSettings(storage=storage, backend=options.backend, max_upload_bytes=options.max_upload_mb << 20,
                              open_without_key=not has_keys, runs=list(options.runs),
                              clusters=list(options.clusters), config=config, operator_spec=operator_spec)
    models = ModelHub(records, options.max_concurrency, options.adapters, config.serving.max_loras)
    worker_class = KubernetesWorker if k8s else LocalWorker
    worker = worker_class(records, options.home.resolve(), options.worker_id or socket.gethostname(),
                          options.concurrency, config=config, storage=storage)
    return create_app(records, control, worker, models), records


def check_policy(config: ServerConfig, operator_spec: dict[str, Any], where: str) -> None:
    """The operator's spec settings (server-wide and per team) checked once at start, on a stand-in
    job: a mistake there is the operator's to fix now (exit 2), not every tenant's failed job later."""
    from kubetune.control.policy import flat
    from kubetune.spec.load import apply_override, validate_spec

    layers = [("spec", config.spec)] + [(f"teams.{name}.spec", t.spec) for name, t in config.teams.items()]
    for label, layer in layers:
        check_operator_spec(layer, f"{where}: {label}")
        raw: dict[str, Any] = {"name": "check", "model": {"base": "org/model"}, "data": {"train": ["rows.jsonl"]}}
        for one in (operator_spec, config.spec, layer):
            for key, value in flat(one).items():
                apply_override(raw, tuple(int(p) if p.isdigit() else p for p in key.split(".")), value,
                               f"{where}: {label}.{key}")
        try:
            validate_spec(raw, f"{where}: {label}")
        except SpecError as exc:
            raise SpecError(exc.problems, "fix the server's configuration") from None


def serve_control(options: ServerOptions) -> None:
    import uvicorn

    options.api_keys += [k for k in [settings.api_key()] if k]
    app, records = build(options)
    where = f"http://{options.host}:{options.port}"
    keys = "API key required" if not app.state.control.settings.open_without_key else "no API key (loopback only)"
    print(f"kubetune server at {where}/v1 ({keys}; runs in {app.state.control.settings.storage}; database "
          f"{records.engine.url.render_as_string(hide_password=True)})", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
