"""OpenAI's files and fine-tuning endpoints, /v1/models, and chat with a job's model, as the official
`openai` client calls them. Every handler names the caller (`Caller`: the key's id) and sees only
that caller's records; another key's job is a 404, as if it did not exist."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kubetune.control import files as uploads
from kubetune.control.jobs import ACTIVE, JobRequest, build_spec, job_object, model_name, new_job_id, \
    resolved_hyperparameters
from kubetune.control.policy import Refused
from kubetune.control.redact import redact
from kubetune.control.results import RESULTS_PURPOSE
from kubetune.control.start import resolve_start
from kubetune.control.runinfo import checkpoints, openai_events, trained_tokens
from kubetune.runs.view import RunView
from kubetune.control.state import ControlState, caller, control_state
from kubetune.artifacts.events import StepEvent
from kubetune.errors import KubetuneError, SpecError, UsageError
from kubetune.graders import Grader, GraderError, check_grader, grade
from kubetune.serve.errors import ApiError
from kubetune.spec.load import spec_to_yaml
from kubetune.runs.run import remove_run

router = APIRouter()
PURPOSES = ("fine-tune",)                        # what a caller uploads
LISTED = (*PURPOSES, RESULTS_PURPOSE)            # what it lists (result files are the server's)
EXPIRY_S = (3600, 30 * 24 * 3600)                # OpenAI's bounds of expires_after.seconds
_LOCKS: dict[str, asyncio.Lock] = {}


def _owner_lock(owner: str) -> asyncio.Lock:
    """One per key, in this process: a key's budget checks and what they allow happen together. Replicas
    sharing a database each hold their own (a key could exceed its budget by one job per replica)."""
    return _LOCKS.setdefault(owner, asyncio.Lock())


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit: must be between 1 and 100", param="limit")
    return limit


def _file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": row.get("expires_at"), "status_details": None}


def _expires_after(form: Any) -> int | None:
    """OpenAI's `expires_after[anchor]=created_at` and `expires_after[seconds]=N` (1 hour to 30 days): the seconds."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise ApiError(400, "expires_after.anchor: must be created_at", param="expires_after.anchor")
    try:
        value = int(str(seconds))
    except ValueError:
        value = -1
    if not EXPIRY_S[0] <= value <= EXPIRY_S[1]:
        raise ApiError(400, f"expires_after.seconds: a whole number from {EXPIRY_S[0]} (one hour) to {EXPIRY_S[1]} "
                            "(30 days)", param="expires_after.seconds")
    return value


def _usage_error(exc: UsageError, param: str | None) -> ApiError:
    message = exc.message if not isinstance(exc, SpecError) else "; ".join(str(p) for p in exc.problems)
    if isinstance(exc, SpecError):
        param = exc.problems[0].where.split(":")[0] if exc.problems else param
    return ApiError(400, redact(message + (f" ({exc.hint})" if exc.hint else "")), param=param)


# files

@router.post("/v1/files")
async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...),
                 state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose {purpose!r}: this server stores {', '.join(PURPOSES)} files", param="purpose")
    expires_after = _expires_after(await request.form())  # parsed already: File/Form read it
    budget = state.settings.policy_for(state.records, owner)[1].max_upload_bytes
    async with _owner_lock(owner):  # one upload of a key at a time: two at once cannot both take the room left
        room = budget - state.records.stored_bytes(owner)
        try:
            row = await asyncio.to_thread(uploads.save_upload, file.file, file.filename or "upload.jsonl",
                                          state.settings.storage, owner, purpose,
                                          min(state.settings.max_upload_bytes, room))
        except uploads.FileTooLarge as exc:
            if room < state.settings.max_upload_bytes:
                raise ApiError(429, f"your files would take more than this server's {budget:,} bytes per key; "
                                    "delete some first", "rate_limit_error", "file", "storage_quota_exceeded") from None
            raise ApiError(413, exc.message, param="file", code="file_too_large") from None
        except UsageError as exc:
            raise _usage_error(exc, "file") from None
        # From the stored created_at, not a clock read before the upload: expires_at - created_at is exact
        row["expires_at"] = None if expires_after is None else row["created_at"] + expires_after
        state.records.add_file(**row)
    return JSONResponse(_file_object(row))


