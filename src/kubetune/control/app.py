"""The control plane's FastAPI application: the API routes, the dashboard, and the backend that
runs jobs, started and stopped with the app."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from kubetune.control import api, web
from kubetune.control.state import Backend, ControlSettings, ControlState
from kubetune.control.models import ModelHub
from kubetune.control.store import Store
from kubetune.serve.errors import install_error_handlers

__all__ = ["create_app"]


def create_app(store: Store, settings: ControlSettings, backend: Backend, models: ModelHub) -> FastAPI:
    state = ControlState(store, settings, backend, models)

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
    app.include_router(api.router)
    app.include_router(web.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app
