"""What the routes of one server share: the engine, its admission, generation and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from kubetune.serve.admission import Admission
from kubetune.serve.engine import TransformersEngine
from kubetune.serve.generation import Generation
from kubetune.serve.metrics import ServerMetrics


@dataclass
class ServerSettings:
    max_concurrency: int = 64
    api_key: str | None = None
    default_max_tokens: int = 256
    metrics_need_key: bool = False     # /metrics behind the API key too (--metrics-auth key)


@dataclass
class ServerState:
    engine: TransformersEngine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission
    generation: Generation
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, engine: TransformersEngine, settings: ServerSettings) -> ServerState:
        metrics = ServerMetrics()
        admission = Admission(settings.max_concurrency, metrics)
        return cls(engine, settings, metrics, admission,
                   Generation(engine, admission, metrics, settings.default_max_tokens))


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving this request."""
    return request.app.state.kubetune
