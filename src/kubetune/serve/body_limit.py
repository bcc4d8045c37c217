"""Request bodies within bounds before any parser sees them: a body over `max_bytes` is a 413, a
JSON body nested deeper than `max_depth` a 400. Python's JSON parser recurses per level, so a body
of a few thousand `[` would otherwise end in a RecursionError (a 500) inside the framework."""

from __future__ import annotations

import asyncio
import re

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.serve.errors import error_body

__all__ = ["BodyLimit", "json_depth"]

# An unterminated string matches to the end in one pass: without the optional closing quote every
# `"` would restart a scan to the end of the body (quadratic time: a 128 KB body of `"` took a minute).
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_BRACKETS = bytes.maketrans(b"", b"")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings ignored)."""
    depth = deepest = 0
    for b in _STRINGS.sub(b'""', body).translate(_BRACKETS, _NOT_BRACKETS):
        if b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class BodyLimit:
    """Plain ASGI (no per-chunk overhead on streamed answers). `skip`: paths with their own limit
    (a multipart upload)."""

    def __init__(self, app: ASGIApp, max_bytes: int = 16 << 20, max_depth: int = 64,
                 skip: tuple[str, ...] = ()) -> None:
        self.app, self.max_bytes, self.max_depth, self.skip = app, max_bytes, max_depth, skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, "request_too_large")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, "request_too_large")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        depth = json_depth(body) if len(body) < 1 << 16 else await asyncio.to_thread(json_depth, body)
        if depth > self.max_depth:
            await self._refuse(scope, receive, send, 400, "nested_too_deeply")
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str) -> None:
        message = (f"the request body is larger than {self.max_bytes:,} bytes" if status == 413 else
                   f"the request body is nested more than {self.max_depth} levels deep")
        await JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status)(
            scope, receive, send)
