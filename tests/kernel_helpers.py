"""What the kernel tests share: the device and dtypes they run on, and how they compare.

By default the kernels run on the CPU through Triton's interpreter, in fp32.
`LLAMATRAIN_TEST_DEVICE=cuda` runs the same tests on a GPU in bf16 and fp32 (`make gpu-check`).
Errors are normalised by the largest reference value, so one tolerance fits tensors of any scale.
`LLAMATRAIN_TEST_ERRORS=FILE` appends every compared error to FILE as a JSON line (test, what,
error, tolerance): the worst errors of the check's correctness table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import pytest
import torch

DEVICE = os.environ.get("LLAMATRAIN_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"LLAMATRAIN_TEST_DEVICE = {DEVICE!r}: expected cpu or cuda")
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float32]

# Largest error allowed, relative to the largest magnitude of the fp32 reference.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Attention's backward sums longer chains of products (and bf16 rounds p before p @ v).
ATTENTION_BWD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 3e-2}

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.float() - expected).abs().max() / scale).item()


def _record(what: str, err: float, tol: float) -> None:
    path = os.environ.get("LLAMATRAIN_TEST_ERRORS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "error": err, "tolerance": tol}) + "\n")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = bool(torch.isfinite(actual.float()).all())
    err = relative_error(actual, expected) if finite else float("inf")
    _record(what, err, tol)
    assert finite, f"{what}: not finite"
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def forward_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    seed: int = 1,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of fn(*inputs) and the gradients of the inputs under fixed random output grads.

    Inputs are used as leaves of their own (detached copies), so the same tensors can be fed
    to the kernel and to the reference.
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, device=DEVICE).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [x.grad for x in leaves]


def check_against_reference(
    kernel: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    bwd_tolerance: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> None:
    """The kernel on `inputs` matches the reference run on their fp32 upcasts, forward and
    backward, within TOLERANCE[dtype] (bwd_tolerance for the gradients, when given). Outputs
    are in `dtype` (or `out_dtype`), gradients in their input's dtype."""
    outs, grads = forward_backward(kernel, inputs)
    ref_outs, ref_grads = forward_backward(reference, [x.float() for x in inputs])
    tol = TOLERANCE[dtype]
    for i, (a, e) in enumerate(zip(outs, ref_outs, strict=True)):
        expected_dtype = out_dtype or dtype
        assert a.dtype == expected_dtype, f"output {i}: dtype {a.dtype} != {expected_dtype}"
        assert_close(a, e, tol, f"output {i}")
    for i, (a, e) in enumerate(zip(grads, ref_grads, strict=True)):
        assert a.dtype == dtype, f"grad {i}: dtype {a.dtype} != {dtype}"
        assert_close(a, e, bwd_tolerance or tol, f"grad of input {i}")
