"""Distribution: the process group, the (dp_replicate x dp_shard x tp) device mesh, and turning a
meta-device Transformer into a trainable one: tensor and sequence parallelism -> activation
checkpointing -> torch.compile per block -> fully_shard per block -> fully_shard of the root (with
mixed precision) -> materialise and initialise shard by shard, so that no rank ever holds the whole
model.

Tensor parallelism (Megatron-LM's, with DTensor): inside each block wq/wk/wv/w1/w3 are split by
output columns and wo/w2 by input rows, so each rank computes its own heads and its slice of the
FFN; between them the residual stream and the RMSNorms are split along the sequence (sequence
parallelism), all-gathered before attention and the FFN and reduce-scattered after. The embedding
and the output projection are split over the vocabulary and the loss is computed on the
vocabulary shards (loss parallelism), so no rank ever holds the full logits. Every op the model
calls receives plain local tensors: the Triton kernels run on the local heads and slices.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from llamatrain import ops
from llamatrain.config import ParallelConfig
from llamatrain.model import RMSNorm, Transformer, init_rows

# FSDP2 warns whenever a wrapped block returns a view, because an in-place op on it would skip the
# pre-backward hook. A block returns (h, delta) and its only consumer is the next block's fused
# norm, which adds them out of place; the warning (seen under tensor parallelism) is noise here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                        category=UserWarning)


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


def mesh_shape(
    cfg: ParallelConfig, world_size: int, gpus_per_node: int | None = None
) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) with the -1 entry filled in; a mismatch is a ValueError.

    The data-parallel ranks are world_size / tp; tensor parallelism stays inside a node, so tp
    must divide the GPUs per node (the processes per node) as well as the world size."""
    tp = cfg.tp
    if world_size % tp:
        raise ValueError(f"parallel.tp = {tp}: must divide the world size {world_size}")
    if gpus_per_node is not None and gpus_per_node % tp:
        fits = [d for d in (1, 2, 4, 8, 16) if gpus_per_node % d == 0 and world_size % d == 0]
        raise ValueError(f"parallel.tp = {tp}: must divide the {gpus_per_node} GPUs per node "
                         f"(tensor parallelism stays inside a node; would work: "
                         f"{', '.join(map(str, fits))})")
    dp = world_size // tp
    replicate, shard = cfg.dp_replicate, cfg.dp_shard
    if shard == -1:
        shard = dp // replicate
    if replicate == -1:
        replicate = dp // shard
    if replicate * shard != dp:
        size = f"the world size {world_size}" if tp == 1 else (
            f"world size / parallel.tp = {world_size} / {tp} = {dp}")
        raise ValueError(
            f"parallel.dp_replicate x parallel.dp_shard = {cfg.dp_replicate} x {cfg.dp_shard}: "
            f"must multiply to {size}"
        )
    return replicate, shard, tp


def build_mesh(cfg: ParallelConfig, world: World) -> DeviceMesh:
    """The device mesh: axes dp_replicate (only when > 1), dp_shard, and tp (only when > 1), tp
    innermost so that a tensor-parallel group is consecutive ranks of one node."""
    shape = dict(zip(("dp_replicate", "dp_shard", "tp"),
                     mesh_shape(cfg, world.world_size, world.local_world_size), strict=True))
    axes = {name: size for name, size in shape.items() if size > 1 or name == "dp_shard"}
    return init_device_mesh(world.device.type, tuple(axes.values()),
                            mesh_dim_names=tuple(axes))


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel part of the mesh, over which FSDP shards (and replicates)."""
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        return mesh
    return mesh[tuple(n for n in names if n != "tp")]


def tp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    names = mesh.mesh_dim_names or () if mesh is not None else ()
    return mesh["tp"] if "tp" in names else None


def loss_context(mesh: DeviceMesh | None):
    """Where the loss of vocabulary-sharded logits is computed and differentiated: torch's
    loss_parallel() under tensor parallelism (forward and backward must both run inside it)."""
    return loss_parallel() if tp_mesh(mesh) is not None else contextlib.nullcontext()


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                  ) -> torch.Tensor:
    """Mean cross-entropy of (batch, seq, vocab) logits over targets != ignore_index:
    vocabulary-parallel when tensor parallelism leaves the logits sharded over the vocabulary."""
    if isinstance(logits, DTensor):
        return vocab_parallel_cross_entropy(logits, targets, ignore_index)
    return ops.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index)


def vocab_parallel_cross_entropy(
    logits: DTensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Mean cross-entropy over targets != ignore_index of logits sharded over the vocabulary,
    without gathering them (inside loss_context); the same value as ops.cross_entropy."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                            ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp(min=1)
    return total.full_tensor() / count


def apply_tp(model: Transformer, mesh: DeviceMesh) -> None:
    """Tensor and sequence parallelism over `mesh` (the tp axis), in place."""
    parallelize_module(model, mesh, {
        # Each rank looks up its vocabulary rows; the partial sums are reduce-scattered
        # along the sequence.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        # Logits stay sharded over the vocabulary for the loss-parallel cross-entropy.
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                  use_local_output=False),
    })
    gather = {"input_layouts": (Shard(1), None, None),
              "desired_input_layouts": (Replicate(), None, None), "use_local_output": True}
    for block in model.layers:
        parallelize_module(block, mesh, {
            "attention": PrepareModuleInput(**gather),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                use_local_output=True),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    # The RMSNorm gains are replicated over tp and applied to each rank's sequence slice:
    # ops.rms_norm takes their local value with a partial-sum gradient, which FSDP all-reduces.
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = nn.Parameter(
                DTensor.from_local(module.weight, mesh, [Replicate()], run_check=False))


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
    """Apply tensor parallelism, activation checkpointing, compile and FSDP2 in torchtitan's order,
    in place."""
    if tp_mesh(mesh) is not None:
        apply_tp(model, tp_mesh(mesh))
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing == "full" or (
            cfg.activation_checkpointing == "selective" and i % 2 == 0
        ):
            _checkpointed(block)
        if cfg.compile:
            block.compile()
    if mesh is None:
        return model
    mesh = dp_mesh(mesh)
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
            if local.dim() > 1:  # tensor parallelism may split the columns too (wo, w2)
                rows = rows[:, offset[1] : offset[1] + shape[1]]
            local.copy_(rows)
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
