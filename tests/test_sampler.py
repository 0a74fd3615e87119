"""GlobalSampler: one seeded global order, sliced per rank, resumable at any world size."""

import pytest

from llamatrain.data import GlobalSampler


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
