"""The OpenAI-compatible HTTP API over an engine, assembled from its parts: errors.py (OpenAI error
bodies), admission.py (at most max_concurrency requests; one more is 429), generation.py (one
request through the engine, streamed), routes/ (the endpoints) and the API-key check here.
"""

from __future__ import annotations

import contextlib
import hmac
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.serve.body_limit import BodyLimit

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

    app.add_middleware(BodyLimit)  # inside the key check: a stranger's body is not read
    app.add_middleware(_AuthAndCount, state=state, routes=app.router.routes)
    app.include_router(system.router)
    app.include_router(openai.router)
    return app


class _AuthAndCount:
    """The API key check and the request counter, as plain ASGI: Starlette's BaseHTTPMiddleware pipes
    every streamed chunk through a memory stream and an extra task, which a server streaming one
    token per chunk to dozens of clients pays for on every token.

    Requests are counted by route (`/v1/chat/completions`), never by the raw path: a label per path
    a client makes up would grow the registry (and /metrics) without bound."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: list[BaseRoute]) -> None:
        self.app, self.state, self.routes = app, state, routes

    def _route(self, scope: Scope) -> str:
        return _matching(self.routes, scope) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        api = scope["type"] == "http" and (path.startswith("/v1/") or path == "/tokenize")
        keyed = api or (path == "/metrics" and self.state.settings.metrics_need_key)
        if not api and not keyed:  # /health (and /metrics unless --metrics-auth key) stay open for probes
            await self.app(scope, receive, send)
            return
        metrics, key = self.state.metrics, self.state.settings.api_key
        route = self._route(scope)
        if key and not _authorized(Headers(scope=scope).get("authorization", ""), key):
            metrics.requests.labels(route, "401").inc()
            response = JSONResponse(error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                               "invalid_request_error", None, "invalid_api_key"), status_code=401)
            await response(scope, receive, send)
            return
        if not api:
            await self.app(scope, receive, send)
            return

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":  # the router has put the route it chose in the scope
                chosen = getattr(scope.get("route"), "path", None) or route
                metrics.requests.labels(chosen, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counted)


def _matching(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The path template of the route that takes this request; routers included whole (FastAPI keeps
    them as one entry) are looked into."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found = _matching(inner.routes, scope)
            if found:
                return found
        elif route.matches(scope)[0] == Match.FULL:
            return getattr(route, "path", None)
    return None


def _authorized(given: str, key: str) -> bool:
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())
