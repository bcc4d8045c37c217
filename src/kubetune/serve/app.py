"""The OpenAI-compatible HTTP API over an engine: /v1/models, /v1/chat/completions (SSE streaming
or not), /v1/completions, /tokenize (vLLM's), /health and /metrics.

Admission control: at most `max_concurrency` requests are admitted (generating or queued for the
engine's single worker); one more gets HTTP 429 with an OpenAI error body instead of piling up.
Every error a client can cause is an OpenAI-style body: {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune.serve.engine import Finished, GenerationParams, TransformersEngine, iter_text, split_stop
from kubetune.serve.metrics import ServerMetrics
from kubetune.serve.protocol import ChatRequest, CompletionRequest, TokenizeRequest, error_body

log = logging.getLogger("kubetune.serve")


@dataclass
class ServerSettings:
    max_concurrency: int = 64
    api_key: str | None = None
    default_max_tokens: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


class _Ticket:
    """One admitted request's slot. The engine job releases it when it ends; until the job exists the
    ticket owns it, so a request that never reaches the engine (a stream whose client left before
    the first byte) gives its slot back when the ticket is dropped."""

    def __init__(self, admission: _Admission) -> None:
        self._admission, self._owned = admission, True

    def hand_over(self) -> None:
        self._owned = False

    def release(self) -> None:
        if self._owned:
            self._owned = False
            self._admission.leave(started=False)


class _Admission:
    """Counts admitted requests; `enter` refuses above the limit (never blocks)."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit, self.admitted, self.running, self.metrics = limit, 0, 0, metrics
        self._lock = threading.Lock()

    def enter(self) -> _Ticket:
        with self._lock:
            if self.admitted >= self.limit:
                self.metrics.rejected.inc()
                raise ApiError(429, f"the server is at its limit of {self.limit} concurrent requests; retry shortly",
                               "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": "1"})
            self.admitted += 1
            self._publish()
        return _Ticket(self)

    def started(self) -> None:
        with self._lock:
            self.running += 1
            self._publish()

    def leave(self, started: bool) -> None:
        with self._lock:
            self.admitted -= 1
            self.running -= 1 if started else 0
            self._publish()

    def _publish(self) -> None:
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(self.admitted - self.running)


