"""GlobalSampler and MixtureSampler: one seeded global order, sliced per rank, resumable at any
world size; a mixture in proportion to its weights, each source with epochs of its own."""

import math
import time

import numpy as np
import pytest

from llamatrain.data.sampler import MIX_SLOTS, GlobalSampler, MixtureSampler


def global_order(num_samples: int, seed: int, count: int) -> list[int]:
    return GlobalSampler(num_samples, seed=seed).indices_at(list(range(count))).tolist()


def run(state: dict, *, steps: int, batch: int, world_size: int, seed: int, n: int):
    """`steps` steps of a job with one sampler per rank, all resumed from `state`: the samples
    all ranks consumed, in global order, and the state every rank would save."""
    ranks = [GlobalSampler(n, seed=seed) for _ in range(world_size)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    seen = []
    for _ in range(steps):
        for rank, sampler in enumerate(ranks):
            seen += sampler.next_indices(batch, rank, world_size)
    states = [sampler.state_dict() for sampler in ranks]
    assert all(s == states[0] for s in states)
    return seen, states[0]


@pytest.mark.parametrize("resume_world_size", [3, 1])
def test_resuming_at_another_world_size_sees_exactly_the_next_samples(resume_world_size):
    n, batch, seed = 50, 6, 1234
    seen, state = run({"consumed": 0}, steps=4, batch=batch, world_size=2, seed=seed, n=n)
    assert state == {"consumed": 24}
    # 7 more steps cross the epoch boundary at 50 samples.
    more, state = run(state, steps=7, batch=batch, world_size=resume_world_size, seed=seed, n=n)
    seen += more
    assert state == {"consumed": 66}

    assert seen == global_order(n, seed, 66)
    first_epoch, second_epoch = seen[:n], seen[n:]
    assert sorted(first_epoch) == list(range(n))  # no duplicate, no gap
    assert len(set(second_epoch)) == len(second_epoch) == 66 - n


def test_each_rank_takes_a_contiguous_slice_of_the_global_batch():
    order = global_order(100, 7, 12)
    for world_size in (1, 2, 3, 4, 6, 12):
        per_rank = 12 // world_size
        for rank in range(world_size):
            sampler = GlobalSampler(100, seed=7)
            got = sampler.next_indices(12, rank, world_size)
            assert got == order[rank * per_rank : (rank + 1) * per_rank]
            assert sampler.consumed == 12


def test_every_epoch_is_a_fresh_permutation_of_all_samples():
    n = 1000
    order = global_order(n, 3, 3 * n)
    epochs = [order[k * n : (k + 1) * n] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    # Shuffled, not near the identity: few samples stay in place.
    assert sum(i == s for i, s in enumerate(epochs[0])) < 10


@pytest.mark.parametrize("num_samples", [1, 2, 3, 5, 17, 64, 65, 1023])
def test_odd_dataset_sizes_still_give_permutations(num_samples):
    assert sorted(global_order(num_samples, 0, num_samples)) == list(range(num_samples))


def test_the_order_is_a_pure_function_of_seed_and_size():
    assert global_order(500, 5, 40) == global_order(500, 5, 40)
    assert global_order(500, 5, 40) != global_order(500, 6, 40)
    assert global_order(500, 5, 40) != global_order(501, 5, 40)


def test_a_batch_not_divisible_by_the_world_size_is_a_value_error_naming_both():
    sampler = GlobalSampler(100, seed=0)
    with pytest.raises(ValueError, match=r"global_batch_size=10 .*world_size=3"):
        sampler.next_indices(10, 0, 3)
    with pytest.raises(ValueError, match="rank=3"):
        sampler.next_indices(12, 3, 3)
    assert sampler.consumed == 0


def test_an_empty_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="num_samples=0"):
        GlobalSampler(0, seed=0)


# ---------------------------------------------------------------- mixtures

SIZES, WEIGHTS = [1000, 50, 300], [0.6, 0.3, 0.1]


def mixture(seed: int = 0) -> MixtureSampler:
    return MixtureSampler(SIZES, WEIGHTS, seed=seed)


def source_of(sampler: MixtureSampler, ids) -> np.ndarray:
    return np.searchsorted(sampler.offsets, np.asarray(ids), side="right") - 1


def test_mixture_proportions_are_the_weights_within_sampling_error():
    sampler = mixture()
    steps, batch = 300, 64
    ids, per_batch = [], []
    for _ in range(steps):
        got = sampler.next_indices(batch, 0, 1)
        ids += got
        per_batch.append(np.bincount(source_of(sampler, got), minlength=3))
    n = steps * batch
    counts = np.bincount(source_of(sampler, ids), minlength=3)
    for c, w in zip(counts, WEIGHTS, strict=True):
        assert abs(c - w * n) < 4 * math.sqrt(n * w * (1 - w)), (counts, n)
    # Batches are mixed, not striped: the weight-0.1 source's share varies from batch to batch.
    smallest = [b[2] for b in per_batch]
    assert min(smallest) < 6.4 < max(smallest)
    assert sampler.samples_per_source() == counts.tolist()


def test_an_upsampled_source_is_seen_once_per_its_own_epoch():
    sampler = mixture(seed=5)
    ids = sampler.indices_at(np.arange(1500))
    small = ids[source_of(sampler, ids) == 1] - 1000  # 50 samples at weight 0.3
    epochs = len(small) // 50
    assert epochs >= 8
    for e in range(epochs):
        assert sorted(small[e * 50 : (e + 1) * 50].tolist()) == list(range(50))
    big = ids[source_of(sampler, ids) == 0]
    assert len(set(big.tolist())) == len(big)  # 1000 samples, less than one epoch used


def test_mixture_counts_follow_the_order_across_block_boundaries():
    sampler = mixture(seed=2)
    n = MIX_SLOTS + 777
    src = source_of(sampler, sampler.indices_at(np.arange(n)))
    for consumed in (0, 1, 1000, MIX_SLOTS - 1, MIX_SLOTS, n):
        expected = np.bincount(src[:consumed], minlength=3).tolist()
        assert sampler.samples_per_source(consumed) == expected
    assert sampler.slots.sum() == MIX_SLOTS


@pytest.mark.parametrize("resume_world_size", [3, 1])
def test_a_mixture_resumed_at_another_world_size_sees_exactly_the_next_samples(
    resume_world_size,
):
    def run_mix(state, steps, world_size):
        ranks = [mixture(seed=9) for _ in range(world_size)]
        seen = []
        for sampler in ranks:
            sampler.load_state_dict(state)
        for _ in range(steps):
            for rank, sampler in enumerate(ranks):
                seen += sampler.next_indices(6, rank, world_size)
        return seen, ranks[0].state_dict()

    seen, state = run_mix({"consumed": 0}, 4, 2)
    more, state = run_mix(state, 7, resume_world_size)
    assert state == {"consumed": 66}
    assert seen + more == mixture(seed=9).indices_at(np.arange(66)).tolist()


def test_a_weight_below_the_mixture_resolution_names_the_source():
    with pytest.raises(ValueError, match=r"weight 1e-09 of 'tiny' is below the mixture's"):
        MixtureSampler([10, 10], [1.0, 1e-9], names=["web", "tiny"])


def test_a_two_trillion_token_mixture_serves_step_400000_from_its_small_state():
    seq_len, batch = 4096, 1024  # 7B: 4M-token global batches
    sizes = [int(2e12 * w) // seq_len for w in (0.7, 0.2, 0.1)]
    sampler = MixtureSampler(sizes, [0.7, 0.2, 0.1], seed=0)
    sampler.load_state_dict({"consumed": 400_000 * batch})
    start = time.perf_counter()
    ids = sampler.next_indices(batch, 0, 8)
    counts = sampler.samples_per_source()
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0  # about 0.02 s here
    assert len(ids) == 128 and sampler.state_dict() == {"consumed": 400_001 * batch}
    assert sum(counts) == 400_001 * batch
    shares = [c / sum(counts) for c in counts]
    assert all(abs(s - w) < 1e-4 for s, w in zip(shares, (0.7, 0.2, 0.1), strict=True))
