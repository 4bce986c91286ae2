"""InfiniteSampler: determinism, per-epoch permutations, rank sharding, exact resume, O(1) skip."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from ssl_distill.data.samplers import InfiniteSampler


def take(sampler: InfiniteSampler, k: int) -> list[int]:
    return list(itertools.islice(iter(sampler), k))


def reference_stream(n: int, seed: int, num_epochs: int, first_epoch: int = 0) -> list[int]:
    """The documented global stream, written out independently: sha256 seed per epoch, then randperm."""
    out: list[int] = []
    for epoch in range(first_epoch, first_epoch + num_epochs):
        seed64 = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")
        g = torch.Generator()
        g.manual_seed(seed64)
        out.extend(torch.randperm(n, generator=g).tolist())
    return out


def interleave(streams: list[list[int]], k: int) -> list[int]:
    """Global order from per-rank streams: position p belongs to rank p % W at its index p // W."""
    world = len(streams)
    return [streams[p % world][p // world] for p in range(k)]


def test_matches_documented_stream_and_is_deterministic():
    n, seed = 13, 7
    expected = reference_stream(n, seed, num_epochs=4)
    assert take(InfiniteSampler(n, seed=seed), 4 * n) == expected
    assert take(InfiniteSampler(n, seed=seed), 4 * n) == expected  # a fresh sampler repeats it
    sampler = InfiniteSampler(n, seed=seed)
    assert take(sampler, 20) == take(sampler, 20)  # re-iterating restarts at `start`


def test_every_epoch_is_a_permutation_and_epochs_differ():
    n = 17
    stream = take(InfiniteSampler(n, seed=3), 6 * n)
    epochs = [stream[e * n : (e + 1) * n] for e in range(6)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 6


def test_different_seeds_differ_and_no_shuffle_is_ordered():
    n = 50
    assert take(InfiniteSampler(n, seed=0), n) != take(InfiniteSampler(n, seed=1), n)
    assert take(InfiniteSampler(5, shuffle=False), 12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert take(InfiniteSampler(5, rank=1, world_size=2, shuffle=False), 4) == [1, 3, 0, 2]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_single_process_stream(world):
    n, seed, k = 11, 5, 15  # k * world crosses several epoch boundaries
    single = take(InfiniteSampler(n, seed=seed), k * world)
    per_rank = [take(InfiniteSampler(n, rank=r, world_size=world, seed=seed), k) for r in range(world)]
    for r in range(world):  # rank r reads positions r, r + W, r + 2W, ...
        assert per_rank[r] == single[r::world]
    assert interleave(per_rank, k * world) == single
    # Union of the first k*W samples over ranks == first k*W of the single stream (as multisets).
    assert sorted(sum(per_rank, [])) == sorted(single)


def test_world_size_larger_than_dataset():
    n, world = 3, 7
    single = take(InfiniteSampler(n, seed=2), 5 * world)
    per_rank = [take(InfiniteSampler(n, rank=r, world_size=world, seed=2), 5) for r in range(world)]
    assert interleave(per_rank, 5 * world) == single


@pytest.mark.parametrize("start", [0, 4, 10, 23, 30, 31])
def test_resume_gives_the_exact_tail(start):
    n = 10
    full = take(InfiniteSampler(n, seed=9), 80)
    assert take(InfiniteSampler(n, seed=9, start=start), 80 - start) == full[start:]


def test_resume_on_a_different_world_size():
    n, seed, batch = 9, 4, 2
    # First run: W=2, 5 iterations of per-rank batch 2 = global batch 4 -> 20 samples consumed (into epoch 2).
    first = [take(InfiniteSampler(n, rank=r, world_size=2, seed=seed), 5 * batch) for r in range(2)]
    consumed = interleave(first, 20)
    # Resumed run on W=3 from start = samples consumed so far (iteration 5 * global batch 4).
    resumed = [take(InfiniteSampler(n, rank=r, world_size=3, seed=seed, start=20), 8) for r in range(3)]
    after = interleave(resumed, 24)
    uninterrupted = take(InfiniteSampler(n, seed=seed), 44)
    assert consumed + after == uninterrupted


def test_huge_start_jumps_straight_to_the_epoch():
    n, seed, start = 10, 1, 10**9 + 3  # epoch 10**8, offset 3
    expected_epoch = reference_stream(n, seed, num_epochs=2, first_epoch=10**8)
    it = iter(InfiniteSampler(n, seed=seed, start=start))
    assert [next(it) for _ in range(12)] == expected_epoch[3:15]
    rank1 = iter(InfiniteSampler(n, rank=1, world_size=4, seed=seed, start=start))
    assert [next(rank1) for _ in range(4)] == expected_epoch[4:20:4]


def test_works_as_a_dataloader_sampler():
    data = torch.arange(100, 107)
    loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=InfiniteSampler(7, seed=0))
    batches = list(itertools.islice(iter(loader), 7))  # 21 samples = 3 epochs
    got = torch.cat(batches).tolist()
    assert got == [100 + i for i in reference_stream(7, 0, num_epochs=3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"dataset_size": 5, "rank": 2, "world_size": 2}, "rank=2 must be smaller than world_size=2"),
        ({"dataset_size": 5, "rank": -1}, "rank"),
        ({"dataset_size": 5, "world_size": 0}, "world_size"),
        ({"dataset_size": 5, "start": -3}, "start"),
        ({"dataset_size": 5.0}, "dataset_size"),
        ({"dataset_size": 5, "seed": "0"}, "seed"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfiniteSampler(**kwargs)
