"""One request through the engine: admission already taken, generation on the engine's single
worker thread, token ids turned into text deltas as they come (holding back what may still become
a stop string), and the Finished record with the metrics of the request."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from kubetune.serve.admission import Admission, Ticket
from kubetune.serve.engine import Finished, GenerationParams, TransformersEngine, iter_text, split_stop
from kubetune.serve.errors import ApiError
from kubetune.serve.metrics import ServerMetrics


class Generation:
    def __init__(self, engine: TransformersEngine, admission: Admission, metrics: ServerMetrics,
                 default_max_tokens: int = 256) -> None:
        self.engine, self.admission, self.metrics = engine, admission, metrics
        self.default_max_tokens = default_max_tokens
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-engine")

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)

    def served(self, name: str) -> str:
        """`name` if this server serves it, else the OpenAI 404."""
        if name not in self.engine.served:
            raise ApiError(404, f"the model `{name}` is not served here; served: {', '.join(self.engine.names)}",
                           "not_found_error", "model", "model_not_found")
        return name

    def params(self, token_limit: int | None, temperature: float, top_p: float, seed: int | None, stop: list[str],
               prompt_len: int, prompt_param: str) -> GenerationParams:
        room = self.engine.context_length - prompt_len
        if room <= 0:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is {self.engine.context_length}",
                           "invalid_request_error", prompt_param, "context_length_exceeded")
        limit = token_limit or self.default_max_tokens
        return GenerationParams(max_tokens=min(limit, room), temperature=temperature, top_p=top_p, seed=seed, stop=stop)

    async def run(self, name: str, prompt_ids: list[int], params: GenerationParams,
                  ticket: Ticket, keep_special: bool = False) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated, then the Finished record (`keep_special`: the text keeps
        special tokens other than the end of turn, for reading tool calls)."""
        engine, metrics = self.engine, self.metrics
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        stop = threading.Event()
        began = time.perf_counter()
        state = {"started": False}

        def job() -> Finished:
            self.admission.started()
            state["started"] = True
            return engine.generate(name, prompt_ids, params,
                                   lambda ids: loop.call_soon_threadsafe(queue.put_nowait, ids), stop.is_set)

        def done(_: Any) -> None:
            self.admission.leave(state["started"])
            loop.call_soon_threadsafe(queue.put_nowait, None)

        future = loop.run_in_executor(self.worker, job)
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
                _, full = iter_text(lambda x: engine.decode(name, x, keep_special), ids, full)
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

    async def complete(self, name: str, prompt_ids: list[int], params: GenerationParams,
                       ticket: Ticket, keep_special: bool = False) -> tuple[str, Finished]:
        """A whole answer (no streaming); the slot is given back even if the request fails before the engine."""
        try:
            return await collect(self.run(name, prompt_ids, params, ticket, keep_special))
        finally:
            ticket.release()


def usage(prompt: int, finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": finished.completion_tokens,
            "total_tokens": prompt + finished.completion_tokens}


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
