"""Cross-entropy over a large vocabulary, with the gradient computed in the forward pass.

One program per row streams the logits in chunks twice: once for the online max and sum of
exponentials (the log-sum-exp), once to write the gradient (softmax - one_hot) / n_valid in the
logits' dtype. So fp32 logits never exist as a whole tensor, and the backward is one scaling of
the stored gradient by the incoming one. The loss is the mean over targets != ignore_index, and 0
(with a zero gradient) when every target is ignored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _runtime


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, TARGETS, INV_COUNT, LOSS, DLOGITS,
    stride_logits, stride_dlogits, n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_logits
    dlogits = DLOGITS + row * stride_dlogits
    target = tl.load(TARGETS + row)
    offs = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                zeros = tl.zeros((BLOCK_V,), dtype=tl.float32).to(DLOGITS.dtype.element_ty)
                tl.store(dlogits + cols, zeros, mask=cols < n_cols)
        tl.store(LOSS + row, 0.0)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            x = tl.load(logits + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_target = tl.load(logits + target).to(tl.float32)
        tl.store(LOSS + row, lse - x_target)
        if COMPUTE_GRAD:
            inv_count = tl.load(INV_COUNT)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(dlogits + cols, (grad * inv_count).to(DLOGITS.dtype.element_ty),
                         mask=mask)  # fmt: skip


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): chunks of up to 4096 logits, 16 per thread."""
    block = min(4096, _runtime.next_power_of_2(n_cols))
    return block, max(1, min(8, block // 512))


def _forward(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dlogits): the mean loss and its gradient with respect to the logits (an empty
    tensor unless `compute_grad`: evaluation pays for one pass over the logits, not two)."""
    logits2 = _runtime.as_rows(logits)
    targets1 = targets.reshape(-1).contiguous()
    n_rows, n_cols = logits2.shape
    count = (targets1 != ignore_index).sum().clamp(min=1).to(torch.float32)
    inv_count = count.reciprocal().reshape(1)
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad_shape = logits.shape if compute_grad else (0,)
    dlogits = torch.empty(grad_shape, dtype=logits.dtype, device=logits.device)
    block, warps = launch_config(n_cols)
    _runtime.launch(
        wrap_triton(_cross_entropy_fwd_kernel), (n_rows,),
        logits2, targets1, inv_count, losses, dlogits,
        logits2.stride(0), n_cols, n_cols, ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block, num_warps=warps, num_stages=2,
    )  # fmt: skip
    return losses.sum() / count, dlogits


@triton_op("llamatrain::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(logits, targets, ignore_index, compute_grad)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, compute_grad):  # type: ignore[override]
        loss, dlogits = torch.ops.llamatrain.cross_entropy_fwd(
            logits, targets, ignore_index, compute_grad
        )
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    def backward(ctx, dloss):  # type: ignore[override]
        (dlogits,) = ctx.saved_tensors
        # Scaled in place: the buffer is this graph's own and read by nothing else. A second
        # backward through the graph fails on the version check instead of reading it twice.
        return dlogits.mul_(dloss.to(dlogits.dtype)), None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean negative log-likelihood of logits (..., vocab) at targets (...), in fp32."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "must be (..., vocab) and (...)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: targets dtype {targets.dtype} must be int64 or int32")
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    return CrossEntropyFunction.apply(logits, targets, int(ignore_index), compute_grad)
