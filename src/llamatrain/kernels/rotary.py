"""Rotary position embedding of q and k in one launch: Triton forward and backward.

Meta's convention: adjacent pairs (2i, 2i+1) of each head are rotated by the angle whose cos and
sin are row `offset + t` of the (positions, head_dim // 2) tables. One program rotates every q and
kv head of one token, so a token's cos/sin row is read once. The backward is the same kernel
rotating the gradients by the negative angle. Outputs are new tensors: nothing is written in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _runtime


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_cos, stride_sin,
    seq_len, offset, n_q_heads, n_kv_heads, head_dim,
    SIGN: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    half = tl.arange(0, BLOCK_D // 2)
    half_mask = half < head_dim // 2
    pos = s + offset
    cos = tl.load(COS + pos * stride_cos + half, mask=half_mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + pos * stride_sin + half, mask=half_mask, other=0.0).to(tl.float32)
    sin = sin * SIGN

    # The outputs are contiguous (batch, seq, heads, head_dim).
    _rotate_heads(Q + b * stride_qb + s * stride_qs, stride_qh,
                  QO + (b * seq_len + s) * n_q_heads * head_dim, n_q_heads, head_dim, cos, sin,
                  BLOCK_HQ, BLOCK_D)
    _rotate_heads(K + b * stride_kb + s * stride_ks, stride_kh,
                  KO + (b * seq_len + s) * n_kv_heads * head_dim, n_kv_heads, head_dim, cos, sin,
                  BLOCK_HK, BLOCK_D)


@triton.jit
def _rotate_heads(
    X, stride_xh, XO, n_heads, head_dim, cos, sin,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rotate the adjacent pairs of one token's n_heads heads (X: its first element)."""
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & (d[None, :] < head_dim)
    x = tl.load(X + h[:, None] * stride_xh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))
    out = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (BLOCK_H, BLOCK_D))
    tl.store(XO + h[:, None] * head_dim + d[None, :], out.to(XO.dtype.element_ty), mask=mask)


def launch_config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps): every head of one token in one program."""
    block_hq = _runtime.next_power_of_2(n_q_heads)
    block_hk = _runtime.next_power_of_2(n_kv_heads)
    block_d = _runtime.next_power_of_2(head_dim)
    warps = 8 if block_hq * block_d >= 8192 else 4
    return block_hq, block_hk, block_d, warps


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int,
    sign: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    batch, seq, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_hq, block_hk, block_d, warps = launch_config(n_q_heads, n_kv_heads, head_dim)
    _runtime.launch(
        _rotary_kernel, (batch * seq,),
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), sin.stride(0),
        seq, offset, n_q_heads, n_kv_heads, head_dim,
        SIGN=sign, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return q_out, k_out


@triton_op("llamatrain::rotary_fwd", mutates_args=())
def _rotary_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, offset, 1.0)


@triton_op("llamatrain::rotary_bwd", mutates_args=())
def _rotary_bwd(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(dq, dk, cos, sin, offset, -1.0)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, offset):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        ctx.offset = offset
        return torch.ops.llamatrain.rotary_fwd(q, k, cos, sin, offset)

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.llamatrain.rotary_bwd(dq, dk, cos, sin, ctx.offset)
        return dq, dk, None, None, None


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, seq, n_heads, head_dim) and k (batch, seq, n_kv_heads, head_dim).

    cos and sin have shape (>= offset + seq, head_dim // 2); row `offset + t` is used at t.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be (batch, seq, heads, "
            "head_dim) with the same batch, seq and head_dim"
        )
    seq, head_dim = q.shape[1], q.shape[3]
    if head_dim % 2:
        raise ValueError(f"rotary: head_dim {head_dim} must be even")
    if offset < 0:
        raise ValueError(f"rotary: offset {offset} must be >= 0")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim // 2 or table.shape[0] < offset + seq:
            raise ValueError(
                f"rotary: {name} {tuple(table.shape)} must be (>= offset + seq = {offset + seq}, "
                f"head_dim // 2 = {head_dim // 2})"
            )
    return RotaryFunction.apply(q, k, cos, sin, int(offset))
