"""The world-size-independent sampler: a fixed global order of sample indices, cut into global
batches, each batch split into contiguous per-rank slices.

The global order is a pure function of (seed, num_samples): epoch e is a pseudo-random permutation
of range(num_samples) keyed by (seed, e). It is computed index by index (a Feistel network with
cycle walking) rather than stored, so it costs no memory for a dataset of any size and no numpy
version can change it. The sampler's whole state is the number of samples consumed, which is why
a run resumes at any world size that divides the global batch and sees exactly the same samples.
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


@dataclass
class GlobalSampler:
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

    def next_indices(self, global_batch_size: int, rank: int, world_size: int) -> list[int]:
        """Rank's contiguous slice of the next global batch; every rank calls it once per step."""
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}; allowed: 0 <= rank < world_size={world_size}")
        per_rank = global_batch_size // world_size
        start = self.consumed + rank * per_rank
        self.consumed += global_batch_size
        return self.indices_at(np.arange(start, start + per_rank)).tolist()

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
