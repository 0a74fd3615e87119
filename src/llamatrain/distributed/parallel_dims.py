"""The layout of a run: the degrees of its device mesh, the mesh, and the batch geometry that
follows from them."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llamatrain.config import ParallelConfig, TrainConfig
from llamatrain.distributed.world import World


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


def batch_geometry(cfg: TrainConfig, dp_size: int) -> tuple[int, int]:
    """(sequences per global batch, micro-batches per data-parallel rank per step).

    dp_size is the number of data-parallel ranks, world size / parallel.tp: the ranks of one
    tensor-parallel group work on the same sequences."""
    per_pass = dp_size * cfg.micro_batch_size * cfg.seq_len
    if cfg.global_batch_tokens % per_pass:
        raise ValueError(
            f"train.global_batch_tokens = {cfg.global_batch_tokens}: not a multiple of "
            f"data-parallel ranks x micro_batch_size x seq_len = {dp_size} x "
            f"{cfg.micro_batch_size} x {cfg.seq_len} = {per_pass}"
        )
    return cfg.global_batch_tokens // cfg.seq_len, cfg.global_batch_tokens // per_pass
