"""Engine workers: the lanes of an engine run in N processes over one copy of the weights.

Measured on the bench's 2-core machine (bench/serve_throughput.py): one batching thread using both
cores loses ~40% of its speed as soon as anything else runs on the machine (the HTTP server, the
clients, a sidecar) — each step is a parallel region that waits for its slowest thread — and a
second batching thread in the same process gains nothing (the steps' Python holds the GIL). N
processes of cores/N threads each, every one a full set of lanes with its own KV cache and batch,
keep the cores busy: requests go to the worker with the fewest in flight.

The weights are loaded (and adapters merged) once, in the server; the workers get them as shared
memory (torch.multiprocessing), so N workers cost N KV caches, not N models. Each worker sends back
one message per step of its batches (the new tokens of every request), read by one thread per worker
here and handed to each request's caller on its event loop, as a Lane does.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kubetune.serve.batching import EngineFailed, Loop, Request, call_soon, hand_over

# auto: workers for weights in this range (bytes). Below it a step is mostly fixed Python cost, which N
# workers pay N times (the quickstart's 0.8 MB model: 283 req/s in-process, 180 with 2 workers); above it a
# step mostly reads the weights from memory, and N workers read them N times.
WORKER_WEIGHTS = (16 << 20, 1 << 30)
READY_TIMEOUT = 300      # seconds for a worker to start (import torch and transformers, map the weights)

_ids = itertools.count()


@dataclass
class LaneSpec:
    """What a worker needs to build one lane."""
    name: str
    model: Any
    eos: list[int]
    pad: int | None


@dataclass
class Output:
    """The part of transformers' GenerationOutput that callers read: all tokens so far, finished, error."""
    generated_tokens: tuple[int, ...]
    finished: bool
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished or self.error is not None


def auto_workers(models: Sequence[Any]) -> int:
    """2 on a CPU with 2+ cores for weights within WORKER_WEIGHTS (the bench's 21M model: 15 -> 19.5 req/s), else 1."""
    import torch

    if any(getattr(m, "device", torch.device("cpu")).type != "cpu" for m in models):
        return 1
    # Adapter lanes share the base's tensors (unmerged, or the base itself): count each tensor once.
    size = sum({p.data_ptr(): p.numel() * p.element_size() for m in models for p in m.parameters()}.values())
    return 2 if torch.get_num_threads() >= 2 and WORKER_WEIGHTS[0] <= size <= WORKER_WEIGHTS[1] else 1


def worker_threads(workers: int, threads: int) -> int:
    """Each worker's share of this process's intra-op threads (torch's default: the cores it may use;
    OMP_NUM_THREADS when set)."""
    return max(1, threads // workers)


@dataclass
class _Pending:
    name: str
    on_output: Callable[[Any], None]
    loop: Loop
    tokens: list[int] = field(default_factory=list)


class _Worker:
    def __init__(self, index: int, context: Any, specs: list[LaneSpec], threads: int, max_concurrency: int,
                 window: int) -> None:
        self.index = index
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, name=f"kubetune-engine-{index}", daemon=True,
                                       args=(child, specs, threads, max_concurrency, window))
        self.process.start()
        child.close()
        self.pending: dict[str, _Pending] = {}
        self.lock = threading.Lock()          # pending (the reader and callers on several threads)
        self.send_lock = threading.Lock()     # the pipe, written by callers on several threads
        self.failure: str | None = None
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, name=f"kubetune-engine-{index}-reader", daemon=True)
        self.reader.start()

    def send(self, message: tuple[Any, ...]) -> bool:
        """Whether the message went to a live worker."""
        if self.failure is not None:
            return False
        try:
            with self.send_lock:
                self.conn.send(message)
        except (OSError, EOFError) as exc:
            self._fail(f"engine worker {self.index} is gone: {exc}")
            return False
        return True

    def _read(self) -> None:
        try:
            self._read_messages()
        except (EOFError, OSError):
            self.process.join(timeout=1)
            self._fail(f"engine worker {self.index} exited{_how(self.process.exitcode)}")
        except Exception as exc:  # noqa: BLE001 - whatever stops this thread must fail the worker, not hang callers
            self._fail(f"engine worker {self.index}: {type(exc).__name__}: {exc}")
        self.ready.set()

    def _read_messages(self) -> None:
        while True:
            message = self.conn.recv()
            kind = message[0]
            if kind == "ready":
                self.ready.set()
            elif kind == "failed":
                self._fail(message[1])
                self.ready.set()
            elif kind == "outputs":
                self._deliver(message[1])

    def _deliver(self, updates: list[tuple[str, list[int], bool, str | None]]) -> None:
        """Hand a step's outputs to their callers: one wake-up per event loop, not one per request."""
        calls: dict[int, tuple[Loop, list[tuple[Callable[[Any], None], Output]]]] = {}
        with self.lock:
            for request_id, new, finished, error in updates:
                pending = self.pending.get(request_id)
                if pending is None:  # cancelled: its last steps may still be on the way
                    continue
                pending.tokens.extend(new)
                if finished or error:
                    del self.pending[request_id]
                output = Output(tuple(pending.tokens), finished, error)
                calls.setdefault(id(pending.loop), (pending.loop, []))[1].append((pending.on_output, output))
        for loop, batch in calls.values():
            call_soon(loop, hand_over, batch)

    def _fail(self, why: str) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = why
            pending, self.pending = self.pending, {}
        for p in pending.values():  # nobody waits forever on a dead worker
            call_soon(p.loop, p.on_output, Output(tuple(p.tokens), True, why))


