"""RMSNorm (optionally fused with the residual add before it): Triton forward and backward.

One program normalises one row held whole in registers. The forward saves the fp32 reciprocal RMS;
the backward recomputes the normalised row from it and sums the weight gradient in fp32 partials,
one row of partials per program, which are then reduced (never accumulated in the input dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _runtime

MAX_COLS = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, H, Y, W, RSTD,
    stride_x, stride_r, stride_h, stride_y,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the input dtype, as `x + residual` is in the reference and as the
        # stored sum that the backward and the next residual add read.
        h = x.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # Meta's RMSNorm rounds the normalised row to the input dtype before scaling by the weight.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, H, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_dh, stride_h, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # int64 bounds make the loop's row index int64, so row * stride cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        normed = h * rstd
        dw += dy * normed
        dnormed = dy * w
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols))
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of `n_cols`: the whole row in one block."""
    if n_cols > MAX_COLS:
        raise ValueError(f"rms_norm: hidden size {n_cols} > {MAX_COLS}, the most one block holds")
    block = _runtime.next_power_of_2(n_cols)
    return block, _runtime.row_warps(block)


def _forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd): h = x + residual (x itself when there is none), rows flattened."""
    n_cols = x.shape[-1]
    x2 = _runtime.as_rows(x)
    r2 = _runtime.as_rows(residual) if residual is not None else x2
    n_rows = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    h = torch.empty_like(y, dtype=x.dtype) if residual is not None else x2
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, warps = launch_config(n_cols)
    _runtime.launch(
        _rms_norm_fwd_kernel, (n_rows,),
        x2, r2, h, y, weight.contiguous(), rstd,
        x2.stride(0), r2.stride(0), h.stride(0), y.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=warps,
    )  # fmt: skip
    return y, h, rstd


def _backward(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) from the output gradient dy and, when fused, the gradient dh of the sum."""
    n_rows, n_cols = h.shape
    dy2 = _runtime.as_rows(dy)
    dh2 = _runtime.as_rows(dh) if dh is not None else dy2
    dx = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    block, warps = launch_config(n_cols)
    programs = max(1, min(n_rows, 4 * _runtime.target(h.device).num_sms))
    rows_per_program = _runtime.cdiv(n_rows, programs)
    programs = _runtime.cdiv(n_rows, rows_per_program) if n_rows else 1
    # Every program stores its whole row of partials (zeros if it had no rows): no memset.
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=h.device)
    _runtime.launch(
        _rms_norm_bwd_kernel, (programs,),
        dy2, dh2, h, weight.contiguous(), rstd, dx, dw_partial,
        dy2.stride(0), dh2.stride(0), h.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DH=dh is not None, BLOCK_N=block, num_warps=warps, num_stages=2,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


@triton_op("llamatrain::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, weight, eps, None)
    return y, rstd


@triton_op("llamatrain::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, eps, residual)


@triton_op("llamatrain::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, dh, h, weight, rstd)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):  # type: ignore[override]
        shape = x.shape
        if residual is None:
            y, rstd = torch.ops.llamatrain.rms_norm_fwd(x, weight, eps)
            h = _runtime.as_rows(x)
        else:
            y, h, rstd = torch.ops.llamatrain.add_rms_norm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = shape
        ctx.has_residual = residual is not None
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):  # type: ignore[override]
        h, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.llamatrain.rms_norm_bwd(dy, dh, h, weight, rstd)
        dx = dx.view(ctx.shape)
        return dx, dweight, None, dx if ctx.has_residual else None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`: (rms_norm(x + residual), x + residual)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
            f"x {tuple(x.shape)} {x.dtype}"
        )
    return RMSNormFunction.apply(x, weight, float(eps), residual)
