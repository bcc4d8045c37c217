"""One request through the engine: admission already taken, the request queued into its lane's
running batch (continuous batching), token ids turned into text deltas as they come (holding back
what may still become a stop string), and the Finished record with the metrics of the request. A
request that ends early — a stop string, or a client that went away — leaves the batch at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from kubetune.serve.admission import Admission, Ticket
from kubetune.serve.batching import EngineFailed
from kubetune.serve.engine import (Finished, GenerationParams, ServedModel, TransformersEngine, finish_of, iter_text,
                                   split_stop, submit_to)
from kubetune.serve.errors import ApiError
from kubetune.serve.metrics import ServerMetrics

LIVENESS_S = 5.0  # how often a request that has had no output looks at whether its lane still runs


class Generation:
    def __init__(self, engine: TransformersEngine, admission: Admission, metrics: ServerMetrics,
                 default_max_tokens: int = 256) -> None:
        self.engine, self.admission, self.metrics = engine, admission, metrics
        self.default_max_tokens = default_max_tokens

    def close(self) -> None:
        self.engine.close()

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
        metrics, admission = self.metrics, self.admission
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        began = time.perf_counter()
        ticket.hand_over()  # from here this generator gives the slot back, whatever happens
        started = finished = False
        request = served = None
        ids: list[int] = []
        try:
            try:
                # The model is held for the whole request: removed meanwhile (a deleted or evicted adapter),
                # its lane still finishes this request and its tokenizer still decodes it.
                served = self.engine.model(name)
                request = submit_to(served, prompt_ids, params, outputs.put_nowait, asyncio.get_running_loop())
            except EngineFailed as exc:
                raise ApiError(503, f"the engine has stopped: {exc}", "server_error", None, "engine_failed") from None
            hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
            full = sent = ""
            hit = False
            while not finished:
                output = await _next_output(outputs, served)
                while not outputs.empty():  # behind the batch: each output holds all tokens so far, take the latest
                    output = outputs.get_nowait()
                if output.error:
                    raise ApiError(500, f"generation failed: {output.error}", "server_error", None, "generation_failed")
                if not started:  # scheduled and prefilled: from waiting to running
                    started = True
                    admission.started()
                    metrics.first_token_after(name, time.perf_counter() - began)
                finished = output.is_finished()
                ids = list(output.generated_tokens)
                _, full = iter_text(lambda x: served.decode(x, keep_special), ids, full)
                text, hit = split_stop(full, params.stop)
                if hit:
                    full = text
                visible = text if (hit or finished) else text[:len(text) - hold] if hold else text
                if len(visible) > len(sent):
                    yield visible[len(sent):]
                    sent = visible
                if hit:
                    break
            done = finish_of(ids, served.stop_ids, params.max_tokens, cut=hit)
        except BaseException:
            if started:  # the client went away (or the engine failed) mid-answer: its tokens were still made
                metrics.tokens(name, len(prompt_ids), len(ids))
            raise
        finally:
            try:
                if served is not None and request is not None and not finished:
                    served.lane.cancel(request)  # a stop string, or the client went away: leave the batch now
            finally:
                admission.leave(started)  # whatever cancelling did: a slot lost here would be lost for good
        metrics.finished(name, len(prompt_ids), done.completion_tokens, time.perf_counter() - began)
        yield done

    async def complete(self, name: str, prompt_ids: list[int], params: GenerationParams,
                       ticket: Ticket, keep_special: bool = False) -> tuple[str, Finished]:
        """A whole answer (no streaming); the slot is given back even if the request fails before the engine."""
        try:
            return await collect(self.run(name, prompt_ids, params, ticket, keep_special))
        finally:
            ticket.release()


async def _next_output(outputs: asyncio.Queue[Any], served: ServedModel) -> Any:
    """The next output of a request; while none comes, whether its lane can still give one is looked at
    every few seconds, so a request never waits on a lane that stopped without answering it."""
    while True:
        try:
            return await asyncio.wait_for(outputs.get(), LIVENESS_S)
        except asyncio.TimeoutError:
            failure = served.lane.failure
            if failure is not None:
                raise ApiError(503, f"the engine has stopped: {failure}", "server_error", None,
                               "engine_failed") from None


def usage(prompt: int, *finished: Finished) -> dict[str, int]:
    """OpenAI's usage of one prompt's answers: the prompt counted once, every choice's tokens added up."""
    made = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}


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
