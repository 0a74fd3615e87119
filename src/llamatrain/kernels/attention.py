"""Flash attention with grouped-query heads: Triton forward and backward (FlashAttention-2's).

Tensors are (batch, seq, heads, head_dim); k and v have n_kv_heads dividing n_heads and are never
repeated in memory: q head h reads kv head h // (n_heads // n_kv_heads). The forward keeps an
online softmax in fp32 (base 2, the scale folded into one multiply) and saves the log-sum-exp.

The backward runs one program per kv block that loops over every q head of its group, so dK and
dV are summed in registers in a fixed order. dQ takes one of two paths:
- default: in the same pass, each (q block, kv block) pair adds its dQ share to an fp32 buffer
  with atomics: 5 GEMMs per block pair (S, dV, dP, dK, dQ), FlashAttention-2's count. Atomic
  adds land in no fixed order, so dQ's last bits may differ between reruns.
- `deterministic=True`: a second kernel, one program per q block, sums dQ in registers in a
  fixed order: bit-identical reruns, at 7 GEMMs per pair (S and dP are recomputed there).
Atomics rather than a deterministic split reduction (per-kv-block dQ partials, reduced after):
the partials would take seq_k / block_n times dQ's memory (32x at 4096 tokens) and a pass to
reduce them, and the deterministic kernel already gives bit-identical reruns when asked for.

Programs are issued heaviest first across every batch and head: the grid's fastest axis runs
over (batch, head), its slow axis over blocks in order of decreasing causal work, so the long
blocks of all heads start in the first wave and the short ones fill in at the end.

Causal masking is bottom-right aligned (query i sees keys j <= i + seq_k - seq_q), as in the
reference. Loops are split into blocks that need no mask and the few on the diagonal or the
sequence tail that do, so most blocks pay for no masking at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _runtime

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _load_kv(k_base, v_base, stride_ks, stride_vs, cols, offs_d, seq_k, MASKED: tl.constexpr):
    """The K and V rows `cols` of one kv head; rows past seq_k read as zeros when MASKED."""
    if MASKED:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                    mask=cols[:, None] < seq_k, other=0.0)  # fmt: skip
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=cols[:, None] < seq_k, other=0.0)  # fmt: skip
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    return k, v


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
    offs_m, lo, hi, seq_k, diag, qk_scale,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k, v = _load_kv(k_base, v_base, stride_ks, stride_vs, cols, offs_d, seq_k, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 there, not -inf.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    n_q_heads, group_size, seq_q, seq_k, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Causal work grows with the query block: the last block goes first.
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    bh = tl.program_id(0)
    b = (bh // n_q_heads).to(tl.int64)
    h = bh % n_q_heads
    kvh = (h // group_size).to(tl.int64)
    h = h.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < seq_q
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    diag = seq_k - seq_q
    if CAUSAL:
        # Keys below `full` are visible to every row of the block; none past `end` is to any.
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seq_k)
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seq_k)
    else:
        full = seq_k
        end = seq_k
    full = full // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, 0, full, seq_k, diag,
        qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, full, end, seq_k, diag,
        qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_mask)  # fmt: skip
    # The log-sum-exp in base 2 of the scaled scores, which is what the backward exponentiates.
    tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    n_q_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_q_heads).to(tl.int64)
    h = (bh % n_q_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < seq_q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    n_q_heads, n_kv_heads, group_size, seq_q, seq_k, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Causal work shrinks with the key block (fewer queries see it): the first block goes first.
    start_n = tl.program_id(1) * BLOCK_N
    bkv = tl.program_id(0)
    b = (bkv // n_kv_heads).to(tl.int64)
    kvh = (bkv % n_kv_heads).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_mask = cols[:, None] < seq_k
    # Keys past the end load as zeros; their rows of dK and dV are never stored, and no other
    # row depends on them, so they need no mask below.
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
                mask=col_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
                mask=col_mask, other=0.0)  # fmt: skip
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    diag = seq_k - seq_q
    # Causal: rows before `lo` see none of these keys.
    lo = tl.minimum(tl.maximum(start_n - diag, 0), seq_q) // BLOCK_M * BLOCK_M if CAUSAL else 0
    offs_m = tl.arange(0, BLOCK_M)
    # One flat loop over (q head of the group, q block), not two nested ones: a single loop body
    # keeps the register pressure of the group-1 case (the nested form spilled at group 8).
    # The causal mask is applied to every block; it is a select on a tile already in registers.
    steps = tl.cdiv(seq_q - lo, BLOCK_M)
    for i in range(0, group_size * steps):
        g = i // steps
        start_m = tl.multiple_of(lo + (i - g * steps) * BLOCK_M, BLOCK_M)
        h = kvh * group_size + g
        bh = b * n_q_heads + h
        rows = start_m + offs_m
        row_mask = rows < seq_q
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                    mask=row_mask[:, None], other=0.0)  # fmt: skip
        do = tl.load(
            DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
            mask=row_mask[:, None], other=0.0,
        )  # fmt: skip
        # Rows past the end get lse = +inf, hence p = 0: they add nothing.
        lse = tl.load(LSE + bh * seq_q + rows, mask=row_mask, other=float("inf"))
        delta = tl.load(DELTA + bh * seq_q + rows, mask=row_mask, other=0.0)
        # Transposed scores (keys x queries) so dK and dV accumulate as (BLOCK_N, HEAD_DIM).
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if CAUSAL:
            p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
            dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs
            tl.atomic_add(dq_ptrs + offs_d[None, :], dq, mask=row_mask[:, None], sem="relaxed")
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + kvh * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=col_mask,
    )  # fmt: skip
    tl.store(
        DV + b * stride_dvb + kvh * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=col_mask,
    )  # fmt: skip


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
    offs_m, lo, hi, seq_k, diag, qk_scale,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k, v = _load_kv(k_base, v_base, stride_ks, stride_vs, cols, offs_d, seq_k, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    n_q_heads, group_size, seq_q, seq_k, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # heaviest (last) first
    bh = tl.program_id(0)
    b = (bh // n_q_heads).to(tl.int64)
    h = bh % n_q_heads
    kvh = (h // group_size).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
        mask=row_mask[:, None], other=0.0,
    )  # fmt: skip
    lse = tl.load(LSE + bh.to(tl.int64) * seq_q + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_q + offs_m, mask=row_mask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    diag = seq_k - seq_q
    if CAUSAL:
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seq_k)
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seq_k)
    else:
        full = seq_k
        end = seq_k
    full = full // BLOCK_N * BLOCK_N
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, 0, full, seq_k,
        diag, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, full, end, seq_k,
        diag, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=row_mask[:, None],
    )  # fmt: skip


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfig:
    """Tiles of the forward; of the one-pass backward (block_n keys per program, looping over
    block_m queries, dQ by atomics); and of the deterministic backward's dK/dV kernel (same
    loop) and dQ kernel (block_m queries, looping over block_n keys)."""

    fwd: TileConfig
    bwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig


# Shared memory per block from which the large forward tiles fit (H100: 227 KB; A100 has 163 KB
# and consumer Blackwell, sm_120, 99 KB).
LARGE_TILE_SHARED_MEMORY = 200 * 1024


def launch_config(head_dim: int, target: _runtime.Target, dtype: torch.dtype) -> AttentionConfig:
    """Tiles by head_dim, dtype and the GPU's shared memory per block, chosen to fit it and to
    compile without register spills (`compile_check` proves both for sm_80, sm_90 and sm_120).
    The interpreter gets small, unequal tiles, so tests on short sequences still cross several
    blocks and the diagonal in both directions."""
    if target.arch is None:
        return AttentionConfig(
            fwd=TileConfig(32, 16, 4, 1), bwd=TileConfig(16, 32, 4, 1),
            dkdv=TileConfig(16, 32, 4, 1), dq=TileConfig(32, 16, 4, 1),
        )  # fmt: skip
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory and registers; fp32 is for tests, not speed.
        warps = 8 if head_dim >= 64 else 4
        return AttentionConfig(
            fwd=TileConfig(64, 32, warps, 2), bwd=TileConfig(32, 64, warps, 2),
            dkdv=TileConfig(32, 64, warps, 2), dq=TileConfig(64, 32, warps, 2),
        )  # fmt: skip
    if head_dim <= 64:
        return AttentionConfig(
            fwd=TileConfig(128, 64, 4, 3), bwd=TileConfig(32, 128, 8 if head_dim == 64 else 4, 2),
            dkdv=TileConfig(32, 128, 8 if head_dim == 64 else 4, 2),
            dq=TileConfig(128, 32, 4, 2),
        )  # fmt: skip
    if target.shared_memory >= LARGE_TILE_SHARED_MEMORY:
        return AttentionConfig(
            fwd=TileConfig(128, 128, 8, 2), bwd=TileConfig(32, 64, 8, 2),
            dkdv=TileConfig(32, 128, 8, 2), dq=TileConfig(128, 64, 8, 2),
        )  # fmt: skip
    return AttentionConfig(
        fwd=TileConfig(128, 64, 8, 2), bwd=TileConfig(32, 64, 8, 2),
        dkdv=TileConfig(64, 64, 8, 2), dq=TileConfig(64, 64, 8, 2),
    )  # fmt: skip


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _operand(t: torch.Tensor, arch: int | None) -> torch.Tensor:
    """t as a kernel reads it: unit stride in head_dim; fp32 in the interpreter (arch None),
    whose tl.dot has no bf16/fp16 arithmetic (outputs are still stored in the inputs' dtype)."""
    if arch is None and t.dtype != torch.float32:
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, target = q.dtype, _runtime.target(q.device)
    arch = target.arch
    q, k, v = _operand(q, arch), _operand(k, arch), _operand(v, arch)
    batch, seq_q, n_q_heads, head_dim = q.shape
    seq_k, n_kv_heads = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    lse = torch.empty((batch, n_q_heads, seq_q), dtype=torch.float32, device=q.device)
    tile = launch_config(head_dim, target, q.dtype).fwd
    sm_scale = 1.0 / math.sqrt(head_dim)
    _runtime.launch(
        _attn_fwd_kernel, (batch * n_q_heads, _runtime.cdiv(seq_q, tile.block_m)),
        q, k, v, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        n_q_heads, n_q_heads // n_kv_heads, seq_q, seq_k, sm_scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        DOT_PRECISION=_runtime.dot_precision(q.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out, lse


def _backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_dtype, kv_dtype, target = q.dtype, k.dtype, _runtime.target(q.device)
    arch = target.arch
    do, q, k, v = (_operand(t, arch) for t in (do, q, k, v))
    batch, seq_q, n_q_heads, head_dim = q.shape
    seq_k, n_kv_heads = k.shape[1], k.shape[2]
    group_size = n_q_heads // n_kv_heads
    config = launch_config(head_dim, target, q.dtype)
    sm_scale = 1.0 / math.sqrt(head_dim)
    precision = _runtime.dot_precision(q.dtype)

    delta = torch.empty_like(lse)
    block = config.dq.block_m
    _runtime.launch(
        _attn_bwd_delta_kernel, (_runtime.cdiv(seq_q, block), batch * n_q_heads),
        out, do, delta, *_strides(out), *_strides(do), n_q_heads, seq_q,
        HEAD_DIM=head_dim, BLOCK_M=block, num_warps=4,
    )  # fmt: skip

    dk = torch.empty(k.shape, dtype=kv_dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=kv_dtype, device=v.device)
    # The one-pass backward sums dQ in fp32 across kv blocks; the deterministic one writes it.
    dq = torch.empty(q.shape, dtype=q_dtype if deterministic else torch.float32, device=q.device)
    if not deterministic:
        dq.zero_()
    tile = config.dkdv if deterministic else config.bwd
    _runtime.launch(
        _attn_bwd_dkdv_kernel,
        (batch * n_kv_heads, _runtime.cdiv(seq_k, tile.block_n)),
        q, k, v, do, lse, delta, dk, dv, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        *_strides(dq), n_q_heads, n_kv_heads, group_size, seq_q, seq_k, sm_scale * LOG2E, sm_scale,
        CAUSAL=causal, ATOMIC_DQ=not deterministic, HEAD_DIM=head_dim, BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, DOT_PRECISION=precision, num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )  # fmt: skip
    if not deterministic:
        return dq.to(q_dtype), dk, dv

    tile = config.dq
    _runtime.launch(
        _attn_bwd_dq_kernel, (batch * n_q_heads, _runtime.cdiv(seq_q, tile.block_m)),
        q, k, v, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        n_q_heads, group_size, seq_q, seq_k, sm_scale * LOG2E, sm_scale,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        DOT_PRECISION=precision, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return dq, dk, dv


@triton_op("llamatrain::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal)


@triton_op("llamatrain::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, causal, deterministic)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, deterministic):  # type: ignore[override]
        out, lse = torch.ops.llamatrain.attention_fwd(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.deterministic = causal, deterministic
        return out

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.llamatrain.attention_bwd(
            do, q, k, v, out, lse, ctx.causal, ctx.deterministic
        )
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
    deterministic: bool = False,
) -> torch.Tensor:
    """Softmax(q k^T / sqrt(head_dim)) v for q (batch, seq_q, n_heads, head_dim) and k, v
    (batch, seq_k, n_kv_heads, head_dim) with n_heads % n_kv_heads == 0. `deterministic`
    selects the backward whose reruns are bit-identical (dQ in its own kernel, no atomics)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            "(batch, seq, heads, head_dim), k and v of one shape"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch and "
            "head_dim, and n_heads divisible by n_kv_heads"
        )
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim {q.shape[3]} must be one of {HEAD_DIMS}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: dtypes {q.dtype}, {k.dtype}, {v.dtype} must be equal")
    return AttentionFunction.apply(q, k, v, bool(causal), bool(deterministic))
