"""Distribution: the process group, the (replicate x shard) device mesh, and turning a meta-device
Transformer into a trainable one: activation checkpointing -> torch.compile per block ->
fully_shard per block -> fully_shard of the root (with mixed precision) -> materialise and
initialise shard by shard, so that no rank ever holds the whole model.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils.checkpoint import checkpoint

from llamatrain.config import ParallelConfig
from llamatrain.model import Transformer, init_rows


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


def init_distributed() -> World:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), else a world of 1."""
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
        dist.init_process_group(backend, store=_attempt_store(rank, world_size), rank=rank,
                                world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    elif world_size == 1 and device.type == "cuda":
        # One GPU without torchrun still trains through FSDP2 (for its mixed precision), whose
        # device mesh needs a process group: a group of one, with an in-memory store.
        init_single_process_group(backend)
    return World(rank, world_size, local_rank, local_world_size, device)


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


def mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) with the -1 entry filled in; a mismatch is a ValueError."""
    replicate, shard = cfg.dp_replicate, cfg.dp_shard
    if shard == -1:
        shard = world_size // replicate
    if replicate == -1:
        replicate = world_size // shard
    if replicate * shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate x parallel.dp_shard = {cfg.dp_replicate} x {cfg.dp_shard}: "
            f"must multiply to the world size {world_size}"
        )
    return replicate, shard


def build_mesh(cfg: ParallelConfig, world: World) -> DeviceMesh:
    replicate, shard = mesh_shape(cfg, world.world_size)
    if replicate == 1:
        return init_device_mesh(world.device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        world.device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def _checkpointed(block: nn.Module) -> None:
    # Replace the instance's forward rather than wrapping the module: parameter names, and so
    # checkpoints, stay the same whether or not activation checkpointing is on.
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(
    model: Transformer,
    cfg: ParallelConfig,
    mesh: DeviceMesh | None,
    *,
    param_dtype: torch.dtype,
) -> Transformer:
    """Apply activation checkpointing, compile and FSDP2 in torchtitan's order, in place."""
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing == "full" or (
            cfg.activation_checkpointing == "selective" and i % 2 == 0
        ):
            _checkpointed(block)
        if cfg.compile:
            block.compile()
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, *, seed: int) -> None:
    """Allocate a meta-device (possibly sharded) model on `device` and draw its initial weights,
    each rank only its own rows, so the full weights are the same at any world size."""
    model.to_empty(device=device)
    n_layers = model.cfg.n_layers
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            local = param.to_local()
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
            start = offset[0] if shape[0] else 0
            rows = init_rows(name, param.shape, start, start + shape[0], seed=seed,
                             n_layers=n_layers)
            local.copy_(rows[:, : local.shape[1]] if local.dim() > 1 else rows)
        else:
            param.copy_(init_rows(name, param.shape, 0, param.shape[0], seed=seed,
                                  n_layers=n_layers))
    model.init_rope()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather every parameter in full on every rank (small models and tests only)."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return out


def local_bytes(tensors) -> int:
    """Bytes this rank stores for the given (possibly sharded) tensors."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total
