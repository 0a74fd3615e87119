"""The loss: mean cross-entropy over the targets that are not IGNORE_INDEX, of whole logits or of
logits sharded over the vocabulary (loss parallelism)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from llamatrain import ops
from llamatrain.distributed.parallel_dims import tp_mesh


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
