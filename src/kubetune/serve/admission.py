"""Admission control: at most `limit` requests are admitted (generating or queued for the engine);
one more is refused with 429 at once instead of piling up, and a slot is never lost — not even by a
streamed request whose client leaves before the first byte."""

from __future__ import annotations

import json
import threading
import weakref
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from kubetune.serve.errors import ApiError
from kubetune.serve.metrics import ServerMetrics


class Ticket:
    """One admitted request's slot. Once the request's generation starts (`hand_over`), the generation
    gives it back when it ends, however it ends; until then the ticket owns it, so a request that never
    reaches the engine gives its slot back when the ticket is released (or dropped, for a stream that was
    never iterated)."""

    def __init__(self, admission: Admission) -> None:
        self._admission, self._owned = admission, True

    def hand_over(self) -> None:
        self._owned = False

    def release(self) -> None:
        if self._owned:
            self._owned = False
            self._admission.leave(started=False)


class Admission:
    """Counts admitted requests; `enter` refuses above the limit (never blocks)."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit, self.admitted, self.running, self.metrics = limit, 0, 0, metrics
        self._lock = threading.Lock()

    def enter(self) -> Ticket:
        with self._lock:
            if self.admitted >= self.limit:
                self.metrics.rejected.inc()
                raise ApiError(429, f"the server is at its limit of {self.limit} concurrent requests; retry shortly",
                               "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": "1"})
            self.admitted += 1
            self._publish()
        return Ticket(self)

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
        self.metrics.queue(self.running, self.admitted - self.running)


def stream_response(body: AsyncIterator[str], ticket: Ticket) -> StreamingResponse:
    """An SSE response whose slot is given back even if the client never reads it. An error after the
    headers went out (the engine failed mid-answer) is sent as an SSE error event, as vLLM sends it,
    and the stream ends: the client sees why instead of a cut connection."""
    weakref.finalize(body, ticket.release)

    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in body:
                yield chunk
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body)}\n\n"
            yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream")
