"""/v1/chat/completions and /v1/completions, whole or streamed (SSE), as the openai client calls them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from kubetune.data.template import TemplateMismatch
from kubetune.serve.admission import Ticket, stream_response
from kubetune.serve.engine import Finished, GenerationParams
from kubetune.serve.errors import ApiError
from kubetune.serve.generation import usage
from kubetune.serve.protocol import ChatRequest, CompletionRequest
from kubetune.serve.state import ServerState, server_state
from kubetune.serve.answer import AnswerReader, Delta, thinks, whole_answer
from kubetune.serve.tools import plan_tools

router = APIRouter()


def _one_choice_streams(req: ChatRequest | CompletionRequest) -> None:
    if req.n > 1 and req.stream:
        raise ApiError(400, "n above 1 is answered without streaming here; stream one choice, or leave stream out",
                       param="n")


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, state: ServerState = Depends(server_state)) -> Response:
    gen = state.generation
    name = gen.served(req.model)
    conversation = req.conversation()
    if conversation[-1]["role"] == "assistant":
        raise ApiError(400, "the last message is the assistant's; end with a user or tool message", param="messages")
    served = state.engine.served[name]
    tools = req.tool_list()
    plan = plan_tools(req, served)
    prefix = plan.prefix if plan else ""
    try:
        prompt_ids = state.engine.encode_chat(name, conversation, tools=tools, prefix=prefix)
    except TemplateMismatch as exc:
        raise ApiError(400, f"{exc}", param="tools" if "`tools`" in str(exc) else "messages") from None
    params = gen.params(req.token_limit, req.temperature, req.top_p, req.seed, req.stop_list, len(prompt_ids),
                        "messages")
    _one_choice_streams(req)
    think = thinks(served.formatter.template)
    structured = plan is not None or think  # the text is read for reasoning and tool calls
    ticket = state.admission.enter()
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], reason: str | None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            reader = AnswerReader(plan, think, prefix) if structured else None
            async for item in gen.run(name, prompt_ids, params, ticket, keep_special=plan is not None):
                if isinstance(item, Finished):
                    reason = item.finish_reason
                    if reader is not None:
                        first = reader.sent_calls
                        for out in _delta_chunks(reader.finish(), first):
                            yield chunk(out, None)
                        reason = plan.finish if plan and reader.made_calls else reason
                    yield chunk({}, reason)
                    if include_usage:
                        yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                   "choices": [], "usage": usage(len(prompt_ids), item)})
                elif reader is not None:
                    first = reader.sent_calls
                    for out in _delta_chunks(reader.feed(item), first):
                        yield chunk(out, None)
                else:
                    yield chunk({"content": item}, None)
            yield "data: [DONE]\n\n"

        return stream_response(events(), ticket)

    def choice(index: int, text: str, finished: Finished) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = finished.finish_reason
        if structured:
            answer = whole_answer(plan, think, text, prefix)
            message["content"] = (answer.content.strip() or None) if answer.calls else answer.content
            if answer.reasoning.strip():
                message["reasoning_content"] = answer.reasoning.strip()
            if answer.calls:
                message["tool_calls"] = [c.openai() for c in answer.calls]
                reason = plan.finish if plan else reason
        return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}

    answers = await _choices(state, req.n, ticket,
                             lambda i, t: gen.complete(name, prompt_ids, _nth(params, i), t, keep_special=plan is not None))
    return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": name,
                         "choices": [choice(i, text, done) for i, (text, done) in enumerate(answers)],
                         "usage": usage(len(prompt_ids), *(done for _, done in answers))})


async def _choices(state: ServerState, n: int, first: Ticket,
                   answer: Callable[[int, Ticket], Awaitable[tuple[str, Finished]]]) -> list[tuple[str, Finished]]:
    """`n` answers to one prompt, each a request of its own in the running batch (with its own
    admission slot: all of them or a 429 before any is generated)."""
    tickets = [first]
    try:
        tickets += [state.admission.enter() for _ in range(n - 1)]
    except ApiError:
        for t in tickets:
            t.release()
        raise
    return list(await asyncio.gather(*(answer(i, t) for i, t in enumerate(tickets))))


def _nth(params: GenerationParams, index: int) -> GenerationParams:
    """The parameters of choice `index`: with a seed, each choice its own (seed + index), so n sampled
    choices differ and the same request gives the same n again."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + index)


def _delta_chunks(delta: Delta, first_index: int) -> list[dict[str, Any]]:
    """Stream deltas: reasoning, content, then each complete call (id, name and arguments in one delta)."""
    out: list[dict[str, Any]] = [{"reasoning_content": delta.reasoning}] if delta.reasoning else []
    out += [{"content": delta.content}] if delta.content else []
    out += [{"tool_calls": [{"index": first_index + k, **call.openai()}]} for k, call in enumerate(delta.calls)]
    return out


@router.post("/v1/completions")
async def completions(req: CompletionRequest, state: ServerState = Depends(server_state)) -> Response:
    gen = state.generation
    name = gen.served(req.model)
    prompt_ids = state.engine.encode(name, req.text())
    params = gen.params(req.token_limit, req.temperature, req.top_p, req.seed, req.stop_list, len(prompt_ids),
                        "prompt")
    _one_choice_streams(req)
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
    answers = await _choices(state, req.n, ticket, lambda i, t: gen.complete(name, prompt_ids, _nth(params, i), t))
    return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": name,
                         "choices": [{"index": i, "text": prefix + text, "logprobs": None,
                                      "finish_reason": done.finish_reason} for i, (text, done) in enumerate(answers)],
                         "usage": usage(len(prompt_ids), *(done for _, done in answers))})
