"""The Triton cross-entropy against ops.cross_entropy_ref, forward and backward."""

import importlib

import pytest
import torch
from kernel_helpers import DEVICE, check_against_reference, dtypes, randn

from llamatrain import kernels, ops


def targets_with_ignored(shape: tuple[int, ...], vocab: int, ignored: int) -> torch.Tensor:
    targets = torch.randint(0, vocab, shape, device=DEVICE)
    targets.view(-1)[:ignored] = -100
    return targets


@dtypes
@pytest.mark.parametrize(
    "shape, vocab, ignored", [((2, 37), 5003, 7), ((74,), 123, 0), ((3, 5), 32000, 2)], ids=str
)
def test_cross_entropy_matches_reference(shape, vocab, ignored, dtype):
    # 5003 and 32000 span several 4096-wide chunks, with a ragged last one.
    logits = randn(*shape, vocab, dtype=dtype, scale=4.0)
    targets = targets_with_ignored(shape, vocab, ignored)
    check_against_reference(
        lambda x: kernels.cross_entropy(x, targets),
        lambda x: ops.cross_entropy_ref(x, targets),
        [logits], dtype, out_dtype=torch.float32,  # the loss is fp32 whatever the logits
    )


def test_cross_entropy_loss_is_fp32_mean_over_kept_targets():
    logits = randn(4, 50)
    targets = torch.tensor([3, -100, 7, -100], device=DEVICE)
    loss = kernels.cross_entropy(logits, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    by_hand = -(logits.log_softmax(-1)[[0, 2], [3, 7]]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)


def test_cross_entropy_is_zero_with_zero_gradient_when_every_target_is_ignored():
    logits = randn(3, 7, 100).requires_grad_(True)
    targets = torch.full((3, 7), -1, device=DEVICE)
    loss = kernels.cross_entropy(logits, targets, ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_gradient_scales_with_upstream_gradient():
    logits = randn(5, 300)
    targets = torch.randint(0, 300, (5,), device=DEVICE)
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    kernels.cross_entropy(x1, targets).backward()
    (kernels.cross_entropy(x2, targets) * 2.5).backward()
    torch.testing.assert_close(x2.grad, 2.5 * x1.grad)


def test_cross_entropy_without_grad_gives_the_same_loss():
    logits = randn(2, 37, 5003, scale=4.0)
    targets = targets_with_ignored((2, 37), 5003, 7)
    with torch.no_grad():
        evaluated = kernels.cross_entropy(logits, targets)
    trained = kernels.cross_entropy(logits.clone().requires_grad_(True), targets)
    assert evaluated.item() == trained.item()
    torch.testing.assert_close(evaluated, ops.cross_entropy_ref(logits, targets))


def test_cross_entropy_of_vocab_slice_of_wider_logits():
    wide = randn(2, 37, 700, scale=3.0)
    logits = wide[..., :613]  # rows strided by 700
    targets = targets_with_ignored((2, 37), 613, 3)
    check_against_reference(
        lambda x: kernels.cross_entropy(x, targets), lambda x: ops.cross_entropy_ref(x, targets),
        [logits], torch.float32,
    )


def test_cross_entropy_stays_finite_for_huge_logits():
    logits = randn(4, 1000, scale=1e4)
    targets = torch.randint(0, 1000, (4,), device=DEVICE)
    check_against_reference(
        lambda x: kernels.cross_entropy(x, targets), lambda x: ops.cross_entropy_ref(x, targets),
        [logits], torch.float32,
    )


def test_cross_entropy_second_backward_through_graph_fails_loudly():
    # The stored gradient is scaled in place by the first backward; a second must not reuse it.
    logits = randn(2, 64).requires_grad_(True)
    loss = kernels.cross_entropy(logits, torch.tensor([1, 2], device=DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_rejects_targets_of_other_shape():
    with pytest.raises(ValueError, match=r"logits \(2, 5, 10\) and targets \(2, 4\)"):
        kernels.cross_entropy(randn(2, 5, 10), torch.zeros(2, 4, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("bad", [300, -5], ids=["past-vocab", "negative"])
def test_cross_entropy_rejects_a_target_outside_the_vocabulary(bad):
    logits = randn(4, 300)
    targets = torch.tensor([3, bad, 7, -100], device=DEVICE)
    with pytest.raises(ValueError, match=rf"cross_entropy: target {bad} is outside \[0, 300\)"):
        kernels.cross_entropy(logits, targets)


def test_cross_entropy_keeps_the_rows_in_flight_within_half_the_l2():
    runtime = importlib.import_module("llamatrain.kernels._runtime")
    ce = importlib.import_module("llamatrain.kernels.cross_entropy")
    for arch in (80, 90, 120):
        target = runtime.chip_target(arch)
        row_bytes = 32000 * 2  # a bf16 row of Llama 2's vocabulary
        programs = ce.rows_in_flight(target, row_bytes)
        assert programs >= target.num_sms
        assert programs * row_bytes <= target.l2_cache // 2
    # A100: 327 rows (21 MB) in flight, not one per resident program (864 rows, 55 MB).
    assert ce.rows_in_flight(runtime.chip_target(80), 64000) == 327
