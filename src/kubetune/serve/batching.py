"""One set of weights behind transformers' continuous batching: a `Lane`.

Requests join and leave the running batch at every step (the library's ContinuousBatchingManager:
paged KV cache, chunked prefill, its own scheduler thread); a lane only sizes the cache, adds the
per-request sampler (serve.sampling), routes each request's outputs to its caller and cancels what
a caller no longer wants. The manager starts on the first request, so a served name nobody asks
for costs no cache memory.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from kubetune.errors import KubetuneError

CACHE_SHARE = 0.10     # of the memory available when a lane starts, at most, for its KV cache and batch tensors
TOKENS_PER_REQUEST = 4096  # cache room per admitted request, at most (the context, if shorter)
PAGE = 256             # tokens per KV block (the library's default)
MAX_BATCH_TOKENS = 512  # tokens per step: all decoding rows plus a chunk of prefill (long prompts take a few steps)
FAILURE_GRACE_S = 0.5   # how long a crash's error is waited for once the thread says it is stopping

_ids = itertools.count()


class Loop(Protocol):
    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Any: ...


class Direct:
    """A `Loop` for callers without an event loop: outputs are handed over on the batching thread."""

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        callback(*args)


def call_soon(loop: Loop, callback: Callable[..., Any], *args: Any) -> None:
    """Hand a callback to a request's event loop from a batching or reader thread. A loop closed
    meanwhile (its caller is gone) is skipped: raising there would end the thread and strand every
    other request it serves."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def hand_over(batch: list[tuple[Callable[[Any], None], Any]]) -> None:
    for on_output, output in batch:
        on_output(output)


