"""Admission control of the OpenAI-compatible server: a slot taken for a streamed request that never
reaches the engine (the client left before the first byte) is given back, not leaked into 429s."""

from __future__ import annotations

import gc
from typing import AsyncIterator

import pytest

from kubetune.serve.admission import Admission, stream_response
from kubetune.serve.errors import ApiError
from kubetune.serve.metrics import ServerMetrics


def test_full_admission_is_429_and_an_unstarted_stream_gives_its_slot_back() -> None:
    admission = Admission(1, ServerMetrics())
    ticket = admission.enter()
    with pytest.raises(ApiError) as info:
        admission.enter()
    assert info.value.status == 429 and info.value.body["error"]["code"] == "rate_limit_exceeded"

    async def body() -> AsyncIterator[str]:
        yield "never sent"

    response = stream_response(body(), ticket)
    del response
    gc.collect()
    assert admission.admitted == 0
    admission.enter()  # the slot is free again


def test_a_handed_over_ticket_is_released_by_the_generation_not_twice() -> None:
    admission = Admission(2, ServerMetrics())
    ticket = admission.enter()
    ticket.hand_over()
    ticket.release()
    assert admission.admitted == 1  # still held: the generation gives it back when it ends
    admission.leave(started=False)
    assert admission.admitted == 0
