"""Fused linear cross-entropy: the output projection and the loss together, in chunks of tokens.

`linear_cross_entropy(hidden, weight, targets)` is `cross_entropy(hidden @ weight.T, targets)`
without the full logits or their gradient ever existing. Tokens are taken in chunks; a chunk's
logits (chunk x vocab) are computed by one matmul, the cross-entropy kernel turns them into the
chunk's losses and overwrites them with their gradient, and two matmuls turn that gradient into
the chunk's rows of grad_hidden and its share of grad_weight (summed over chunks in fp32). So the
gradients are ready at the end of the forward and the backward only scales them by the incoming
gradient, as in the cross-entropy kernel. Chunks hold about as many logits as `hidden` has
elements, so the loss needs about one more hidden-sized buffer rather than two of tokens x vocab.
"""

from __future__ import annotations

import importlib

import torch

from . import _runtime

# The package exports a function named like this module: import the module by path.
_ce = importlib.import_module("llamatrain.kernels.cross_entropy")


def chunk_rows(n_rows: int, dim: int, vocab: int) -> int:
    """Tokens per chunk: a power of two near n_rows * dim / vocab (logits the size of hidden)."""
    n_chunks = _runtime.cdiv(vocab, dim)
    return max(1, min(n_rows, _runtime.next_power_of_2(_runtime.cdiv(n_rows, n_chunks))))


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    compute_grad: bool, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, grad_hidden, grad_weight); the gradients are None unless `compute_grad`."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk or chunk_rows(n_rows, dim, vocab)
    targets = targets.reshape(-1).contiguous()
    count = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    inv_count = count.reciprocal().reshape(1)
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if compute_grad else None
    # The weight gradient sums over every chunk: in fp32, whatever the weight's dtype.
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if compute_grad else None
    )  # fmt: skip
    no_grad_buffer = torch.empty(0, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        h = hidden[start:stop]
        logits = h @ weight.t()
        dlogits = logits if compute_grad else no_grad_buffer  # overwritten in place
        _ce.launch_rows(logits, targets[start:stop], inv_count, losses[start:stop], dlogits,
                        ignore_index, compute_grad)  # fmt: skip
        if compute_grad:
            torch.mm(dlogits, weight, out=grad_hidden[start:stop])
            grad_weight.add_(dlogits.t() @ h)  # a chunk's product, summed in fp32
    loss = losses.sum() / count
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, compute_grad):  # type: ignore[override]
        loss, grad_hidden, grad_weight = _forward(
            hidden, weight, targets, ignore_index, compute_grad
        )
        if compute_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, dloss):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: the buffers are this graph's own and read by nothing else.
        scale = dloss.to(grad_hidden.dtype)
        return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy (fp32) of the logits hidden @ weight.T at targets, over targets !=
    ignore_index, for hidden (N, dim), weight (vocab, dim), targets (N,); differentiable in
    hidden and weight."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
            f"{tuple(weight.shape)} must be (N, dim) and (vocab, dim)"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"linear_cross_entropy: targets dtype {targets.dtype} must be int64 or int32"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} must match"
        )
    _ce.check_targets(targets, weight.shape[0], ignore_index, "linear_cross_entropy")
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(
        hidden, weight, targets, int(ignore_index), compute_grad
    )