@router.get("/v1/files")
async def list_files(purpose: str | None = None, after: str | None = None, limit: int = 100, order: str = "desc",
                     state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    if purpose is not None and purpose not in LISTED:
        raise ApiError(400, f"purpose {purpose!r}: this server has {', '.join(LISTED)} files", param="purpose")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order: asc or desc", param="order")
    rows = state.records.files(owner, purpose, after, _limit(limit) + 1, newest_first=order != "asc")
    return JSONResponse(_page([_file_object(r) for r in rows], limit))


def _own_file(state: ControlState, owner: str, file_id: str, param: str = "file_id") -> dict[str, Any]:
    row = state.records.file(owner, file_id)
    if row is None and param == "file_id":  # the path names it: the resource is not there
        raise ApiError(404, f"no file {file_id}", "invalid_request_error", param, "file_not_found")
    if row is None:  # a field of the request names it: the request is wrong (OpenAI's 400 on the field)
        raise ApiError(400, f"invalid {param}: {file_id} (no such file for this key; upload it with "
                       "purpose fine-tune)", "invalid_request_error", param, "file_not_found")
    return row


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, state: ControlState = Depends(control_state),
                        owner: str = Depends(caller)) -> JSONResponse:
    return JSONResponse(_file_object(_own_file(state, owner, file_id)))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, state: ControlState = Depends(control_state),
                       owner: str = Depends(caller)) -> Response:
    row = _own_file(state, owner, file_id)
    from kubetune.storage.store import Store

    parent, name = row["uri"].rsplit("/", 1)
    # a piece at a time (in the thread pool): a large file is never held whole in memory
    return StreamingResponse(Store(parent).chunks(name), media_type="application/octet-stream",
                             headers={"Content-Length": str(row["bytes"])})


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, state: ControlState = Depends(control_state),
                      owner: str = Depends(caller)) -> JSONResponse:
    row = _own_file(state, owner, file_id)
    await asyncio.to_thread(uploads.remove_upload, row["uri"])
    state.records.delete_file(owner, file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# fine-tuning jobs

@router.post("/v1/fine_tuning/jobs")
async def create_job(req: JobRequest, state: ControlState = Depends(control_state),
                     owner: str = Depends(caller)) -> JSONResponse:
    train = _own_file(state, owner, req.training_file, "training_file")
    valid = _own_file(state, owner, req.validation_file, "validation_file") if req.validation_file else None
    for row, param in ((train, "training_file"), (valid, "validation_file")):
        if row is not None and row["purpose"] not in PURPOSES:
            raise ApiError(400, f"{row['id']} is a {row['purpose']} file; train on a fine-tune file", param=param)
    if req.suffix is not None and not all(c.isalnum() or c in "-_." for c in req.suffix):
        raise ApiError(400, "suffix: letters, digits, '-', '_' and '.' only", param="suffix")
    async with _owner_lock(owner):  # the count and the new job together: parallel requests cannot both fit
        return await _create_job(req, state, owner, train, valid)


async def _create_job(req: JobRequest, state: ControlState, owner: str, train: dict[str, Any],
                      valid: dict[str, Any] | None) -> JSONResponse:
    policy, budgets = state.settings.policy_for(state.records, owner)
    _check_queue_room(state, owner, budgets.max_queued_jobs)
    job_id = new_job_id()
    run_uri = f"{state.settings.storage.rstrip('/')}/runs/{job_id}"
    try:
        start = await asyncio.to_thread(resolve_start, state.records, owner, req.model, state.settings.config.models)
        spec = await asyncio.to_thread(build_spec, job_id, req, start, train["uri"], valid["uri"] if valid else None,
                                       run_uri, policy, train["rows"], valid["rows"] if valid else None)
    except Refused as exc:
        raise ApiError(400, exc.message + (f" ({exc.hint})" if exc.hint else ""), param=exc.param,
                       code="model_not_available" if exc.param == "model" else "invalid_value") from None
    except UsageError as exc:
        raise _usage_error(exc, "kubetune") from None
    method = req.resolved_method().model_dump(exclude_none=True)
    method[method["type"]] = {**method.get(method["type"], {}), "hyperparameters": resolved_hyperparameters(spec)}
    row = state.records.add_job(
        id=job_id, owner=owner, model=req.model, training_file=train["id"], training_uri=train["uri"],
        validation_file=valid["id"] if valid else None, validation_uri=valid["uri"] if valid else None,
        suffix=req.suffix, seed=spec.train.seed, method=method, settings=req.kubetune or {}, metadata=req.metadata,
        integrations=[i.model_dump(exclude_none=True) for i in req.integrations or []] or None,
        spec=spec_to_yaml(spec), status="validating_files", backend=state.settings.backend, run_uri=run_uri,
        fine_tuned_model=model_name(req.model, req.suffix, job_id),  # the name the caller used, never a server path
        attempts=0, created_at=int(time.time()))
    state.records.add_event(job_id, "Created fine-tuning job")
    state.records.add_event(job_id, f"Validating training file: {train['id']}"
                                  + (f" and validation file: {valid['id']}" if valid else ""))
    return JSONResponse(_with_progress(row))


def _check_queue_room(state: ControlState, owner: str, limit: int) -> None:
    """429 when the key already has its budget of jobs validating or queued (call under its lock)."""
    waiting = state.records.count_jobs(owner, ["validating_files", "queued"])
    if waiting >= limit:
        raise ApiError(429, f"you have {waiting} jobs validating or queued, this server's limit per key; wait for "
                            "them or cancel some", "rate_limit_error", None, "too_many_jobs")


def _with_progress(job: dict[str, Any]) -> dict[str, Any]:
    """The job object, with trained_tokens read from the run while it trains."""
    out = job_object(job)
    if job["status"] == "running":
        events = RunView(job["run_uri"]).events()
        out["trained_tokens"] = trained_tokens(events)
        steps = [e for e in events if isinstance(e, StepEvent) and e.eta_s is not None]
        if steps:
            out["estimated_finish"] = int(steps[-1].time + steps[-1].eta_s)
    return out


def _own_job(state: ControlState, owner: str, job_id: str) -> dict[str, Any]:
    job = state.records.job(owner, job_id)
    if job is None:
        raise ApiError(404, f"no fine-tuning job {job_id}", "invalid_request_error", "fine_tuning_job_id",
                       "fine_tuning_job_not_found")
    return job


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20,
                    state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    wanted = _metadata_filter(request)
    if wanted == {}:
        rows = state.records.jobs(owner, after, _limit(limit) + 1)
        page = _page([job_object(r) for r in rows], limit)
    else:
        found = await asyncio.to_thread(state.records.jobs_with_metadata, owner, wanted, after)
        page = _page([job_object(r) for r in found], _limit(limit))
    return JSONResponse({k: page[k] for k in ("object", "data", "has_more")})


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """`metadata[k]=v` query parameters as {k: v} ({} for no filter); `metadata=null` (None) selects the
    jobs without metadata, as OpenAI's list does."""
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            if value != "null":
                raise ApiError(400, "metadata: filter with metadata[KEY]=VALUE, or metadata=null", param="metadata")
            return None
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata["):-1]
            if not key or len(key) > 64 or len(value) > 512 or len(wanted) >= 16:
                raise ApiError(400, "metadata: at most 16 filters, keys of 1-64 and values of up to 512 characters",
                               param="metadata")
            wanted[key] = value
    return wanted


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, state: ControlState = Depends(control_state),
                       owner: str = Depends(caller)) -> JSONResponse:
    job = _own_job(state, owner, job_id)
    return JSONResponse(await asyncio.to_thread(_with_progress, job))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, state: ControlState = Depends(control_state),
                     owner: str = Depends(caller)) -> JSONResponse:
    job = _own_job(state, owner, job_id)
    cancellable = (*ACTIVE, "paused")
    if job["status"] not in cancellable:
        raise ApiError(400, f"the job is {job['status']}; only a validating, queued, running or paused job can be "
                            "cancelled", param="fine_tuning_job_id", code="job_not_cancellable")
    if state.records.update_job(job_id, expect=cancellable, status="cancelled", finished_at=int(time.time())):
        state.records.add_event(job_id, "Job cancelled" + (": training stops at a checkpoint, which is kept"
                                                        if job["status"] == "running" else ""))
        await asyncio.to_thread(state.backend.cancelled, job)
    return JSONResponse(job_object(_own_job(state, owner, job_id)))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(job_id: str, state: ControlState = Depends(control_state),
                    owner: str = Depends(caller)) -> JSONResponse:
    """A running job stops at a checkpoint and gives its resources back; a queued one waits unstarted.
    Neither keeps its place in the queue: resume queues it again at the end."""
    job = _own_job(state, owner, job_id)
    if job["status"] not in ("queued", "running"):
        raise ApiError(400, f"the job is {job['status']}; only a queued or running job can be paused",
                       param="fine_tuning_job_id", code="job_not_pausable")
    if state.records.update_job(job_id, expect=["queued", "running"], status="paused"):
        state.records.add_event(job_id, "Job paused" + (": training stops at a checkpoint, which resume continues from"
                                                     if job["status"] == "running" else ""))
        await asyncio.to_thread(state.backend.paused, job)
    return JSONResponse(job_object(_own_job(state, owner, job_id)))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(job_id: str, state: ControlState = Depends(control_state),
                     owner: str = Depends(caller)) -> JSONResponse:
    job = _own_job(state, owner, job_id)
    if job["status"] != "paused":
        raise ApiError(400, f"the job is {job['status']}; only a paused job can be resumed",
                       param="fine_tuning_job_id", code="job_not_paused")
    if job["worker"] is not None and job["backend"] == "local":
        raise ApiError(409, "the job is still stopping at its checkpoint; resume it once its 'Training paused' "
                            "event is there", param="fine_tuning_job_id", code="job_still_stopping")
    budgets = state.settings.policy_for(state.records, owner)[1]
    async with _owner_lock(owner):
        _check_queue_room(state, owner, budgets.max_queued_jobs)
        if state.records.update_job(job_id, expect=["paused"], status="queued", worker=None):
            state.records.add_event(job_id, "Job resumed: queued to continue from its last checkpoint")
    return JSONResponse(job_object(_own_job(state, owner, job_id)))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, after: str | None = None, limit: int = 20,
                     state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    job = _own_job(state, owner, job_id)
    events = await asyncio.to_thread(lambda: openai_events(job_id, state.records.events(job_id),
                                                           RunView(job["run_uri"]).events()))
    newest = list(reversed(events))
    return JSONResponse(_after(newest, after, _limit(limit)))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10,
                          state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    job = _own_job(state, owner, job_id)
    found = await asyncio.to_thread(lambda: checkpoints(job, RunView(job["run_uri"]).events()))
    return JSONResponse(_after(found, after, _limit(limit)))


