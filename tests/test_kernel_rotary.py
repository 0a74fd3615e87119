"""The Triton rotary embedding against ops.rotary_ref, forward and backward."""

import pytest
import torch
from kernel_helpers import DEVICE, check_against_reference, dtypes, randn

from llamatrain import kernels, ops


def tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=DEVICE) / head_dim)
    angles = torch.arange(positions, device=DEVICE)[:, None] * inv_freq
    return angles.cos(), angles.sin()


@dtypes
@pytest.mark.parametrize(
    "batch, seq, n_heads, n_kv_heads, head_dim, offset",
    [(2, 37, 6, 2, 32, 0), (1, 131, 8, 1, 64, 0), (2, 16, 4, 4, 64, 9)],
)
def test_rotary_matches_reference(batch, seq, n_heads, n_kv_heads, head_dim, offset, dtype):
    cos, sin = tables(offset + seq + 3, head_dim)
    q = randn(batch, seq, n_heads, head_dim, dtype=dtype)
    k = randn(batch, seq, n_kv_heads, head_dim, dtype=dtype)
    check_against_reference(
        lambda q, k: kernels.rotary(q, k, cos, sin, offset),
        lambda q, k: ops.rotary_ref(q, k, cos, sin, offset),
        [q, k], dtype,
    )


def test_rotary_of_views_into_one_fused_qkv_projection():
    cos, sin = tables(37, 32)
    qkv = randn(2, 37, 10, 32)  # 6 q heads, then 2 k and 2 v heads, as one projection writes
    q, k = qkv[:, :, :6], qkv[:, :, 6:8]
    assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(
        lambda q, k: kernels.rotary(q, k, cos, sin), lambda q, k: ops.rotary_ref(q, k, cos, sin),
        [q, k], torch.float32,
    )


def test_rotary_backward_rotates_by_the_negative_angle():
    # Rotation is orthogonal: the gradient of <rotate(q), g> is rotate(g, -angle).
    cos, sin = tables(16, 32)
    q = randn(1, 16, 2, 32).requires_grad_(True)
    k = randn(1, 16, 1, 32).requires_grad_(True)
    gq, gk = randn(1, 16, 2, 32), randn(1, 16, 1, 32)
    qr, kr = kernels.rotary(q, k, cos, sin)
    torch.autograd.backward([qr, kr], [gq, gk])
    back_q, back_k = ops.rotary_ref(gq, gk, cos, -sin)
    torch.testing.assert_close(q.grad, back_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad, back_k, rtol=1e-5, atol=1e-6)


def test_rotary_writes_new_tensors_and_leaves_inputs_unchanged():
    cos, sin = tables(8, 32)
    q, k = randn(1, 8, 2, 32), randn(1, 8, 2, 32)
    q0, k0 = q.clone(), k.clone()
    qr, kr = kernels.rotary(q, k, cos, sin)
    assert qr.data_ptr() != q.data_ptr() and kr.data_ptr() != k.data_ptr()
    assert torch.equal(q, q0) and torch.equal(k, k0)
    # Position 0 is the identity rotation; later positions are not.
    torch.testing.assert_close(qr[:, 0], q[:, 0])
    assert not torch.allclose(qr[:, 1:], q[:, 1:])


def test_rotary_rejects_tables_too_short_for_offset_and_seq():
    cos, sin = tables(20, 32)
    q, k = randn(1, 16, 2, 32), randn(1, 16, 2, 32)
    with pytest.raises(ValueError, match=r"cos \(20, 16\) must be \(>= offset \+ seq = 21"):
        kernels.rotary(q, k, cos, sin, offset=5)
