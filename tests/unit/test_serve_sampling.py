"""Per-request decoding in a batched step (serve.sampling) and the KV cache sizing (serve.batching),
through their public functions on real tensors."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kubetune.serve.batching import MAX_BATCH_TOKENS, PAGE, cache_blocks, kv_bytes_per_token
from kubetune.serve.sampling import GREEDY, KEY, RequestSampler, draw


def _rows(sampler: RequestSampler, kwargs: list[dict]) -> torch.Tensor:
    requests = [SimpleNamespace(state=SimpleNamespace(logit_processor_kwargs=k)) for k in kwargs]
    return sampler.prepare_tensor_args(requests)


def test_greedy_rows_are_left_to_the_argmax_and_sampled_rows_leave_with_one_token() -> None:
    sampler = RequestSampler()
    greedy = sampler.row_kwargs(0.0, 1.0, None, torch.device("cpu"))
    seeded = sampler.row_kwargs(1.0, 1.0, 7, torch.device("cpu"))
    assert greedy == {KEY: GREEDY}
    scores = torch.randn(2, 50)
    before = scores.clone()
    out = sampler(scores, _rows(sampler, [greedy, seeded]))
    assert torch.equal(out[0], before[0])  # untouched: the manager's argmax decides, as generate does
    assert torch.isfinite(out[1]).sum() == 1  # the drawn token only
    only_greedy = torch.randn(3, 50)
    assert sampler(only_greedy.clone(), _rows(sampler, [greedy] * 3)).equal(only_greedy)


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    logits = torch.randn(50)
    tokens = []
    for neighbours in (0, 3):
        sampler = RequestSampler()
        rows = [sampler.row_kwargs(1.0, 1.0, None, torch.device("cpu")) for _ in range(neighbours)]
        mine = sampler.row_kwargs(1.0, 1.0, 1234, torch.device("cpu"))
        drawn = []
        for _ in range(20):
            scores = torch.stack([torch.randn(50) for _ in rows] + [logits])
            out = sampler(scores, _rows(sampler, [*rows, mine]))
            drawn.append(int(out[-1].argmax()))
        tokens.append(drawn)
    assert tokens[0] == tokens[1] and len(set(tokens[0])) > 1


def test_top_p_keeps_the_smallest_nucleus_and_temperature_sharpens() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    seen = {draw(logits, 1.0, 0.7, gen) for _ in range(400)}
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token; the third is never drawn
    assert {draw(logits, 1.0, 0.01, gen) for _ in range(50)} == {0}  # a nucleus of one = greedy
    cold = [draw(logits, 0.05, 1.0, gen) for _ in range(200)]
    assert cold.count(0) > 190


def test_released_rows_are_forgotten() -> None:
    sampler = RequestSampler()
    kwargs = sampler.row_kwargs(0.8, 0.9, 3, torch.device("cpu"))
    sampler.release(kwargs)
    scores = torch.randn(1, 10)
    assert sampler(scores.clone(), _rows(sampler, [kwargs])).equal(scores)  # nothing left to draw with


def test_the_cache_holds_every_admitted_request_within_its_share_of_memory() -> None:
    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=512, num_hidden_layers=6,
                             vocab_size=151936)
    assert kv_bytes_per_token(config, 4) == 2 * 6 * 2 * 64 * 4
    roomy = cache_blocks(config, 4, max_concurrency=64, context=2048, available=64 << 30)
    assert roomy * PAGE >= 64 * 2048 and (roomy - 1) * PAGE < 64 * 2048
    available = 16 << 30
    tight = cache_blocks(config, 4, max_concurrency=64, context=32768, available=available)
    logits = MAX_BATCH_TOKENS * 151936 * 4 * 2
    per_token = kv_bytes_per_token(config, 4) + MAX_BATCH_TOKENS * 4  # its KV and its column of the mask
    assert (tight - 1) * PAGE * per_token + logits <= available * 0.10 < (tight + 1) * PAGE * per_token + logits
