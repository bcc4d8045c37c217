"""The dashboard: static assets at / (shipped in the package, no build step) and the JSON they read
under /api/. Data calls need the same key as the API; a job's run is visible only to its owner."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, Response

from kubetune.control.dashboard import RunRef, cluster_runs, curves, find_runs, run_detail, summary, sweeps
from kubetune.runs.view import RunView
from kubetune.control.state import ControlState, caller, control_state
from kubetune.serve.errors import ApiError

router = APIRouter()
STATIC = resources.files("kubetune.control") / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return FileResponse(str(STATIC / "index.html"), media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:  # a fixed list: no path from the request reaches the file system
        raise ApiError(404, f"no asset {name}", "not_found_error")
    return FileResponse(str(STATIC / name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


def visible(state: ControlState, owner: str) -> list[RunRef]:
    jobs = [RunRef(j["id"], j["run_uri"], "job", j["status"], j.get("fine_tuned_model") or j["id"], j["model"],
                   (j.get("metadata") or {}).get("sweep"))
            for j in state.records.jobs(owner, None, 1000)]
    clusters = cluster_runs(state.settings.clusters, lambda name: state.records.job(None, name) is not None) \
        if state.settings.clusters else []
    # A --runs folder that holds the server's own job runs never shows them: each is its owner's alone.
    shared = [r for r in find_runs(state.settings.runs) if state.records.job(None, r.name or "") is None]
    return jobs + shared + clusters


def _runs(state: ControlState, owner: str) -> list[dict[str, Any]]:
    return [summary(ref) for ref in visible(state, owner)]


@router.get("/api/runs")
async def runs(state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    return JSONResponse({"runs": await asyncio.to_thread(_runs, state, owner)})


@router.get("/api/run")
async def run(id: str, state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    refs = {r.id: r for r in await asyncio.to_thread(visible, state, owner)}
    if id not in refs:
        raise ApiError(404, f"no run {id}", "not_found_error", "id")
    return JSONResponse(await asyncio.to_thread(run_detail, refs[id]))


def _sweeps(state: ControlState, owner: str) -> list[dict[str, Any]]:
    members, lines = [], {}
    for ref in visible(state, owner):
        events = RunView(ref.uri).events()  # once per run: its summary and its curve
        found = summary(ref, events)
        if found["sweep"]:
            members.append(found)
            lines[found["id"]] = curves(events)
    return sweeps(members, lines)


@router.get("/api/sweeps")
async def sweep_list(state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    return JSONResponse({"sweeps": await asyncio.to_thread(_sweeps, state, owner)})
