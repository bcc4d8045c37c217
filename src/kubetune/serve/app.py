"""The OpenAI-compatible HTTP API over an engine, assembled from its parts: errors.py (OpenAI error
bodies), admission.py (at most max_concurrency requests; one more is 429), generation.py (one
request through the engine, streamed), routes/ (the endpoints) and the API-key check here.
"""

from __future__ import annotations

import contextlib
import hmac
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kubetune.serve.engine import TransformersEngine
from kubetune.serve.errors import error_body, install_error_handlers
from kubetune.serve.routes import openai, system
from kubetune.serve.state import ServerSettings, ServerState

__all__ = ["ServerSettings", "create_app"]


def create_app(engine: TransformersEngine, settings: ServerSettings | None = None) -> FastAPI:
    state = ServerState.build(engine, settings or ServerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.generation.close()

    app = FastAPI(title="kubetune", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.kubetune = state
    install_error_handlers(app)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        api = path.startswith("/v1/") or path == "/tokenize"  # /health and /metrics stay open for probes
        if api and state.settings.api_key and not _authorized(request, state.settings.api_key):
            state.metrics.requests.labels(path, "401").inc()
            return JSONResponse(error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                           "invalid_request_error", None, "invalid_api_key"), status_code=401)
        response = await call_next(request)
        if api:
            state.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    app.include_router(system.router)
    app.include_router(openai.router)
    return app


def _authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())
