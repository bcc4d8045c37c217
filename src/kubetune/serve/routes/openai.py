"""/v1/chat/completions and /v1/completions, whole or streamed (SSE), as the openai client calls them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from kubetune.serve.admission import stream_response
from kubetune.serve.engine import Finished
from kubetune.serve.errors import ApiError
from kubetune.serve.generation import usage
from kubetune.serve.protocol import ChatRequest, CompletionRequest
from kubetune.serve.state import ServerState, server_state

router = APIRouter()


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, state: ServerState = Depends(server_state)) -> Response:
    gen = state.generation
    name = gen.served(req.model)
    conversation = req.conversation()
    if conversation[-1]["role"] == "assistant":
        raise ApiError(400, "the last message is the assistant's; end with a user message", param="messages")
    prompt_ids = state.engine.encode_chat(name, conversation)
    params = gen.params(req.token_limit, req.temperature, req.top_p, req.seed, req.stop_list, len(prompt_ids),
                        "messages")
    ticket = state.admission.enter()
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], reason: str | None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for item in gen.run(name, prompt_ids, params, ticket):
                if isinstance(item, Finished):
                    yield chunk({}, item.finish_reason)
                    if include_usage:
                        yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                   "choices": [], "usage": usage(len(prompt_ids), item)})
                else:
                    yield chunk({"content": item}, None)
            yield "data: [DONE]\n\n"

        return stream_response(events(), ticket)
    text, finished = await gen.complete(name, prompt_ids, params, ticket)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finished.finish_reason}],
                         "usage": usage(len(prompt_ids), finished)})


@router.post("/v1/completions")
async def completions(req: CompletionRequest, state: ServerState = Depends(server_state)) -> Response:
    gen = state.generation
    name = gen.served(req.model)
    prompt_ids = state.engine.encode(name, req.text())
    params = gen.params(req.token_limit, req.temperature, req.top_p, req.seed, req.stop_list, len(prompt_ids),
                        "prompt")
    ticket = state.admission.enter()
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prefix = req.text() if req.echo else ""
    if req.stream:
        async def events() -> AsyncIterator[str]:
            first = prefix
            async for item in gen.run(name, prompt_ids, params, ticket):
                text, reason = (("", item.finish_reason) if isinstance(item, Finished) else (first + item, None))
                first = ""
                yield sse({"id": rid, "object": "text_completion", "created": now, "model": name,
                           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]})
            yield "data: [DONE]\n\n"

        return stream_response(events(), ticket)
    text, finished = await gen.complete(name, prompt_ids, params, ticket)
    return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": name,
                         "choices": [{"index": 0, "text": prefix + text, "logprobs": None,
                                      "finish_reason": finished.finish_reason}],
                         "usage": usage(len(prompt_ids), finished)})
