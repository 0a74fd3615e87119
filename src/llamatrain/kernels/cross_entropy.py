"""Cross-entropy over a large vocabulary, with the gradient computed in the forward pass.

A program streams one row of logits in chunks twice: once for the online max and sum of
exponentials (the log-sum-exp), once to write the gradient (softmax - one_hot) / n_valid in the
logits' dtype. So fp32 logits never exist as a whole tensor, and the backward is one scaling of
the stored gradient by the incoming one. The loss is the mean over targets != ignore_index, and 0
(with a zero gradient) when every target is ignored. A target outside [0, vocab) that is not
ignore_index is a ValueError, never an out-of-bounds read.

Programs loop over rows (row = pid, pid + programs, ...) and only as many run as keep their rows
in L2 between the two passes: a program re-reads its row from L2, not from memory. Writing the
gradient over the logits (the same buffer) is allowed: each element is read before it is written,
by the same program; the fused linear cross-entropy relies on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _runtime


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, TARGETS, INV_COUNT, LOSS, DLOGITS,
    stride_logits, stride_dlogits, n_rows, n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        _cross_entropy_row(LOGITS + row * stride_logits, DLOGITS + row * stride_dlogits,
                           TARGETS + row, INV_COUNT, LOSS + row, n_cols, ignore_index,
                           COMPUTE_GRAD, BLOCK_V)  # fmt: skip


@triton.jit
def _cross_entropy_row(
    logits, dlogits, TARGET, INV_COUNT, LOSS, n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    target = tl.load(TARGET)
    offs = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                zeros = tl.zeros((BLOCK_V,), dtype=tl.float32).to(dlogits.dtype.element_ty)
                tl.store(dlogits + cols, zeros, mask=cols < n_cols)
        tl.store(LOSS, 0.0)
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
        tl.store(LOSS, lse - x_target)
        if COMPUTE_GRAD:
            inv_count = tl.load(INV_COUNT)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(dlogits + cols, (grad * inv_count).to(dlogits.dtype.element_ty),
                         mask=mask)  # fmt: skip


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): chunks of up to 4096 logits, 16 per thread."""
    block = min(4096, _runtime.next_power_of_2(n_cols))
    return block, max(1, min(8, block // 512))


def rows_in_flight(target: _runtime.Target, row_bytes: int) -> int:
    """Programs to launch: as many rows in flight as half the L2 holds (the other half serves
    everything else), at least one per SM; a few in the interpreter."""
    if target.l2_cache == 0:
        return target.num_sms
    return max(target.num_sms, target.l2_cache // 2 // max(row_bytes, 1))


def check_targets(targets: torch.Tensor, n_classes: int, ignore_index: int, op: str) -> None:
    """ValueError if a target is outside [0, n_classes) and not ignore_index."""
    bad = ((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)
    if bad.any():
        value = targets[bad][0].item()
        raise ValueError(
            f"{op}: target {value} is outside [0, {n_classes}) (the vocabulary) and is not "
            f"ignore_index ({ignore_index})"
        )


def launch_rows(
    logits2: torch.Tensor, targets1: torch.Tensor, inv_count: torch.Tensor, losses: torch.Tensor,
    dlogits: torch.Tensor, ignore_index: int, compute_grad: bool,
) -> None:
    """Per-row losses of logits2 (rows, vocab) into `losses`, and when `compute_grad` the
    gradient of the mean loss into `dlogits` (which may be logits2 itself)."""
    n_rows, n_cols = logits2.shape
    block, warps = launch_config(n_cols)
    target = _runtime.target(logits2.device)
    programs = max(1, min(n_rows, rows_in_flight(target, n_cols * logits2.element_size())))
    _runtime.launch(
        _cross_entropy_fwd_kernel, (programs,),
        logits2, targets1, inv_count, losses, dlogits,
        logits2.stride(0), dlogits.stride(0) if compute_grad else n_cols, n_rows, n_cols,
        ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block, num_warps=warps, num_stages=2,
    )  # fmt: skip


def _forward(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dlogits): the mean loss and its gradient with respect to the logits (an empty
    tensor unless `compute_grad`: evaluation pays for one pass over the logits, not two)."""
    logits2 = _runtime.as_rows(logits)
    targets1 = targets.reshape(-1).contiguous()
    count = (targets1 != ignore_index).sum().clamp(min=1).to(torch.float32)
    inv_count = count.reciprocal().reshape(1)
    losses = torch.empty(logits2.shape[0], dtype=torch.float32, device=logits.device)
    grad_shape = logits2.shape if compute_grad else (0,)
    dlogits = torch.empty(grad_shape, dtype=logits.dtype, device=logits.device)
    launch_rows(logits2, targets1, inv_count, losses, dlogits, ignore_index, compute_grad)
    return losses.sum() / count, dlogits.view(logits.shape) if compute_grad else dlogits


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
    check_targets(targets, logits.shape[-1], ignore_index, "cross_entropy")
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    return CrossEntropyFunction.apply(logits, targets, int(ignore_index), compute_grad)
