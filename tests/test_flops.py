"""flops.py: parameter counts without a model, FLOPs per token, device peaks and MFU."""

from pathlib import Path

import pytest
import torch

from llamatrain import flops
from llamatrain.config import ModelConfig, load_config
from llamatrain.model import Transformer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def paper(name: str) -> ModelConfig:
    return load_config(CONFIGS / f"llama2_{name}.toml").model


@pytest.mark.parametrize(
    ("name", "expected"),
    [("7b", 6_738_415_616), ("13b", 13_015_864_320), ("34b", 33_743_970_304),
     ("70b", 68_976_648_192)],
)
def test_num_params_is_exact_for_the_paper_configs(name, expected):
    assert flops.num_params(paper(name)) == expected


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=100, multiple_of=32),
        ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=77, multiple_of=64,
                    ffn_dim_multiplier=1.3),
    ],
)
def test_num_params_equals_the_built_model(cfg):
    with torch.device("meta"):
        model = Transformer(cfg)
    assert flops.num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_is_6n_without_input_embedding_plus_attention_term():
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=100, multiple_of=32)
    n = flops.num_params(cfg)
    seq = 128
    assert flops.flops_per_token(cfg, seq) == 6 * (n - 100 * 64) + 12 * 3 * 8 * 8 * seq
    # The attention term grows linearly with the context: 12 * L * H * Q per extra token.
    extra = flops.flops_per_token(cfg, 2 * seq) - flops.flops_per_token(cfg, seq)
    assert extra == 12 * 3 * 64 * seq


def test_paper_runs_imply_about_45_percent_mfu_on_a100():
    # Table 2: 2T tokens in 184,320 (7B) and 1,720,320 (70B) A100-hours.
    tps_7b = 2e12 / (184_320 * 3600)
    tps_70b = 2e12 / (1_720_320 * 3600)
    mfu_7b = flops.mfu(tps_7b, paper("7b"), 4096, "NVIDIA A100-SXM4-80GB", "bf16")
    mfu_70b = flops.mfu(tps_70b, paper("70b"), 4096, "NVIDIA A100-SXM4-80GB", "bf16")
    assert 0.44 < mfu_7b < 0.45
    assert 0.455 < mfu_70b < 0.465


def test_mfu_is_none_without_a_known_peak():
    assert flops.mfu(1000.0, paper("7b"), 4096, "cpu") is None
    # 1,000 tokens/s on an H100 is 1000 * flops_per_token / 989e12.
    expected = 1000.0 * flops.flops_per_token(paper("7b"), 4096) / 989e12
    assert flops.mfu(1000.0, paper("7b"), 4096, "NVIDIA H100 80GB HBM3") == pytest.approx(expected)
