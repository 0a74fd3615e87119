"""The world-size-independent samplers: a fixed global order of sample indices, cut into global
batches, each batch split into contiguous per-rank slices.

GlobalSampler orders one dataset: epoch e is a pseudo-random permutation of range(num_samples)
keyed by (seed, e). It is computed index by index (a Feistel network with cycle walking) rather
than stored, so it costs no memory for a dataset of any size and no numpy version can change it.

MixtureSampler orders several sources drawn in proportion to their weights: the global order is
cut into blocks of MIX_SLOTS positions, each block gives every source its share of the slots
(rounded to whole slots), shuffled by the same Feistel permutation; each source's samples come
from its own GlobalSampler, so a source has epochs of its own (one up-sampled 3x is seen 3 times
per pass of the others). Where sample p of the global order comes from is computed in O(1) from p.

Either sampler's whole state is the number of samples consumed, which is why a run resumes at any
world size that divides the global batch and sees exactly the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing bijection on uint64 (wraps on purpose)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
    return int(_mix64(np.array([x & _MASK64], dtype=np.uint64))[0])


class _Order:
    """What both samplers share: rank slices of the global order, and the consumed count."""

    consumed: int

    def indices_at(self, positions: np.ndarray | list[int]) -> np.ndarray:
        raise NotImplementedError

    def rank_indices(self, start: int, global_batch_size: int, rank: int,
                     world_size: int) -> list[int]:
        """Rank's contiguous slice of the global batch that begins at position start."""
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}; allowed: 0 <= rank < world_size={world_size}")
        per_rank = global_batch_size // world_size
        first = start + rank * per_rank
        return self.indices_at(np.arange(first, first + per_rank)).tolist()

    def next_indices(self, global_batch_size: int, rank: int, world_size: int) -> list[int]:
        """Rank's contiguous slice of the next global batch; every rank calls it once per step."""
        out = self.rank_indices(self.consumed, global_batch_size, rank, world_size)
        self.consumed += global_batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


@dataclass
class GlobalSampler(_Order):
    """Hands rank r of W its slice of each global batch of the seeded global order."""

    num_samples: int
    seed: int = 0
    consumed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}; allowed: >= 1 (empty dataset?)")
        # Feistel halves of `half` bits each; the smallest even-bit power of two >= num_samples,
        # so cycle walking needs fewer than 4 rounds on average.
        self._half = max(1, ((self.num_samples - 1).bit_length() + 1) // 2)

    def _permute(self, j: np.ndarray, epoch: int) -> np.ndarray:
        half = np.uint64(self._half)
        low = np.uint64((1 << self._half) - 1)
        epoch_key = _mix64_int(_mix64_int(_mix64_int(self.seed) + self.num_samples) + epoch)
        keys = [np.uint64(_mix64_int(epoch_key + r)) for r in range(_ROUNDS)]
        x = j.astype(np.uint64)
        todo = np.ones(len(x), dtype=bool)
        with np.errstate(over="ignore"):
            while todo.any():
                left, right = x[todo] >> half, x[todo] & low
                for key in keys:
                    left, right = right, left ^ (_mix64(right ^ key) & low)
                x[todo] = (left << half) | right
                todo = x >= np.uint64(self.num_samples)
        return x.astype(np.int64)

    def indices_at(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """Sample indices at the given positions of the global order (position p is in epoch
        p // num_samples)."""
        pos = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(pos), dtype=np.int64)
        epochs = pos // self.num_samples
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permute(pos[sel] % self.num_samples, int(epoch))
        return out

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples


# Positions per mixture block: a weight's resolution is 1/MIX_SLOTS of the total.
MIX_SLOTS = 1 << 16


def slot_counts(weights: list[float], names: list[str]) -> np.ndarray:
    """Slots of each source per block: weights scaled to MIX_SLOTS, rounded by largest remainder
    (so they sum to MIX_SLOTS exactly); a weight too small for one slot is a ValueError."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights) * MIX_SLOTS
    counts = np.floor(share).astype(np.int64)
    rest = MIX_SLOTS - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:rest]] += 1
    assert counts.sum() == MIX_SLOTS, "weights are validated finite, with a finite sum"
    for name, w, c in zip(names, weights, counts, strict=True):
        if c == 0:
            raise ValueError(f"data.mix weight {w} of {name!r} is below the mixture's resolution "
                             f"(1/{MIX_SLOTS} of the total weight); allowed: a larger weight")
    return counts


@dataclass
class MixtureSampler(_Order):
    """The global order of a weighted mixture; sample ids are offsets[source] + index."""

    sizes: list[int]
    weights: list[float]
    seed: int = 0
    consumed: int = 0
    names: list[str] | None = None

    def __post_init__(self) -> None:
        names = self.names or [f"source {i}" for i in range(len(self.sizes))]
        if len(self.weights) != len(self.sizes) or not self.sizes:
            raise ValueError(f"{len(self.sizes)} sources but {len(self.weights)} weights")
        self.slots = slot_counts(self.weights, names)
        self._bounds = np.cumsum(self.slots)
        self.offsets = np.cumsum([0, *self.sizes])[:-1]
        self._slot_order = GlobalSampler(MIX_SLOTS, seed=_mix64_int(self.seed ^ 0x6D6978))
        self._sources = [GlobalSampler(n, seed=_mix64_int(self.seed + 1 + i))
                         for i, n in enumerate(self.sizes)]
        self._blocks: tuple[tuple[int, np.ndarray], ...] = ()

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def _source_of(self, positions: np.ndarray) -> np.ndarray:
        slots = self._slot_order.indices_at(positions)
        return np.searchsorted(self._bounds, slots, side="right")

    def _counts(self, block: int) -> np.ndarray:
        """(sources, MIX_SLOTS + 1): samples of each source before each position of a block.
        The last two blocks are kept, in a tuple replaced whole, so that the loader thread (ahead)
        and the loop (counting tokens per source) share it without a lock."""
        for cached_block, counts in self._blocks:
            if cached_block == block:
                return counts
        src = self._source_of(block * MIX_SLOTS + np.arange(MIX_SLOTS))
        counts = np.zeros((len(self.sizes), MIX_SLOTS + 1), dtype=np.int64)
        for s in range(len(self.sizes)):
            np.cumsum(src == s, out=counts[s, 1:])
        self._blocks = ((block, counts), *self._blocks[:1])
        return counts

    def locate(self, positions: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's own order) of global positions."""
        pos = np.asarray(positions, dtype=np.int64)
        src = self._source_of(pos)
        k = np.empty(len(pos), dtype=np.int64)
        blocks = pos // MIX_SLOTS
        for block in np.unique(blocks):
            sel = blocks == block
            counts = self._counts(int(block))
            k[sel] = block * self.slots[src[sel]] + counts[src[sel], pos[sel] % MIX_SLOTS]
        return src, k

    def indices_at(self, positions: np.ndarray | list[int]) -> np.ndarray:
        src, k = self.locate(positions)
        out = np.empty(len(k), dtype=np.int64)
        for s in np.unique(src):
            sel = src == s
            out[sel] = self.offsets[s] + self._sources[s].indices_at(k[sel])
        return out

    def samples_per_source(self, consumed: int | None = None) -> list[int]:
        """Samples each source has given in the first `consumed` positions (default: so far)."""
        n = self.consumed if consumed is None else consumed
        block, within = divmod(n, MIX_SLOTS)
        counts = self._counts(block)[:, within]
        return [int(block * c + w) for c, w in zip(self.slots, counts, strict=True)]
