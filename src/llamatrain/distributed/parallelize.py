"""Turning a meta-device Transformer into a trainable one on a device mesh (parallel_dims): float8
conversion of the block linears (distributed.float8, when train.float8 asks) -> tensor and sequence
parallelism -> activation checkpointing -> torch.compile per block -> fully_shard per
block -> fully_shard of the root (with mixed precision) -> materialise and initialise shard by
shard, so that no rank ever holds the whole model.

Tensor parallelism (Megatron-LM's, with DTensor): inside each block wq/wk/wv/w1/w3 are split by
output columns and wo/w2 by input rows, so each rank computes its own heads and its slice of the
FFN; between them the residual stream and the RMSNorms are split along the sequence (sequence
parallelism), all-gathered before attention and the FFN and reduce-scattered after. The embedding
and the output projection are split over the vocabulary and the loss is computed on the
vocabulary shards (loss parallelism, llamatrain.loss), so no rank ever holds the full logits.
Every op the model calls receives plain local tensors: the Triton kernels run on the local heads
and slices.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from llamatrain.config import ParallelConfig
from llamatrain.distributed.float8 import Float8
from llamatrain.distributed.parallel_dims import dp_mesh, tp_mesh
from llamatrain.model import RMSNorm, Transformer, init_rows

# FSDP2 warns whenever a wrapped block returns a view, because an in-place op on it would skip the
# pre-backward hook. A block returns (h, delta) and its only consumer is the next block's fused
# norm, which adds them out of place; the warning (seen under tensor parallelism) is noise here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                        category=UserWarning)


def apply_tp(model: Transformer, mesh: DeviceMesh, float8: Float8 | None = None) -> None:
    """Tensor and sequence parallelism over `mesh` (the tp axis), in place; with tensorwise
    float8, torchao's float8 styles for the converted linears."""
    edges = {
        # Each rank looks up its vocabulary rows; the partial sums are reduce-scattered
        # along the sequence.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        # Logits stay sharded over the vocabulary for the loss-parallel cross-entropy.
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                  use_local_output=False),
    }
    # A pipeline stage holds the embedding or the output projection only at the ends.
    edges = {name: style for name, style in edges.items() if getattr(model, name) is not None}
    if edges:
        parallelize_module(model, mesh, edges)
    gather = {"input_layouts": (Shard(1), None, None),
              "desired_input_layouts": (Replicate(), None, None), "use_local_output": True}
    for block in model.layers.values():
        styles = float8.tp_styles(block) if float8 is not None else {}

        def style(name: str, plain: type, styles=styles, **kwargs):
            return styles.get(name, plain)(**kwargs)  # float8's from the same arguments

        parallelize_module(block, mesh, {
            "attention": style("attention", PrepareModuleInput, **gather),
            "attention.wq": style("attention.wq", ColwiseParallel),
            "attention.wk": style("attention.wk", ColwiseParallel),
            "attention.wv": style("attention.wv", ColwiseParallel),
            "attention.wo": style("attention.wo", RowwiseParallel, output_layouts=Shard(1)),
            "feed_forward": style("feed_forward", PrepareModuleInput,
                                  input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                  use_local_output=True),
            "feed_forward.w1": style("feed_forward.w1", ColwiseParallel),
            "feed_forward.w3": style("feed_forward.w3", ColwiseParallel),
            "feed_forward.w2": style("feed_forward.w2", RowwiseParallel,
                                     output_layouts=Shard(1)),
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
    float8: Float8 | None = None,
) -> Transformer:
    """Apply float8 conversion, tensor parallelism, activation checkpointing, compile and FSDP2
    in torchtitan's order, in place; to a whole model or to one pipeline stage
    (distributed.pipeline) alike."""
    tp = tp_mesh(mesh)
    if float8 is not None:
        float8.convert(model, tp=tp.size() if tp is not None else 1,
                       dp_shard=mesh["dp_shard"].size() if mesh is not None else 1)
    if tp is not None:
        apply_tp(model, tp, float8)
    for key, block in model.layers.items():
        # Selective checkpointing picks blocks by their index in the whole model, so that a
        # pipeline stage recomputes what the same blocks recompute without pipelining.
        if cfg.activation_checkpointing == "full" or (
            cfg.activation_checkpointing == "selective" and int(key) % 2 == 0
        ):
            _checkpointed(block)
        if cfg.compile:
            block.compile()
    if mesh is None:
        return model
    mesh = dp_mesh(mesh)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers.values()):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        # Under pipelining a stage's forwards and backwards of all micro-batches interleave:
        # its parameters stay gathered for the whole step (as torchtitan does), rather than
        # gathered again for every micro-batch; the schedule reshards them after the last.
        reshard = i < last and cfg.pp == 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
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
