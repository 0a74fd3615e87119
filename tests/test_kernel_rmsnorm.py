"""The Triton RMSNorm, with and without its fused residual add, against ops.rms_norm_ref."""

import importlib

import pytest
import torch
from kernel_helpers import DEVICE, check_against_reference, dtypes, randn

from llamatrain import kernels, ops

EPS = 1e-5


@dtypes
@pytest.mark.parametrize("shape", [(2, 37, 123), (3, 5, 1000), (4, 256)], ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    check_against_reference(
        lambda x, w: kernels.rms_norm(x, w, EPS), lambda x, w: ops.rms_norm_ref(x, w, EPS),
        [x, w], dtype,
    )


@dtypes
@pytest.mark.parametrize("shape", [(2, 37, 123), (3, 5, 1000)], ids=str)
def test_rms_norm_with_residual_returns_norm_of_sum_and_sum(shape, dtype):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)

    def reference(x, r, w):
        h = x + r
        return ops.rms_norm_ref(h, w, EPS), h

    # Both outputs get gradients, as in a block where the sum also feeds the next residual.
    check_against_reference(
        lambda x, r, w: kernels.rms_norm(x, w, EPS, residual=r), reference, [x, r, w], dtype
    )


def test_rms_norm_of_column_slice_and_of_transposed_input():
    wide = randn(2, 37, 300)
    w = randn(123)
    sliced = wide[..., 50:173]  # rows strided by 300: read in place
    transposed = randn(2, 123, 37).transpose(1, 2)  # last dim strided: copied
    for x in (sliced, transposed):
        assert not x.is_contiguous()
        check_against_reference(
            lambda x, w: kernels.rms_norm(x, w, EPS), lambda x, w: ops.rms_norm_ref(x, w, EPS),
            [x, w], torch.float32,
        )


def test_rms_norm_weight_gradient_sums_every_row():
    # Many more rows than programs, so each program sums several rows into its fp32 partial.
    x = torch.ones(300, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    kernels.rms_norm(x, w, 0.0).sum().backward()
    # Rows of ones normalise to ones, so d(sum)/dw is the number of rows.
    torch.testing.assert_close(w.grad, torch.full((64,), 300.0, device=DEVICE))


def test_rms_norm_output_takes_promoted_dtype_of_input_and_weight():
    # fp32 activations with a bf16 weight give fp32, as the reference's `normed * weight` does.
    x, w = randn(3, 64), randn(64, dtype=torch.bfloat16)
    y = kernels.rms_norm(x, w, EPS)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ops.rms_norm_ref(x, w, EPS), rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_weight_of_wrong_size():
    with pytest.raises(ValueError, match=r"weight shape \(100,\) != \(123,\)"):
        kernels.rms_norm(randn(2, 123), randn(100), EPS)


def test_rms_norm_rejects_residual_of_other_shape():
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(randn(2, 123), randn(123), EPS, residual=randn(3, 123))


@pytest.mark.parametrize("n_rows", [3, 37], ids=["fewer-rows-than-programs", "ragged"])
def test_rms_norm_backward_writes_every_weight_gradient_partial(n_rows, monkeypatch):
    # The fp32 partials are not zero-filled: each program must store its whole row. Filled with
    # NaN instead of left uninitialised, any row a program skipped would poison the sum.
    rmsnorm = importlib.import_module("llamatrain.kernels.rmsnorm")
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(rmsnorm.torch, "empty", nan_empty)
    x, w = randn(n_rows, 40), randn(40)
    check_against_reference(
        lambda x, w: kernels.rms_norm(x, w, EPS), lambda x, w: ops.rms_norm_ref(x, w, EPS),
        [x, w], torch.float32,
    )
