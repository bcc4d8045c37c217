"""Per-request decoding inside one continuously batched step.

transformers' continuous batching decodes every row of a batch the same way: `do_sample` is one
setting of the manager, and its per-request temperature/top-p processors run (a sort of the whole
vocabulary per row) on every step even when every row is greedy — 13% of a step on the bench model.
An OpenAI server mixes greedy requests (temperature 0), sampled ones, and sampled ones with their
own `seed`, which must give the same answer whatever else is in the batch.

So the manager decodes greedily (argmax, as `generate` does) and this one per-request processor,
of the library's kind, handles the sampled rows: temperature, top-p, and a draw from the request's
own generator (seeded) or the shared one; such a row leaves with one finite score, which the
argmax then picks. A step whose rows are all greedy costs one comparison.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

GREEDY = -1  # row value of a greedy request; a value >= 0 is the slot of a sampled request
KEY = "kubetune_row"


@dataclass
class Sampling:
    temperature: float
    top_p: float
    generator: torch.Generator | None  # None: the shared generator of the batching thread


class RequestSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {KEY: int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._rows: dict[int, Sampling] = {}
        self._slots = itertools.count()
        self._lock = threading.Lock()

    def row_kwargs(self, temperature: float, top_p: float, seed: int | None, device: torch.device) -> dict[str, Any]:
        """The processor argument of one request (temperature 0 = greedy); `release(kwargs)` when it ends."""
        if temperature <= 0:
            return {KEY: GREEDY}
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        with self._lock:
            row = next(self._slots)
            self._rows[row] = Sampling(float(temperature), float(top_p), generator)
        return {KEY: row}

    def release(self, kwargs: dict[str, Any]) -> None:
        with self._lock:
            self._rows.pop(kwargs.get(KEY, GREEDY), None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows = [r.state.logit_processor_kwargs.get(KEY, GREEDY) for r in requests_with_new_token]
        return torch.tensor(rows, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = tensor_arg[: scores.size(0)].tolist()
        sampled = [(i, row) for i, row in enumerate(rows) if row >= 0]
        if not sampled:
            return scores
        with self._lock:
            settings = [(i, self._rows.get(row)) for i, row in sampled]
        for i, how in settings:
            if how is None:  # released (cancelled) while in flight: its token is never read
                continue
            token = draw(scores[i], how.temperature, how.top_p, how.generator)
            scores[i].fill_(float("-inf"))
            scores[i, token] = 0.0
        return scores


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from logits at `temperature`, within the smallest set of top tokens whose probability
    reaches `top_p` (nucleus sampling, as transformers' TopPLogitsWarper keeps it)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ahead of each one
        sorted_probs[before >= top_p] = 0.0  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def install(manager: Any, sampler: RequestSampler) -> None:
    """Add the sampler as a per-request processor of a greedy manager that has not started yet (the
    manager sizes its per-request argument storage from the list when its loop starts)."""
    processors = manager.logit_processor
    processors.logits_processor.append(sampler)
    processors.tensors_required += 1
    processors.supported_keys.update(sampler.supported_kwargs)
    processors.do_processing = True
