"""Length-bucketed order: a permutation, deterministic per (seed, epoch), and nearly pad-free."""

from __future__ import annotations

import random

from kubetune.train.length_buckets import LengthBucketSampler, padding_fraction


def _long_tailed(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(1024, int(rng.lognormvariate(4.0, 0.9)) + 8) for _ in range(n)]


def test_every_row_once_and_deterministic() -> None:
    lengths = _long_tailed(1000)
    s = LengthBucketSampler(lengths, batch_size=8, seed=3)
    first = list(s)
    assert sorted(first) == list(range(1000))
    assert list(LengthBucketSampler(lengths, batch_size=8, seed=3)) == first  # resume replays the same order
    s.set_epoch(1)
    assert list(s) != first


def test_padding_is_cut_versus_random_order() -> None:
    lengths = _long_tailed(4000)
    order = list(range(4000))
    random.Random(0).shuffle(order)
    random_pad = padding_fraction(lengths, order, 8)
    bucket_pad = padding_fraction(lengths, list(LengthBucketSampler(lengths, batch_size=8)), 8)
    assert random_pad > 0.4
    assert bucket_pad < 0.05


def test_rank_groups_are_contiguous() -> None:
    lengths = _long_tailed(64)
    order = list(LengthBucketSampler(lengths, batch_size=4, world_size=2, window=64))
    # each group of batch*world rows comes from one sorted run: its lengths are non-increasing
    for k in range(0, 64, 8):
        group = [lengths[i] for i in order[k:k + 8]]
        assert group == sorted(group, reverse=True)


def test_an_optimizer_step_holds_the_same_rows_however_it_is_split() -> None:
    lengths = _long_tailed(256)
    whole = list(LengthBucketSampler(lengths, batch_size=8, seed=5))
    split = list(LengthBucketSampler(lengths, batch_size=2, accumulation=4, seed=5))
    assert [sorted(whole[k:k + 8]) for k in range(0, 256, 8)] == [sorted(split[k:k + 8]) for k in range(0, 256, 8)]
