"""The serving parts through their public interface, on the project's tiny model: Generation streams
text deltas that add up to the whole answer, cuts at a stop string that spans tokens without ever
sending a piece of it, and gives its admission slot back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kubetune.serve.admission import Admission
from kubetune.serve.engine import Finished, load_engine
from kubetune.serve.errors import ApiError
from kubetune.serve.generation import Generation
from kubetune.serve.metrics import ServerMetrics


async def _stream(gen: Generation, admission: Admission, prompt: list[int], stop: list[str]) -> tuple[list[str], Finished]:
    params = gen.params(24, 0.0, 1.0, 0, stop, len(prompt), "messages")
    parts: list[str] = []
    finished = None
    async for item in gen.run("tiny-llama", prompt, params, admission.enter()):
        if isinstance(item, Finished):
            finished = item
        else:
            parts.append(item)
    assert finished is not None
    return parts, finished


def test_generation_streams_cuts_at_stop_strings_and_frees_its_slot(tiny_model: Path) -> None:
    engine = load_engine([str(tiny_model)])
    metrics = ServerMetrics()
    admission = Admission(2, metrics)
    gen = Generation(engine, admission, metrics)
    prompt = engine.encode_chat("tiny-llama", [{"role": "user", "content": "Describe a blue fox."}])
    try:
        parts, finished = asyncio.run(_stream(gen, admission, prompt, []))
        whole = "".join(parts)
        assert len(whole) > 6 and finished.completion_tokens > 0
        stop = whole[3:6]  # a stop string from inside the answer (greedy: the same answer again)
        parts, finished = asyncio.run(_stream(gen, admission, prompt, [stop]))
        assert "".join(parts) == whole[:whole.index(stop)] and finished.finish_reason == "stop"
        assert not any(stop in p for p in parts)
        assert admission.admitted == 0 and admission.running == 0  # every slot given back
        with pytest.raises(ApiError) as info:
            gen.served("not-served")
        assert info.value.status == 404 and info.value.body["error"]["code"] == "model_not_found"
        with pytest.raises(ApiError) as info:
            gen.params(8, 1.0, 1.0, None, [], engine.context_length, "messages")
        assert info.value.body["error"]["code"] == "context_length_exceeded"
    finally:
        gen.close()


def test_a_request_whose_reader_leaves_is_taken_out_of_the_batch(tiny_model: Path) -> None:
    """Closing the stream (what the server does when the client disconnects) cancels the request in the
    running batch — its KV blocks are freed — and gives its admission slot back."""
    import time

    engine = load_engine([str(tiny_model)])
    metrics = ServerMetrics()
    admission = Admission(2, metrics)
    gen = Generation(engine, admission, metrics)
    prompt = engine.encode_chat("tiny-llama", [{"role": "user", "content": "Go on."}])
    lane = engine.served["tiny-llama"].lane

    async def read_two_then_leave() -> int:
        stream = gen.run("tiny-llama", prompt, gen.params(900, 0.0, 1.0, None, [], len(prompt), "messages"),
                         admission.enter())
        seen = [await stream.__anext__() for _ in range(2)]
        await stream.aclose()
        return len(seen)

    try:
        assert asyncio.run(read_two_then_leave()) == 2
        assert admission.admitted == 0 and admission.running == 0
        scheduler = lane._manager.batch_processor.scheduler  # the library's own bookkeeping of the batch
        deadline = time.time() + 0.5  # 900 tokens take seconds: only a cancel empties the batch this soon
        while (scheduler.active_requests or scheduler.waiting_requests) and time.time() < deadline:
            time.sleep(0.02)
        assert not scheduler.active_requests and not scheduler.waiting_requests
        assert not lane._manager.output_router.result_handlers  # nothing left to deliver to
    finally:
        gen.close()


def test_an_engine_that_fails_answers_with_errors_and_fails_its_health_check(tiny_model: Path) -> None:
    """A forward pass that raises kills the batching thread: the request in flight gets an OpenAI error
    (an SSE error event once streaming has begun), later requests 503, and /health turns 503 so a
    liveness probe restarts the pod."""
    from fastapi.testclient import TestClient

    from kubetune.serve.app import create_app

    engine = load_engine([str(tiny_model)])
    model = engine.served["tiny-llama"].lane.model
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with TestClient(create_app(engine)) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.get("/health").json() == {"status": "ok"}

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("device lost")

        model.forward = broken
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as res:
            events = [line for line in res.iter_lines() if line.startswith("data: ")]
        assert res.status_code == 200 and events[-1] == "data: [DONE]"
        assert any('"code": "generation_failed"' in e and "device lost" in e for e in events)
        later = http.post("/v1/chat/completions", json=body)
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_failed"
        health = http.get("/health")
        assert health.status_code == 503 and "device lost" in health.json()["reason"]


@pytest.mark.timeout(120)
def test_a_request_racing_the_thread_s_death_is_refused_not_left_waiting(tiny_model: Path) -> None:
    """The library fails the requests in flight and marks itself stopping before it records its error: a
    request that arrives in between must be refused (it once sat in a queue no one read, and its HTTP
    request hung until the test's 15-minute timeout)."""
    from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus

    from kubetune.serve.batching import EngineFailed

    engine = load_engine([str(tiny_model)])
    lane = engine.served["tiny-llama"].lane
    loop = asyncio.new_event_loop()
    try:
        lane.submit([1, 2, 3], 2, 0.0, 1.0, None, lambda output: None, loop)  # starts the batching thread
        status = lane._manager.background_thread_status
        # The crash's first step, frozen: the thread says it is stopping, no error is recorded yet.
        status.request_stop(BackgroundThreadStatus.HARD_STOP, 0)
        assert status.fatal_error is None
        with pytest.raises(EngineFailed, match="stopping"):
            lane.submit([1, 2, 3], 2, 0.0, 1.0, None, lambda output: None, loop)
        assert lane.failure is not None
    finally:
        lane.close()
        loop.close()


@pytest.mark.timeout(120)
def test_a_model_removed_mid_answer_finishes_its_requests_and_gives_their_slots_back(tiny_model: Path) -> None:
    """An adapter deleted or evicted while it answers: the request holds its model (the lane finishes it,
    its tokenizer decodes it) and its admission slot comes back. It once decoded by name, hit the
    removed name, and lost the slot for good — after `limit` of those the server answered 429 forever."""
    engine = load_engine([str(tiny_model)])
    metrics = ServerMetrics()
    admission = Admission(2, metrics)
    gen = Generation(engine, admission, metrics)
    prompt = engine.encode_chat("tiny-llama", [{"role": "user", "content": "Go on."}])

    async def remove_after_the_first_piece() -> list[object]:
        seen: list[object] = []
        stream = gen.run("tiny-llama", prompt, gen.params(200, 0.0, 1.0, None, [], len(prompt), "messages"),
                         admission.enter())
        async for item in stream:
            seen.append(item)
            if len(seen) == 1:
                engine.remove("tiny-llama")
        return seen

    try:
        seen = asyncio.run(remove_after_the_first_piece())
        assert len(seen) >= 2 and isinstance(seen[-1], Finished), seen[-1]  # answered in full
        assert admission.admitted == 0 and admission.running == 0
        with pytest.raises(ApiError) as info:  # a new request for it: the engine says it is gone
            asyncio.run(collect_all(gen, admission, prompt))
        assert info.value.status == 503 and "no longer served" in str(info.value.body)
        assert admission.admitted == 0
    finally:
        gen.close()


async def collect_all(gen: Generation, admission: Admission, prompt: list[int]) -> list[object]:
    return [item async for item in gen.run("tiny-llama", prompt, gen.params(4, 0.0, 1.0, None, [], len(prompt),
                                                                              "messages"), admission.enter())]


@pytest.mark.timeout(120)
def test_a_request_its_lane_never_answers_is_a_503_not_a_wait_forever(tiny_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net under every lost-answer race: a request with no output looks at its lane every
    LIVENESS_S, and a lane that stopped is a 503 (here the library is made to drop the request, then stops)."""
    import kubetune.serve.generation as generation

    monkeypatch.setattr(generation, "LIVENESS_S", 0.2)
    engine = load_engine([str(tiny_model)])
    metrics = ServerMetrics()
    admission = Admission(2, metrics)
    gen = Generation(engine, admission, metrics)
    lane = engine.served["tiny-llama"].lane
    prompt = engine.encode_chat("tiny-llama", [{"role": "user", "content": "hi"}])

    async def lost() -> None:
        asyncio.get_running_loop().call_later(1.0, lane.close)
        await collect_all(gen, admission, prompt)

    try:
        asyncio.run(collect_all(gen, admission, prompt))  # starts the batching thread
        lane._manager.add_request = lambda *args, **kwargs: kwargs["request_id"]  # accepted, then lost
        with pytest.raises(ApiError) as info:
            asyncio.run(asyncio.wait_for(lost(), 30))
        assert info.value.status == 503 and info.value.body["error"]["code"] == "engine_failed"
        assert admission.admitted == 0
    finally:
        gen.close()


@pytest.mark.timeout(120)
def test_a_closed_event_loop_does_not_end_the_batching_thread(tiny_model: Path) -> None:
    """A request whose event loop closed before its outputs came (its caller is gone) is skipped; the
    batching thread goes on and answers the others."""
    import queue
    import time

    from kubetune.serve.engine import GenerationParams

    engine = load_engine([str(tiny_model)])
    lane = engine.served["tiny-llama"].lane
    try:
        gone = asyncio.new_event_loop()
        gone.close()
        orphan = lane.submit([1, 2, 3, 4], 16, 0.0, 1.0, None, lambda output: None, gone)
        answers: queue.Queue[object] = queue.Queue()
        engine.generate("tiny-llama", [1, 2, 3], GenerationParams(max_tokens=4, temperature=0.0), answers.put)
        handlers = lane._manager.output_router.result_handlers
        deadline = time.monotonic() + 60
        while orphan.request_id in handlers and time.monotonic() < deadline:  # its outputs all delivered
            time.sleep(0.05)
        assert orphan.request_id not in handlers
        engine.generate("tiny-llama", [5, 6], GenerationParams(max_tokens=4, temperature=0.0), answers.put)
        assert lane.failure is None and answers.qsize() >= 2
    finally:
        lane.close()
