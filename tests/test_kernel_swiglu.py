"""The Triton SwiGLU against ops.swiglu_ref, forward and backward."""

import pytest
import torch
from kernel_helpers import DEVICE, check_against_reference, dtypes, randn

from llamatrain import kernels, ops


@dtypes
@pytest.mark.parametrize("shape", [(2, 37, 123), (3, 5, 1000), (4, 2100)], ids=str)
def test_swiglu_matches_reference(shape, dtype):
    gate, up = randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype)
    check_against_reference(kernels.swiglu, ops.swiglu_ref, [gate, up], dtype)


def test_swiglu_of_halves_of_one_fused_projection():
    # gate and up as column slices of one (rows, 2 * hidden) tensor: strided rows, no copy.
    fused = randn(2, 37, 246, scale=3.0).requires_grad_(True)
    kernels.swiglu(fused[..., :123], fused[..., 123:]).sum().backward()
    grad = fused.grad.clone()
    fused.grad = None
    ops.swiglu_ref(fused[..., :123], fused[..., 123:]).sum().backward()
    torch.testing.assert_close(grad, fused.grad, rtol=1e-4, atol=1e-5)


def test_swiglu_of_transposed_inputs():
    gate = randn(2, 123, 37).transpose(1, 2)
    up = randn(2, 123, 37).transpose(1, 2)
    check_against_reference(kernels.swiglu, ops.swiglu_ref, [gate, up], torch.float32)


def test_swiglu_backward_leaves_its_inputs_unchanged():
    gate = randn(4, 300).requires_grad_(True)
    up = randn(4, 300).requires_grad_(True)
    before = (gate.detach().clone(), up.detach().clone())
    kernels.swiglu(gate, up).sum().backward()
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])


def test_swiglu_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"gate \(2, 8\) .* up \(2, 9\)"):
        kernels.swiglu(randn(2, 8), randn(2, 9))


# sigmoid(-200) is 1 / (1 + exp(200)) = 1 / inf = 0: overflow to inf is the intended IEEE path.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_swiglu_silu_saturates_for_large_gates():
    gate = torch.tensor([[-200.0, -20.0, 0.0, 20.0, 200.0]], device=DEVICE)
    up = torch.ones_like(gate)
    y = kernels.swiglu(gate, up)
    torch.testing.assert_close(y, ops.swiglu_ref(gate, up))
