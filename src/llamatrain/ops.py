"""The ops the model calls, each with a plain PyTorch reference.

`set_backend` chooses between the references (`torch`) and the fused Triton kernels of
`llamatrain.kernels` (`triton`), for every op or for some (`kernel_ops`: what
`llamatrain.kernels_choice` picked op by op); `auto` means Triton on CUDA and PyTorch elsewhere.
The `*_ref` functions are the specification the kernels are tested against: simple, in fp32,
never clever. Tensors are in (batch, seq, heads, head_dim) layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial

BACKENDS = ("auto", "triton", "torch")
ATTENTION_BACKWARDS = ("atomic", "deterministic")
# The ops that have a Triton kernel, by the names of their functions here.
OPS = ("rms_norm", "swiglu", "rotary", "attention", "cross_entropy", "linear_cross_entropy")

_kernels: ModuleType | None = None
_kernel_ops: frozenset[str] = frozenset()
_deterministic_attention = False


def set_backend(
    backend: str, device_type: str = "cpu", attention_backward: str = "atomic", *,
    kernel_ops: Iterable[str] | None = None,
) -> str:
    """Select the implementation of every op; returns the resolved backend (`triton` or `torch`).

    On a CPU, `triton` runs the kernels through Triton's interpreter: importing
    `llamatrain.kernels` takes care that the interpreter is on before Triton is imported.
    `attention_backward` chooses the Triton attention backward: `atomic` (dQ summed with atomics
    in the dK/dV pass, FlashAttention-2's 5 GEMMs) or `deterministic` (bit-identical reruns).
    With `kernel_ops`, only those ops (names of OPS) run their kernels, the rest PyTorch.
    """
    global _kernels, _kernel_ops, _deterministic_attention
    if backend not in BACKENDS:
        raise ValueError(f"kernels.backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
    if attention_backward not in ATTENTION_BACKWARDS:
        raise ValueError(f"kernels.attention_backward = {attention_backward!r}: expected one of "
                         f"{', '.join(ATTENTION_BACKWARDS)}")  # fmt: skip
    chosen = frozenset(OPS if kernel_ops is None else kernel_ops)
    assert chosen <= set(OPS), sorted(chosen - set(OPS))
    _deterministic_attention = attention_backward == "deterministic"
    if backend == "auto":
        backend = "triton" if device_type == "cuda" else "torch"
    if backend == "torch" or not chosen:
        _kernels, _kernel_ops = None, frozenset()
        return "torch"
    from llamatrain import kernels

    _kernels, _kernel_ops = kernels, chosen
    return backend


def _kernel(op: str) -> ModuleType | None:
    """llamatrain.kernels when `op` runs its Triton kernel, else None (its PyTorch path)."""
    return _kernels if op in _kernel_ops else None


# ---------------------------------------------------------------------------------------------
# References


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in x's dtype (Meta's)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent pairs (2i, 2i+1) of q and k by the angles whose cos/sin are given.

    cos and sin have shape (>= offset + seq, head_dim // 2); row `offset + t` is used at t.
    """
    seq = q.shape[1]
    c = cos[offset : offset + seq].float()[None, :, None, :]
    s = sin[offset : offset + seq].float()[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
        return out.flatten(-2).type_as(x)

    return rotate(q), rotate(k)


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Softmax attention in fp32 with k/v heads repeated for grouped-query attention."""
    n_rep = q.shape[2] // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf = kf.repeat_interleave(n_rep, dim=1)
    vf = vf.repeat_interleave(n_rep, dim=1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s_q, s_k = scores.shape[-2:]
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ vf
    return out.transpose(1, 2).type_as(q)


def cross_entropy_ref(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean negative log-likelihood over targets != ignore_index, in fp32; 0 if all are ignored."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count


def linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """cross_entropy_ref of the logits hidden @ weight.T: the unfused output projection + loss."""
    return cross_entropy_ref(F.linear(hidden, weight), targets, ignore_index)


# ---------------------------------------------------------------------------------------------
# What the model calls


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x, or with `residual`: (rms_norm(x + residual), x + residual)."""
    if isinstance(weight, DTensor):
        # Sequence parallelism: a gain replicated over the tensor-parallel ranks, applied to this
        # rank's slice of the sequence; its gradient here is a partial sum over the slices.
        weight = weight.to_local(grad_placements=[Partial()] * weight.device_mesh.ndim)
    if (kernels := _kernel("rms_norm")) is not None:
        return kernels.rms_norm(x, weight, eps, residual=residual)
    if residual is None:
        return rms_norm_ref(x, weight, eps)
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if (kernels := _kernel("swiglu")) is not None:
        return kernels.swiglu(gate, up)
    return swiglu_ref(gate, up)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if (kernels := _kernel("rotary")) is not None:
        return kernels.rotary(q, k, cos, sin)
    return rotary_ref(q, k, cos, sin)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    if (kernels := _kernel("attention")) is not None:
        return kernels.attention(q, k, v, causal=causal, deterministic=_deterministic_attention)
    # SDPA picks flash/memory-efficient kernels where it can and repeats no k/v (enable_gqa).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    if (kernels := _kernel("cross_entropy")) is not None:
        return kernels.cross_entropy(logits, targets, ignore_index=ignore_index)
    return cross_entropy_ref(logits, targets, ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of hidden @ weight.T at targets; fused (no full logits) with kernels."""
    if (kernels := _kernel("linear_cross_entropy")) is not None:
        return kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index)
