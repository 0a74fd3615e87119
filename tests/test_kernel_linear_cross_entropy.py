"""The fused linear cross-entropy against ops.linear_cross_entropy_ref, forward and backward."""

import importlib

import pytest
import torch
from kernel_helpers import DEVICE, check_against_reference, dtypes, randn

from llamatrain import kernels, ops

lce = importlib.import_module("llamatrain.kernels.linear_cross_entropy")


def targets_with_ignored(n: int, vocab: int, ignored: int, ignore_index: int = -100):
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    targets[:ignored] = ignore_index
    return targets


@dtypes
@pytest.mark.parametrize(
    "n, dim, vocab, ignored", [(37, 16, 300, 5), (9, 32, 4100, 0)], ids=["ragged", "wide-vocab"]
)
def test_linear_cross_entropy_matches_reference(n, dim, vocab, ignored, dtype):
    hidden = randn(n, dim, dtype=dtype)
    weight = randn(vocab, dim, dtype=dtype, scale=0.5)
    targets = targets_with_ignored(n, vocab, ignored)
    check_against_reference(
        lambda h, w: kernels.linear_cross_entropy(h, w, targets),
        lambda h, w: ops.linear_cross_entropy_ref(h, w, targets),
        [hidden, weight], dtype, out_dtype=torch.float32,
    )  # fmt: skip


def test_linear_cross_entropy_with_sft_ignore_index_equals_reference_within_1e5():
    hidden, weight = randn(24, 16), randn(200, 16, scale=0.5)
    targets = targets_with_ignored(24, 200, 10, ignore_index=-1)
    fused = kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=-1)
    ref = ops.linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-1)
    assert abs(fused.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))


def test_linear_cross_entropy_never_holds_more_than_a_chunk_of_logits(monkeypatch):
    seen = []
    launch_rows = lce._ce.launch_rows

    def record(logits, *args):
        seen.append(tuple(logits.shape))
        return launch_rows(logits, *args)

    monkeypatch.setattr(lce._ce, "launch_rows", record)
    hidden = randn(40, 16).requires_grad_(True)
    weight = randn(300, 16).requires_grad_(True)
    targets = torch.randint(0, 300, (40,), device=DEVICE)
    kernels.linear_cross_entropy(hidden, weight, targets).backward()
    chunk = lce.chunk_rows(40, 16, 300)
    assert chunk == 4 and seen == [(4, 300)] * 10  # 40 tokens, never 40 x 300 logits at once
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_chunks_hold_about_as_many_logits_as_hidden_has_elements():
    # 7B at micro-batch 2: 8192 tokens x 4096 dims; 32000 logits a token: 8 chunks of 1024.
    assert lce.chunk_rows(8192, 4096, 32000) == 1024
    assert lce.chunk_rows(10, 4096, 32000) == 2
    assert lce.chunk_rows(3, 64, 8) == 3


def test_linear_cross_entropy_rejects_a_target_outside_the_vocabulary():
    hidden, weight = randn(4, 16), randn(50, 16)
    targets = torch.tensor([3, 50, 7, -100], device=DEVICE)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: target 50 is outside \[0, 50\)"):
        kernels.linear_cross_entropy(hidden, weight, targets)


def test_linear_cross_entropy_is_zero_with_zero_gradients_when_every_target_is_ignored():
    hidden = randn(6, 16).requires_grad_(True)
    weight = randn(50, 16).requires_grad_(True)
    loss = kernels.linear_cross_entropy(hidden, weight, torch.full((6,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()