def create_app(engine: TransformersEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    admission = _Admission(settings.max_concurrency, metrics)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-engine")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kubetune", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON", "invalid_request_error", None,
                                           "invalid_json"), status_code=400)
        if not loc:
            return JSONResponse(error_body("the request body must be a JSON object (Content-Type: application/json)",
                                           "invalid_request_error", None, "invalid_body"), status_code=400)
        message = f"{'.'.join(loc)}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(loc), first.get("type")),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        api = path.startswith("/v1/") or path == "/tokenize"
        if api and settings.api_key:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                metrics.requests.labels(path, "401").inc()
                return JSONResponse(error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                               "invalid_request_error", None, "invalid_api_key"), status_code=401)
        response = await call_next(request)
        if api:
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    def served(name: str) -> str:
        if name not in engine.served:
            raise ApiError(404, f"the model `{name}` is not served here; served: {', '.join(engine.names)}",
                           "not_found_error", "model", "model_not_found")
        return name

    def params_for(req: ChatRequest | CompletionRequest, prompt_len: int) -> GenerationParams:
        room = engine.context_length - prompt_len
        if room <= 0:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is {engine.context_length}",
                           "invalid_request_error", "messages" if isinstance(req, ChatRequest) else "prompt",
                           "context_length_exceeded")
        limit = req.token_limit or settings.default_max_tokens
        return GenerationParams(max_tokens=min(limit, room), temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, stop=req.stop_list)

    async def run(name: str, prompt_ids: list[int], params: GenerationParams,
                  ticket: _Ticket) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated, then the Finished record. Admission is already taken."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        stop = threading.Event()
        began = time.perf_counter()
        state = {"started": False}

        def job() -> Finished:
            admission.started()
            state["started"] = True
            return engine.generate(name, prompt_ids, params,
                                   lambda ids: loop.call_soon_threadsafe(queue.put_nowait, ids), stop.is_set)

        def done(_: Any) -> None:
            admission.leave(state["started"])
            loop.call_soon_threadsafe(queue.put_nowait, None)

        future = loop.run_in_executor(worker, job)
        ticket.hand_over()  # from here the job's done-callback gives the slot back
        future.add_done_callback(done)
        hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
        ids: list[int] = []
        full = sent = ""
        first = True
        try:
            while (item := await queue.get()) is not None:
                if first:
                    metrics.first_token.labels(name).observe(time.perf_counter() - began)
                    first = False
                ids.extend(item)
                _, full = iter_text(lambda x: engine.decode(name, x), ids, full)
                text, hit = split_stop(full, params.stop)
                if hit:
                    stop.set()
                    full = text
                visible = text if hit else text[:len(text) - hold] if hold else text
                if len(visible) > len(sent):
                    yield visible[len(sent):]
                    sent = visible
                if hit:
                    break
            if len(full) > len(sent) and not stop.is_set():
                yield full[len(sent):]
            finished = await future
        finally:
            stop.set()  # the client went away, or a stop string ended it: let generate() return
        metrics.prompt_tokens.labels(name).inc(len(prompt_ids))
        metrics.generation_tokens.labels(name).inc(finished.completion_tokens)
        metrics.latency.labels(name).observe(time.perf_counter() - began)
        yield finished

    async def complete(name: str, prompt_ids: list[int], params: GenerationParams,
                       ticket: _Ticket) -> tuple[str, Finished]:
        """A whole answer (no streaming); the slot is given back even if the request fails before the engine."""
        try:
            return await collect(run(name, prompt_ids, params, ticket))
        finally:
            ticket.release()

    def usage(prompt: int, finished: Finished) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": finished.completion_tokens,
                "total_tokens": prompt + finished.completion_tokens}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "kubetune", "root": m.source}
            for m in engine.served.values()]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        name = served(req.model)
        if req.messages is not None:
            conv = ChatRequest(model=name, messages=req.messages).conversation()
            tokens = engine.render(name, conv, add_generation_prompt=req.add_generation_prompt)
        elif req.prompt is not None:
            tokens = engine.encode(name, req.prompt)
        else:
            raise ApiError(400, "give messages or prompt", param="messages", code="missing_field")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Response:
        name = served(req.model)
        conversation = req.conversation()
        if conversation[-1]["role"] == "assistant":
            raise ApiError(400, "the last message is the assistant's; end with a user message", param="messages")
        prompt_ids = engine.render(name, conversation)
        params = params_for(req, len(prompt_ids))
        ticket = admission.enter()
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            def chunk(delta: dict[str, Any], reason: str | None) -> str:
                body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                return _sse(body)

            async def events() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for item in run(name, prompt_ids, params, ticket):
                    if isinstance(item, Finished):
                        yield chunk({}, item.finish_reason)
                        if include_usage:
                            body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                    "choices": [], "usage": usage(len(prompt_ids), item)}
                            yield _sse(body)
                    else:
                        yield chunk({"content": item}, None)
                yield "data: [DONE]\n\n"

            return _stream(events(), ticket)
        text, finished = await complete(name, prompt_ids, params, ticket)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": finished.finish_reason}],
                             "usage": usage(len(prompt_ids), finished)})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        name = served(req.model)
        prompt_ids = engine.encode(name, req.text())
        params = params_for(req, len(prompt_ids))
        ticket = admission.enter()
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = req.text() if req.echo else ""
        if req.stream:
            async def events() -> AsyncIterator[str]:
                first = prefix
                async for item in run(name, prompt_ids, params, ticket):
                    text, reason = (("", item.finish_reason) if isinstance(item, Finished) else (first + item, None))
                    first = ""
                    body = {"id": rid, "object": "text_completion", "created": now, "model": name,
                            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
                    yield _sse(body)
                yield "data: [DONE]\n\n"

            return _stream(events(), ticket)
        text, finished = await complete(name, prompt_ids, params, ticket)
        return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": name,
                             "choices": [{"index": 0, "text": prefix + text, "logprobs": None,
                                          "finish_reason": finished.finish_reason}],
                             "usage": usage(len(prompt_ids), finished)})

    return app


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _stream(body: AsyncIterator[str], ticket: _Ticket) -> StreamingResponse:
    weakref.finalize(body, ticket.release)  # never iterated (client gone): the slot is not lost
    return StreamingResponse(body, media_type="text/event-stream")


async def collect(stream: AsyncIterator[str | Finished]) -> tuple[str, Finished]:
    parts: list[str] = []
    finished: Finished | None = None
    async for item in stream:
        if isinstance(item, Finished):
            finished = item
        else:
            parts.append(item)
    assert finished is not None  # run() always ends with Finished
    return "".join(parts), finished
