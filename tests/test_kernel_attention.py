"""The Triton flash attention against ops.attention_ref, forward and backward, with GQA."""

import importlib

import pytest
import torch
from kernel_helpers import (
    ATTENTION_BWD_TOLERANCE,
    DTYPES,
    assert_close,
    check_against_reference,
    dtypes,
    forward_backward,
    randn,
)

from llamatrain import kernels, ops

attention_module = importlib.import_module("llamatrain.kernels.attention")
runtime = importlib.import_module("llamatrain.kernels._runtime")


def qkv(batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim, dtype=torch.float32):
    return (
        randn(batch, seq_q, n_heads, head_dim, dtype=dtype),
        randn(batch, seq_k, n_kv_heads, head_dim, dtype=dtype),
        randn(batch, seq_k, n_kv_heads, head_dim, dtype=dtype),
    )


def check(q, k, v, causal, dtype=torch.float32, deterministic=False):
    check_against_reference(
        lambda q, k, v: kernels.attention(q, k, v, causal=causal, deterministic=deterministic),
        lambda q, k, v: ops.attention_ref(q, k, v, causal=causal),
        [q, k, v], dtype, bwd_tolerance=ATTENTION_BWD_TOLERANCE[dtype],
    )


@dtypes
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "batch, seq, n_heads, n_kv_heads, head_dim",
    [(2, 37, 6, 2, 32), (1, 131, 8, 1, 64), (1, 64, 2, 2, 16), (1, 45, 8, 1, 128)],
    ids=["gqa6:2-d32-seq37", "gqa8:1-d64-seq131", "mha-d16-seq64", "gqa8:1-d128-seq45"],
)
def test_attention_matches_reference(
    batch, seq, n_heads, n_kv_heads, head_dim, causal, deterministic, dtype
):
    check(*qkv(batch, seq, seq, n_heads, n_kv_heads, head_dim, dtype), causal, dtype,
          deterministic)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_in_half_precision_stores_that_dtype_and_matches_reference(dtype):
    # On the CPU the interpreter computes these in fp32 (its tl.dot has no 16-bit arithmetic).
    check(*qkv(1, 40, 40, 4, 2, 32, dtype), causal=True, dtype=dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_with_fewer_queries_than_keys_aligns_causal_mask_bottom_right(
    causal, deterministic
):
    # 20 new queries attending to 45 keys: query i sees keys up to i + 25 when causal.
    check(*qkv(2, 20, 45, 4, 2, 32), causal, deterministic=deterministic)


def test_attention_of_views_into_one_fused_qkv_projection():
    fused = randn(2, 37, 10, 32)  # 6 q, 2 k and 2 v heads side by side in each token's row
    q, k, v = fused[:, :, :6], fused[:, :, 6:8], fused[:, :, 8:]
    assert not q.is_contiguous()
    check(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", [80, 90, 120])
def test_attention_with_each_gpu_launch_config(arch, head_dim, monkeypatch):
    # The interpreter runs the tiles the GPUs use (128-row blocks), so their causal and tail
    # logic is tested here too, not only the interpreter's small tiles.
    target = runtime.chip_target(arch)
    monkeypatch.setattr(runtime, "target", lambda device: target)
    assert attention_module.launch_config(head_dim, target, torch.bfloat16).fwd.block_m == 128
    dtype = DTYPES[0]  # bf16 on a GPU
    if dtype == torch.float32:
        # The interpreter computes in fp32 whatever the tiles: give fp32 inputs the bf16 tiles.
        bf16_tiles = attention_module.launch_config
        monkeypatch.setattr(
            attention_module, "launch_config",
            lambda hd, t, dtype: bf16_tiles(hd, t, torch.bfloat16),
        )  # fmt: skip
    check(*qkv(1, 150, 150, 4, 2, head_dim, dtype), causal=True, dtype=dtype)


def test_forward_tiles_follow_the_chips_shared_memory_not_its_arch_number():
    # sm_120 (consumer Blackwell) is a later arch than sm_90 but has 99 KB per block, not 227.
    tiles = {arch: attention_module.launch_config(128, runtime.chip_target(arch),
                                                  torch.bfloat16).fwd
             for arch in (80, 90, 120)}  # fmt: skip
    assert (tiles[90].block_m, tiles[90].block_n) == (128, 128)
    assert tiles[120] == tiles[80] and tiles[120].block_n == 64


def test_deterministic_attention_backward_is_bit_identical():
    q, k, v = qkv(1, 70, 70, 4, 1, 32)

    def run():
        return forward_backward(
            lambda q, k, v: kernels.attention(q, k, v, deterministic=True), [q, k, v]
        )

    first, second = run(), run()
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert torch.equal(a, b)


def test_attention_first_query_attends_only_to_first_key_when_causal():
    q, k, v = qkv(1, 33, 33, 2, 1, 16)
    out = kernels.attention(q, k, v, causal=True)
    assert_close(out[:, 0], v[:, 0].expand(1, 2, 16), 1e-6, "first row")


def test_attention_rejects_unsupported_head_dim():
    with pytest.raises(ValueError, match=r"head_dim 96 must be one of \(16, 32, 64, 128\)"):
        kernels.attention(*qkv(1, 8, 8, 2, 2, 96))


def test_attention_rejects_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match="n_heads divisible by n_kv_heads"):
        kernels.attention(*qkv(1, 8, 8, 6, 4, 32))