def _after(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return _page(items, limit)


# models and chat

def _model_object(job: dict[str, Any]) -> dict[str, Any]:
    return {"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"] or job["created_at"],
            "owned_by": "user", "root": job["model"], "parent": job["model"]}


@router.get("/v1/models")
async def list_models(state: ControlState = Depends(control_state), owner: str = Depends(caller)) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_object(j) for j in state.records.succeeded_models(owner)]})


def _own_model(state: ControlState, owner: str, model: str) -> dict[str, Any]:
    for job in state.records.succeeded_models(owner):
        if job["fine_tuned_model"] == model:
            return job
    raise ApiError(404, f"the model `{model}` does not exist", "invalid_request_error", "model", "model_not_found")


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: ControlState = Depends(control_state),
                         owner: str = Depends(caller)) -> JSONResponse:
    return JSONResponse(_model_object(_own_model(state, owner, model)))


def _started_from(state: ControlState, owner: str, parent: dict[str, Any]) -> str | None:
    """A job that needs this model's run: one not ended that starts from it, or (the parent a full
    fine-tune, whose weights are the child's base) a child whose model still exists."""
    from kubetune.spec.load import load_spec_text

    name = parent["fine_tuned_model"]
    full = load_spec_text(parent["spec"], f"job {parent['id']}").method.type == "full"
    for j in state.records.jobs_of(owner):
        if j["model"] != name and not j["model"].startswith(name + ":"):
            continue
        if j["status"] in (*ACTIVE, "paused"):
            return f"job {j['id']}, which has not ended"
        if full and j["status"] == "succeeded" and j.get("model_deleted_at") is None:
            return f"the model {j['fine_tuned_model']}, trained on its weights"
    return None


