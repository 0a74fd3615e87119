"""The Llama 2 model: exact parameter counts, Meta's rotary convention, world-size-free init."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from llamatrain import ops
from llamatrain.config import ModelConfig, load_config
from llamatrain.model import Transformer, init_rows, num_params, rope_tables


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama2_7b", 6_738_415_616),
        ("llama2_13b", 13_015_864_320),
        ("llama2_34b", 33_743_970_304),
        ("llama2_70b", 68_976_648_192),
    ],
)
def test_paper_configs_have_exact_parameter_counts_on_meta_device(name, expected):
    cfg = load_config(f"configs/{name}.toml")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert num_params(model) == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_ffn_hidden_follows_metas_rule():
    hidden = {n: load_config(f"configs/llama2_{n}.toml").model.ffn_hidden
              for n in ("7b", "13b", "34b", "70b")}
    assert hidden == {"7b": 11008, "13b": 13824, "34b": 22016, "70b": 28672}


def test_rotary_matches_metas_complex_number_reference():
    torch.manual_seed(0)
    head_dim, seq = 16, 11
    q, k = torch.randn(2, seq, 6, head_dim), torch.randn(2, seq, 2, head_dim)
    cos, sin = rope_tables(head_dim, 32, 10000.0)
    # Meta's llama/model.py: freqs_cis = polar(1, t * theta^(-2i/d)); x viewed as complex pairs.
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq), freqs))

    def meta_rotate(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    q_out, k_out = ops.rotary(q, k, cos[:seq], sin[:seq])
    torch.testing.assert_close(q_out, meta_rotate(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, meta_rotate(k), atol=1e-5, rtol=1e-5)


def test_rotary_preserves_norms_and_rotates_position_zero_by_nothing():
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 1, 8)
    cos, sin = rope_tables(8, 5, 10000.0)
    q_out, _ = ops.rotary(q, k, cos, sin)
    torch.testing.assert_close(q_out[:, 0], q[:, 0])
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1))


def small_config(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                max_seq_len=32)
    return ModelConfig(**(base | kw))


def test_forward_gives_logits_of_batch_seq_vocab_and_is_causal():
    model = Transformer(small_config())
    tokens = torch.randint(0, 97, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, 97)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 97
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_init_is_deterministic_with_documented_stds():
    cfg = small_config(n_layers=8, dim=128, vocab_size=4000)
    a, b = Transformer(cfg, seed=3), Transformer(cfg, seed=3)
    c = Transformer(cfg, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(),
                                  strict=True):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
    assert abs(a.tok_embeddings.weight.std().item() - 0.02) < 0.001
    assert abs(a.layers["0"].attention.wo.weight.std().item() - 0.02 / 4) < 0.0005


def test_init_rows_of_any_slice_equal_the_same_rows_of_the_whole():
    shape = torch.Size((300, 7))
    whole = init_rows("layers.0.attention.wq.weight", shape, 0, 300, seed=1, n_layers=2)
    for start, stop in [(0, 150), (150, 300), (37, 201), (299, 300), (64, 128)]:
        part = init_rows("layers.0.attention.wq.weight", shape, start, stop, seed=1, n_layers=2)
        assert torch.equal(part, whole[start:stop])


def test_fused_residual_and_loss_equal_the_unfused_model_on_the_same_weights():
    cfg = small_config()
    fused, unfused = Transformer(cfg, seed=5), Transformer(cfg, seed=5, fuse_residual=False)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = torch.randint(0, cfg.vocab_size, (2, 12))
    targets[0, :4] = -1
    logits = unfused(tokens)
    torch.testing.assert_close(fused(tokens), logits, rtol=0, atol=0)
    loss = fused(tokens, targets, ignore_index=-1)
    ref = ops.cross_entropy_ref(logits, targets, ignore_index=-1)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert fused.state_dict().keys() == unfused.state_dict().keys()


def test_fused_loss_refuses_a_tensor_parallel_output_projection():
    # Run apart: it needs a process group (one gloo rank) for the DTensor mesh.
    code = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from llamatrain.config import ModelConfig
from llamatrain.model import Transformer
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16,
                  max_seq_len=8)
model = parallelize_module(Transformer(cfg), init_device_mesh("cpu", (1,)),
                           {"output": ColwiseParallel(use_local_output=False)})
tokens = torch.randint(0, 64, (1, 8))
print(tuple(model(tokens).shape))
try:
    model(tokens, tokens)
except ValueError as e:
    print(e)
dist.destroy_process_group()
"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PORT=str(port)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    shape, message = done.stdout.strip().splitlines()[-2:]
    assert shape == "(1, 8, 64)"
    assert message.startswith("kernels.fused_loss = true needs an output projection that is not")
