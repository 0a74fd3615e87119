"""The training loop's batches: each step's slice of the global batch for this rank, read (and
pinned, on CUDA) by a background thread while the current step computes.

The thread reads the sampler's order at explicit positions and never moves the sampler; the loop
advances it as it takes each batch, so a checkpoint records exactly the samples trained on, not
the ones read ahead. An exception in the thread is raised in the loop by the next `next()`; the
thread stops with `close()` or with the process (it is a daemon), so nothing waits on it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch

# How often a blocked put or get looks at the stop flag / the thread's health.
_POLL_S = 0.1


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class BatchLoader:
    """Micro-batches of each step for one rank, `prefetch` steps ahead (0: read in next())."""

    def __init__(self, dataset: Any, sampler: Any, *, global_batch: int, rank: int,
                 world_size: int, micro_batch_size: int, device: torch.device,
                 prefetch: int) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.micro_batch_size, self.device, self.prefetch = micro_batch_size, device, prefetch
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, position: int) -> list[dict[str, torch.Tensor]]:
        indices = self.sampler.rank_indices(position, self.global_batch, self.rank,
                                            self.world_size)
        batch = self.dataset.get_batch(indices)
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        mbs = self.micro_batch_size
        return [{k: v[i : i + mbs] for k, v in batch.items()} for i in range(0, len(indices), mbs)]

    def _run(self, position: int) -> None:
        try:
            while not self._stop.is_set():
                item: Any = self._read(position)
                position += self.global_batch
                self._put(item)
        except BaseException as e:  # handed to the loop, which raises it
            self._put(_Failed(e))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    break
        try:  # it may have put its last item just before it ended
            return self._queue.get_nowait()
        except queue.Empty:
            raise RuntimeError("data loader thread ended without a batch") from None

    def next(self) -> tuple[list[dict[str, torch.Tensor]], float]:
        """The next step's micro-batches on the device, and the seconds the loop waited."""
        start = time.perf_counter()
        if self.prefetch:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self.sampler.consumed,),
                                                name="batch-loader", daemon=True)
                self._thread.start()
            item = self._get()
            if isinstance(item, _Failed):
                self.close()
                raise item.error
        else:
            item = self._read(self.sampler.consumed)
        self.sampler.consumed += self.global_batch
        micro = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in item]
        return micro, time.perf_counter() - start

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is reading, then leaves)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