@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, state: ControlState = Depends(control_state),
                       owner: str = Depends(caller)) -> JSONResponse:
    """The model stops being served at once; its run (adapter, checkpoints, events) is removed; the
    job stays, as OpenAI's does, naming a model that no longer exists."""
    async with _owner_lock(owner):  # a job created meanwhile cannot start from what is being removed
        job = _own_model(state, owner, model)
        in_use = _started_from(state, owner, job)
        if in_use:
            raise ApiError(400, f"the model `{model}` is the start of {in_use}; delete or cancel that first",
                           param="model", code="model_in_use")
        try:  # off the operator's vLLM Deployments first: no replica may go on serving a deleted model
            await asyncio.to_thread(state.backend.unserve, job)
        except KubetuneError as exc:
            raise ApiError(503, f"the model could not be taken off its serving Deployment: {redact(exc.message)}; "
                                "try again", "server_error", None, "cluster_unavailable") from None
        if not state.records.update_job(job["id"], expect=["succeeded"], model_deleted_at=int(time.time())):
            raise ApiError(404, f"the model `{model}` does not exist", "invalid_request_error", "model",
                           "model_not_found")
    await asyncio.to_thread(state.models.forget, model)
    try:
        await asyncio.to_thread(remove_run, job["run_uri"])
    except (KubetuneError, OSError) as exc:  # the model is gone from the API; what is left is the operator's
        state.records.add_event(job["id"], f"Model deleted; its run could not be removed: {redact(str(exc))}", "warn")
    else:
        state.records.add_event(job["id"], f"Model {model} deleted: it is no longer served and its run was removed")
    return JSONResponse({"id": model, "object": "model", "deleted": True})


