"""The control plane's FastAPI application: the API routes, the dashboard, and the backend that
runs jobs, started and stopped with the app."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kubetune.control import api, web
from kubetune.control.state import NO_KEY, Backend, ControlSettings, ControlState, key_owner
from kubetune.control.models import ModelHub
from kubetune.control.records import Records
from kubetune.serve.body_limit import BodyLimit
from kubetune.serve.errors import error_body, install_error_handlers

__all__ = ["create_app"]


def create_app(records: Records, settings: ControlSettings, backend: Backend, models: ModelHub) -> FastAPI:
    state = ControlState(records, settings, backend, models)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        backend.start()
        try:
            yield
        finally:
            backend.stop()
            models.close()

    app = FastAPI(title="kubetune control plane", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.control = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, skip=("/v1/files",))  # the upload has its own limit, below
    app.add_middleware(_UploadLimit, limit=settings.max_upload_bytes)
    app.add_middleware(_KeyFirst, state=state)  # outermost: no body of a stranger's is read
    app.include_router(api.router)
    app.include_router(web.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


class _KeyFirst:
    """The API key checked before anything else of a request is read (plain ASGI, outermost): the
    routes check it again as a dependency, but by then FastAPI has parsed the body, so a stranger
    could make the server spool an upload or scan a JSON body."""

    def __init__(self, app: ASGIApp, state: ControlState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keyed = scope["type"] == "http" and scope["path"].startswith(("/v1/", "/api/"))
        if keyed and not self.state.settings.open_without_key and \
                key_owner(self.state.records, Headers(scope=scope).get("authorization", "")) is None:
            body = error_body(NO_KEY, "invalid_request_error", None, "invalid_api_key")
            await JSONResponse(body, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


MULTIPART_SLACK = 64 << 10  # the form's own bytes around the file


class _UploadLimit:
    """Refuses an upload by its Content-Length before any of its body is read: FastAPI parses a
    multipart body (spooling it to disk) before the handler runs, so the handler's exact limit alone
    would come after the disk had filled."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/files":
            length = Headers(scope=scope).get("content-length", "")
            refusal = None
            if not length.isdigit():
                refusal = (411, error_body("an upload needs a Content-Length header", "invalid_request_error",
                                           "file", "length_required"))
            elif int(length) > self.limit + MULTIPART_SLACK:
                refusal = (413, error_body(f"the upload ({int(length):,} bytes) is larger than the server's upload "
                                           f"limit of {self.limit:,} bytes (split the file, or start the server "
                                           "with a larger --max-upload-mb)", "invalid_request_error", "file",
                                           "file_too_large"))
            if refusal is not None:
                await JSONResponse(refusal[1], status_code=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)
