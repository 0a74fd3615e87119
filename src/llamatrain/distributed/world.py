"""The process group: this process's place in the world (torchrun's environment), joined over NCCL
on CUDA and gloo on CPU, with a rendezvous store of its own for each torchrun restart."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def gpu(self) -> int | None:
        """This rank's GPU as the node numbers it (CUDA_VISIBLE_DEVICES maps ours to it); None on
        a CPU."""
        if self.device.type != "cuda":
            return None
        index = self.device.index or 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if index < len(visible) and visible[index].strip().isdigit():
            return int(visible[index])
        return index


def init_distributed(timeout_s: float | None = None) -> World:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), else a world of 1.

    `timeout_s` (train.collective_timeout_s) bounds every collective: one that waits longer
    fails instead of hanging (NCCL then dumps its flight recorder); None keeps torch's default."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=_attempt_store(rank, world_size), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    elif world_size == 1 and device.type == "cuda":
        # One GPU without torchrun still trains through FSDP2 (for its mixed precision), whose
        # device mesh needs a process group: a group of one, with an in-memory store.
        init_single_process_group(backend)
    return World(rank, world_size, local_rank, local_world_size, device)


def collective_timeout_s() -> float | None:
    """The default process group's collective timeout, as the group itself holds it."""
    if not dist.is_initialized():
        return None
    group = dist.distributed_c10d._get_default_group()
    device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    try:
        return group._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):  # private API: the log says n/a rather than fail
        return None


def init_single_process_group(backend: str) -> None:
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store, under a prefix of its own for each torchrun restart.

    After `torchrun --max-restarts` restarts the workers, the new processes could read the
    previous attempt's gloo addresses from the agent's store and hang connecting to dead peers;
    a per-attempt prefix keeps every attempt's keys apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent_store, timeout=timedelta(minutes=10),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"llamatrain/attempt-{attempt}", store)