@router.post("/v1/chat/completions")
@router.post("/v1/completions")
async def generate(request: Request, state: ControlState = Depends(control_state),
                   owner: str = Depends(caller)) -> Response:
    """Handed to the serving app of the model's engine, body and all, so the answer is exactly
    `kubetune serve`'s."""
    body = await request.body()
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        raise ApiError(400, "the request body is not a JSON object", code="invalid_json") from None
    if not isinstance(model, str) or model not in {j["fine_tuned_model"] for j in state.records.succeeded_models(owner)}:
        raise ApiError(404, f"the model `{model}` does not exist or is not ready (a succeeded job's fine_tuned_model)",
                       "invalid_request_error", "model", "model_not_found")
    try:
        app = await asyncio.to_thread(state.models.app_for, model)
    except UsageError as exc:
        raise ApiError(503, f"the model `{model}` cannot be loaded: {redact(exc.message)}", "server_error", "model",
                       "model_unavailable") from None
    if app is None:
        raise ApiError(404, f"the model `{model}` does not exist", "invalid_request_error", "model", "model_not_found")
    return _Forward(app, body)


class _Forward(Response):
    """A response that is another ASGI app's answer to this request (its body replayed)."""

    def __init__(self, app: Callable[..., Any], body: bytes) -> None:
        super().__init__()
        self.app, self.replay = app, body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.replay, "more_body": False}
            return await receive()  # the disconnect, which cancels generation

        await self.app(scope, replay, send)


# graders (OpenAI's alpha endpoints)

_GRADING = asyncio.Semaphore(2)
GRADING_DEADLINE_S = 120.0  # a /graders/run's judge calls: none starts after this, none runs past it


class GraderRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Grader
    model_sample: str = Field(max_length=1 << 20)
    item: Any = None


class GraderValidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Grader


def _sandbox(state: ControlState) -> Any:
    """The limits python graders run under here, or None where the operator disabled them."""
    from kubetune.graders.sandbox import SandboxLimits

    g = state.settings.config.graders
    return SandboxLimits(seconds=g.python_seconds, memory_mb=g.python_memory_mb) if g.python else None


async def _checked(grader: Any, state: ControlState) -> Any:
    """The grader checked as a job would check it; a python grader is loaded in the sandbox."""
    from kubetune.graders import IN_PROCESS, python_graders
    from kubetune.graders.sandbox import check_python, sandbox_problem

    sandbox = _sandbox(state)
    try:
        check_grader(grader, IN_PROCESS | ({"python"} if sandbox else set()),
                     judges=state.settings.config.graders.models,
                     embeddings=state.settings.config.graders.embeddings is not None)
    except GraderError as exc:
        raise ApiError(400, f"{exc.param}: {exc.message}", param=exc.param, code="invalid_grader") from None
    sources = python_graders(grader)
    if sources:
        problem = await asyncio.to_thread(sandbox_problem)
        if problem:
            raise ApiError(400, f"grader: python graders cannot run on this server: {redact(problem)}", param="grader",
                           code="invalid_grader")
        for key, sub in sources.items():
            failed = await asyncio.to_thread(check_python, sub.source, sandbox)
            if failed:
                where = "grader.source" if grader.type == "python" else f"grader.graders.{key}.source"
                raise ApiError(400, f"{where}: the grader does not load: {redact(failed)}", param=where,
                               code="invalid_grader")
    return sandbox


def _endpoints(state: ControlState) -> Any:
    """The judge and embedding models a request's graders may use: no retries, and one deadline for
    all of a request's calls, so a slow judge cannot hold the graders' slots for long."""
    from kubetune.graders.judge import Endpoints

    g = state.settings.config.graders
    return Endpoints(g.models, g.embeddings, retries=0, deadline_s=GRADING_DEADLINE_S)


def _busy() -> None:
    if _GRADING.locked():  # graders are CPU work (threads, sandbox processes): a flood must not starve the API
        raise ApiError(429, "graders are busy; try again in a moment", "rate_limit_error", None, "graders_busy",
                       headers={"Retry-After": "1"})


@router.post("/v1/fine_tuning/alpha/graders/validate")
async def validate_grader(req: GraderValidate, state: ControlState = Depends(control_state),
                          owner: str = Depends(caller)) -> JSONResponse:
    _busy()
    async with _GRADING:
        await _checked(req.grader, state)
    return JSONResponse({"grader": req.grader.model_dump(exclude_none=True)})


@router.post("/v1/fine_tuning/alpha/graders/run")
async def run_grader(req: GraderRun, state: ControlState = Depends(control_state),
                     owner: str = Depends(caller)) -> JSONResponse:
    _busy()
    async with _GRADING:
        sandbox = await _checked(req.grader, state)
        graded = await asyncio.to_thread(grade, req.grader, req.model_sample, req.item, sandbox, _endpoints(state))
    multi = req.grader.type == "multi"
    judged = any(graded.errors.get(k) for k in ("model_grader_server_error", "model_grader_parse_error",
                                                 "model_grader_refusal_error"))
    details = redact(graded.details) if graded.details else None  # a grader process's message may name a path
    usage = {model: {**t, "total_tokens": t["prompt_tokens"] + t["completion_tokens"]}
             for model, t in graded.tokens.items()}
    return JSONResponse({
        "reward": graded.reward, "sub_rewards": graded.scores if multi else {},
        "model_grader_token_usage_per_model": usage,
        "metadata": {"name": req.grader.name, "type": req.grader.type, "execution_time": graded.execution_time,
                     "scores": graded.scores, "token_usage": sum(t["total_tokens"] for t in usage.values()) or None,
                     "sampled_model_name": None,
                     "errors": {**graded.errors, "model_grader_server_error_details": details if judged else None,
                                "python_grader_runtime_error_details": None if judged else details,
                                "python_grader_server_error_type": None}},
    })