def _how(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        import signal

        return f" (killed by {signal.Signals(-code).name})"
    return f" with code {code}"


class WorkerPool:
    """N worker processes, each with a lane per served name; `lane(name)` is that name's Lane-alike."""

    def __init__(self, specs: Sequence[LaneSpec], workers: int, max_concurrency: int, context_window: int) -> None:
        import torch
        import torch.multiprocessing as mp

        threads = worker_threads(workers, torch.get_num_threads())
        ctx = mp.get_context("spawn")  # a fork would copy the parent's OpenMP pool, which is not fork-safe
        self.closed = False
        self.workers = [_Worker(i, ctx, list(specs), threads, max_concurrency, context_window) for i in range(workers)]
        for worker in self.workers:
            worker.ready.wait(READY_TIMEOUT)
        failed = [w.failure for w in self.workers if w.failure]
        if failed or not all(w.ready.is_set() for w in self.workers):
            self.close()
            raise EngineFailed(failed[0] if failed else "an engine worker did not start in time")

    def lane(self, name: str) -> PooledLane:
        return PooledLane(self, name)

    @property
    def failure(self) -> str | None:
        return next((w.failure for w in self.workers if w.failure), None)

    def submit(self, name: str, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
               seed: int | None, on_output: Callable[[Any], None], loop: Loop) -> Request:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        worker = min(self.workers, key=lambda w: len(w.pending))  # the fewest requests in flight
        request = Request(f"kt-w{worker.index}-{next(_ids)}", {"worker": worker.index})
        with worker.lock:  # under the lock _fail takes: a request is either failed by it or refused here
            if worker.failure is not None:
                raise EngineFailed(worker.failure)
            worker.pending[request.request_id] = _Pending(name, on_output, loop)
        if not worker.send(("add", name, request.request_id, list(prompt_ids), max_tokens, temperature, top_p, seed)):
            with worker.lock:
                worker.pending.pop(request.request_id, None)
            raise EngineFailed(worker.failure or f"engine worker {worker.index} is gone")
        return request

    def cancel(self, request: Request) -> None:
        worker = self.workers[request.kwargs["worker"]]
        with worker.lock:
            pending = worker.pending.pop(request.request_id, None)
        if pending is not None:
            worker.send(("cancel", pending.name, request.request_id))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            worker.send(("close",))
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.process.is_alive():  # a worker stuck past SIGTERM (seen on a loaded machine) is killed
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()


class PooledLane:
    """One served name over the pool, with a Lane's interface (engine.py does not know the difference)."""

    def __init__(self, pool: WorkerPool, name: str) -> None:
        self.pool, self.name = pool, name

    @property
    def failure(self) -> str | None:
        return self.pool.failure

    def submit(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
               on_output: Callable[[Any], None], loop: Loop) -> Request:
        return self.pool.submit(self.name, prompt_ids, max_tokens, temperature, top_p, seed, on_output, loop)

    def cancel(self, request: Request) -> None:
        self.pool.cancel(request)

    def close(self) -> None:
        self.pool.close()

    def close_when_idle(self) -> None:
        self.pool.close()  # a pool serves its names together: it is not grown or shrunk name by name


# ----------------------------------------------------------------------------------------------------
# In the worker process.


def _worker_main(conn: Any, specs: list[LaneSpec], threads: int, max_concurrency: int, window: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from kubetune.serve.batching import Direct, Lane

    try:
        lanes = {s.name: Lane(s.model, s.eos, s.pad, max_concurrency, window) for s in specs}
    except Exception as exc:  # noqa: BLE001 - reported to the server, which refuses to start with the reason
        conn.send(("failed", f"engine worker could not start: {exc}"))
        return
    outbox: queue.SimpleQueue[tuple[str, list[int], bool, str | None] | None] = queue.SimpleQueue()
    sent: dict[str, int] = {}   # request id -> tokens already sent
    requests: dict[str, Request] = {}   # in the batch, for cancel
    ended: set[str] = set()             # finished before submit returned (a short answer)
    books = threading.Lock()            # requests and ended: this loop and the batching thread
    direct = Direct()
    send_lock = threading.Lock()  # the shipper and this loop both send

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    def collect(request_id: str) -> Callable[[Any], None]:
        def on_output(output: Any) -> None:  # on the lane's batching thread
            tokens = output.generated_tokens
            done = output.is_finished()
            start = sent.get(request_id, 0)
            sent[request_id] = len(tokens)
            if done:
                sent.pop(request_id, None)
                with books:
                    if requests.pop(request_id, None) is None:
                        ended.add(request_id)
            outbox.put((request_id, list(tokens[start:]), done, output.error or None))
        return on_output

    def ship() -> None:  # one message per wake-up: the updates of a whole step travel together
        last = False
        while not last:
            batch = [outbox.get()]
            while True:
                try:
                    batch.append(outbox.get_nowait())
                except queue.Empty:
                    break
            last = None in batch
            updates = [u for u in batch if u is not None]
            if updates:
                try:
                    send(("outputs", updates))
                except (OSError, EOFError):
                    return

    shipper = threading.Thread(target=ship, name="kubetune-engine-outbox", daemon=True)
    shipper.start()
    send(("ready",))
    reported = False
    try:
        while True:
            try:
                if not conn.poll(1.0):  # once a second: has a batching thread died?
                    dead = [f"{n}: {lane.failure}" for n, lane in lanes.items() if lane.failure is not None]
                    if dead and not reported:
                        send(("failed", "; ".join(dead)))
                        reported = True
                    continue
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone: so is this worker
                break
            if message[0] == "close":
                break
            if message[0] == "add":
                _, name, request_id, prompt_ids, max_tokens, temperature, top_p, seed = message
                try:
                    request = lanes[name].submit(prompt_ids, max_tokens, temperature, top_p, seed,
                                                 collect(request_id), direct)
                    with books:
                        if request_id in ended:
                            ended.discard(request_id)
                        else:
                            requests[request_id] = request
                except EngineFailed as exc:
                    outbox.put((request_id, [], True, str(exc)))
                    send(("failed", f"{name}: {exc}"))
                    reported = True
            elif message[0] == "cancel":
                _, name, request_id = message
                with books:
                    cancelled = requests.pop(request_id, None)
                sent.pop(request_id, None)
                if cancelled is not None:
                    lanes[name].cancel(cancelled)
    finally:
        outbox.put(None)
        for lane in lanes.values():
            lane.close()
