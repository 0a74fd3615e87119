"""The loss, in one place: the mean cross-entropy over every target that is not IGNORE_INDEX (SFT
masks its prompts and padding with it), of a micro-batch, computed one of three ways: the output
projection and the loss fused in one kernel (no full logits), whole logits, or logits sharded over
the vocabulary under tensor parallelism (loss parallelism, without gathering them)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from llamatrain import ops
from llamatrain.distributed.parallel_dims import tp_mesh

# The target of a position the loss ignores (PyTorch's cross_entropy default).
IGNORE_INDEX = -100


def loss_context(mesh: DeviceMesh | None):
    """Where the loss of vocabulary-sharded logits is computed and differentiated: torch's
    loss_parallel() under tensor parallelism (forward and backward must both run inside it)."""
    return loss_parallel() if tp_mesh(mesh) is not None else contextlib.nullcontext()


def micro_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the unmasked targets of one micro-batch, their count); fused: the model's
    output projection and the loss in one kernel (not for a tensor-parallel output projection)."""
    labels = batch["labels"]
    if fused:
        output = model(batch["input_ids"], labels, ignore_index=IGNORE_INDEX)
    else:
        output = model(batch["input_ids"])
    return output_loss(output, labels, fused=fused), target_count(labels)


def output_loss(output: torch.Tensor, labels: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """The mean loss over the unmasked labels of a model's output: a fused model's output is that
    loss already (it was given the labels as targets), otherwise the output is logits."""
    return output if fused else sequence_loss(output, labels)


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """The number of targets the loss counts (not IGNORE_INDEX)."""
    return (labels != IGNORE_INDEX).sum()


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
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
