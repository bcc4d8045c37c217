"""/health and /metrics for probes and Prometheus (open without a key), /v1/models, and vLLM's /tokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetune.serve.errors import ApiError
from kubetune.data.template import TemplateMismatch
from kubetune.serve.protocol import TokenizeRequest, conversation
from kubetune.serve.state import ServerState, server_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(server_state)) -> Response:
    """200 while the engine can answer; 503 once a batching thread has died, so a liveness probe restarts
    the pod instead of leaving it to fail every request."""
    failure = state.engine.failure
    if failure:
        return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def prometheus(state: ServerState = Depends(server_state)) -> Response:
    return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": state.created, "owned_by": "kubetune", "root": m.source}
        for m in state.engine.served.values()]}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: ServerState = Depends(server_state)) -> dict[str, Any]:
    name = state.generation.served(req.model)
    if req.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            tokens = state.engine.encode_chat(name, conversation(req.messages),
                                              add_generation_prompt=req.add_generation_prompt, tools=tools)
        except TemplateMismatch as exc:
            raise ApiError(400, str(exc), param="messages") from None
    elif req.prompt is not None:
        tokens = state.engine.encode(name, req.prompt)
    else:
        raise ApiError(400, "give messages or prompt", param="messages", code="missing_field")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.context_length}
