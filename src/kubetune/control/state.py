"""What the control plane's routes share, and who is calling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from kubetune.control.jobs import JobPolicy
from kubetune.control.keys import digest, key_id
from kubetune.control.policy import Budgets, ServerConfig
from kubetune.control.models import ModelHub
from kubetune.control.records import Records
from kubetune.serve.errors import ApiError

LOCAL_OWNER = "local"  # every record, when the server runs without keys (loopback only)


@dataclass
class ControlSettings:
    storage: str                      # files/ and runs/ live here: a folder or s3://bucket/prefix
    backend: str = "local"            # local | kubernetes
    max_upload_bytes: int = 512 << 20
    open_without_key: bool = False    # no key configured: loopback-only, one owner
    runs: list[str] = field(default_factory=list)  # folders / bucket prefixes of runs the dashboard shows
    clusters: list[str] = field(default_factory=list)  # namespaces whose kubetune Jobs the dashboard shows
    config: ServerConfig = field(default_factory=ServerConfig)  # the operator's policy (--config)
    operator_spec: dict[str, Any] = field(default_factory=dict)  # the server's flags as spec settings (namespace)

    def policy_for(self, records: Records, owner: str) -> tuple[JobPolicy, Budgets]:
        """The operator's side of a job of `owner`: the server's spec, then its team's, with the
        team's limits and budgets where it has its own."""
        name = records.key_name(owner)
        team = self.config.team_of(owner, name)
        layers = (self.operator_spec, self.config.spec, *((team.spec,) if team is not None else ()))
        team_name = next((n for n, t in self.config.teams.items() if t is team), None)
        return (JobPolicy(layers, self.config.limits_for(team), dict(self.config.rewards),
                          tuple(self.config.integrations), self.config.graders,
                          tenant=f"team-{team_name}" if team_name else f"key-{name or owner}"),
                self.config.budgets_for(team))


class Backend(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def cancelled(self, job: dict[str, Any]) -> None: ...
    def paused(self, job: dict[str, Any]) -> None: ...
    def unserve(self, job: dict[str, Any]) -> None: ...


@dataclass
class ControlState:
    records: Records
    settings: ControlSettings
    backend: Backend
    models: ModelHub


def control_state(request: Request) -> ControlState:
    return request.app.state.control


def caller(request: Request) -> str:
    """FastAPI dependency: the id of the key that sent the request (401 without a known key)."""
    state: ControlState = request.app.state.control
    if state.settings.open_without_key:
        return LOCAL_OWNER
    owner = key_owner(state.records, request.headers.get("authorization", ""))
    if owner is None:
        raise ApiError(401, NO_KEY, code="invalid_api_key")
    return owner


NO_KEY = "missing or unknown API key (send Authorization: Bearer KEY)"


def key_owner(records: Records, authorization: str) -> str | None:
    """The id of the key in an Authorization header, or None for a missing or unknown one."""
    token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    # Looked up by digest: how long the lookup takes says nothing about the key itself.
    found = records.key_by_hash(digest(token)) if token else None
    return key_id(found["hash"]) if found is not None else None