class Router:
    """What the library's output router gets as every request's "loop". The library hands a step's
    outputs to the loop of the batch's *last* request, whichever loop each request came from; here
    they run on the batching thread, are sorted by their own request's loop, and each loop is woken
    once (a closed loop is skipped: see call_soon)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        self._local.batches = batches = {}
        try:
            callback(*args)  # the library's batch (or one output): each request's `add` below
        finally:
            self._local.batches = None
        for loop, batch in batches.values():
            call_soon(loop, hand_over, batch)

    def add(self, loop: Loop, on_output: Callable[[Any], None], output: Any) -> None:
        batches = getattr(self._local, "batches", None)
        if batches is None:  # called outside a router call (not how the library calls it): hand over alone
            call_soon(loop, on_output, output)
        else:
            batches.setdefault(id(loop), (loop, []))[1].append((on_output, output))


class EngineFailed(KubetuneError):
    """The batching thread of a lane has died (or could not start); the lane takes no more requests.
    A KubetuneError, so `kubetune chat RUN` prints it instead of a traceback."""


@dataclass
class Request:
    request_id: str
    kwargs: dict[str, Any]


def kv_bytes_per_token(config: Any, itemsize: int) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize


def available_bytes(device: Any) -> int:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def cache_blocks(config: Any, itemsize: int, max_concurrency: int, context: int, available: int) -> int:
    """KV blocks for `max_concurrency` requests of up to the context each, within CACHE_SHARE of what is
    available. What the library allocates with the cache counts too: the logits of a full step (fp32) and,
    for attention with a mask, a column of MAX_BATCH_TOKENS mask values per cached token. (The library's
    own sizing fills 60% of the device's memory, which on a CPU is most of the machine.)"""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    want = max_concurrency * min(context, TOKENS_PER_REQUEST)
    budget = int(available * CACHE_SHARE) - MAX_BATCH_TOKENS * int(getattr(cfg, "vocab_size", 0) or 0) * 4 * 2
    per_token = kv_bytes_per_token(config, itemsize) + MAX_BATCH_TOKENS * itemsize
    return max(8, math.ceil(min(want, max(0, budget) // per_token) / PAGE))


class Lane:
    def __init__(self, model: Any, eos: list[int], pad: int | None, max_concurrency: int, context: int) -> None:
        from kubetune.serve.sampling import RequestSampler  # torch and transformers: only once a model is loaded

        self.model, self.eos, self.pad = model, eos, pad
        self.max_concurrency, self.context = max_concurrency, context
        self.sampler = RequestSampler()
        self._manager: Any = None
        self._router = Router()
        self._lock = threading.Lock()

    @property
    def failure(self) -> BaseException | str | None:
        """Why the batching thread cannot take requests any more, or None while it can. The library fails the
        requests in flight before it records the error, and marks itself stopping before both: between the
        two, the stop is the answer, and the error is waited for a moment so the reason names it."""
        if self._manager is None:
            return None
        status = self._manager.background_thread_status
        denial = status.can_accept_new_requests()
        if denial is None:
            return None
        deadline = time.monotonic() + FAILURE_GRACE_S
        # (only while the thread still runs: a thread gone without recording an error never will)
        while status.fatal_error is None and self._manager.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        return status.fatal_error if status.fatal_error is not None else denial

    def _started(self) -> Any:
        with self._lock:
            if self._manager is None:
                self._manager = self._start()
            return self._manager

    def _start(self) -> Any:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from kubetune.serve.sampling import install

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        # Greedy decoding for the whole batch; sampled requests are drawn by the sampler (serve.sampling).
        gen = GenerationConfig(do_sample=False, eos_token_id=self.eos, pad_token_id=self.pad)
        blocks = cache_blocks(self.model.config, self.model.dtype.itemsize, self.max_concurrency, self.context,
                              available_bytes(self.model.device))
        config = ContinuousBatchingConfig(num_blocks=blocks, page_size=PAGE, max_batch_tokens=MAX_BATCH_TOKENS,
                                          use_cuda_graph=False)  # the sampler is Python: no graph capture
        manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
        install(manager, self.sampler)
        manager.start()
        # The batching thread is not a daemon: stop it when the interpreter exits, or exit would wait on it.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self.close)
        return manager

    def submit(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
               on_output: Callable[[Any], None], loop: Loop) -> Request:
        """Queue one request; `on_output` gets each GenerationOutput (the tokens so far) through `loop`."""
        try:
            manager = self._started()
        except (MemoryError, ValueError, RuntimeError) as exc:  # e.g. the cache does not fit: say so, per request
            raise EngineFailed(f"continuous batching cannot start: {exc}") from None
        if self.failure is not None:
            raise EngineFailed(str(self.failure))
        request = Request(f"kt-{next(_ids)}", self.sampler.row_kwargs(temperature, top_p, seed, self.model.device))
        router = manager.output_router

        def deliver(output: Any) -> None:  # on the batching thread
            if output.is_finished():
                self._forget(request)
            self._router.add(loop, on_output, output)

        with router._lock:  # before add_request: a short answer may finish before this thread returns
            router.result_handlers[request.request_id] = (deliver, self._router)
        added = manager.add_request(prompt_ids, request_id=request.request_id, max_new_tokens=max_tokens,
                                    streaming=True, eos_token_id=self.eos, **request.kwargs)
        # The thread may have died between the check above and the queueing: the library drops the request
        # (None) or it sits in a queue no one reads. Either way it would never be answered: say so now.
        if added is None or self.failure is not None:
            self._forget(request)
            raise EngineFailed(str(self.failure or "the batching thread stopped"))
        return request

    def cancel(self, request: Request) -> None:
        """Take a request out of the batch (its blocks are freed at the next step); no more outputs come."""
        if self._manager is not None:
            self._manager.cancel_request(request.request_id)
        self._forget(request)

    def _forget(self, request: Request) -> None:
        if self._manager is not None:
            with self._manager.output_router._lock:
                self._manager.output_router.result_handlers.pop(request.request_id, None)
        self.sampler.release(request.kwargs)

    def close_when_idle(self, timeout: float = 600.0) -> None:
        """Close once the requests in flight have their answers (a removed model finishes what it
        was asked), at most `timeout` seconds from now; returns at once."""
        def wait() -> None:
            deadline = time.monotonic() + timeout
            while (self._manager is not None and self._manager.output_router.result_handlers
                   and self.failure is None and time.monotonic() < deadline):
                time.sleep(0.1)
            self.close()

        threading.Thread(target=wait, name="kubetune-lane-close", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._manager is not None and self._manager.is_running():
                self._manager.stop(block=True, timeout=5)
