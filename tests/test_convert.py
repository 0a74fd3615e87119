"""Weight conversion: Hugging Face and Meta formats round-trip exactly and give the same logits."""

import json

import pytest
import torch
import transformers

from llamatrain import convert
from llamatrain.config import ModelConfig
from llamatrain.model import Transformer


def gqa_config(**kw) -> ModelConfig:
    base = dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=101, multiple_of=32,
                max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("cfg", [gqa_config(), gqa_config(n_kv_heads=6, ffn_dim_multiplier=1.3)])
def test_logits_equal_transformers_llama_loaded_through_to_hf_state_dict(cfg):
    model = Transformer(cfg, seed=7).eval()
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**convert.hf_config(cfg)))
    missing, unexpected = hf_model.load_state_dict(
        convert.to_hf_state_dict(model.state_dict(), cfg), strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing)
    hf_model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_hf_round_trip_is_exact():
    cfg = gqa_config()
    sd = Transformer(cfg, seed=1).state_dict()
    back = convert.from_hf_state_dict(convert.to_hf_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_hf_files_round_trip_and_config_recovers_the_model(tmp_path):
    cfg = gqa_config(ffn_dim_multiplier=1.3)
    sd = Transformer(cfg, seed=2).state_dict()
    convert.save_hf(sd, cfg, tmp_path, dtype=torch.float32)
    back, back_cfg = convert.load_hf(tmp_path)
    assert back_cfg.ffn_hidden == cfg.ffn_hidden and back_cfg.n_kv_heads == 2
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_key_value_heads == 2


@pytest.mark.parametrize("num_shards", [1, 2])
def test_meta_files_round_trip_through_model_parallel_shards(tmp_path, num_shards):
    cfg = gqa_config(vocab_size=102)
    sd = Transformer(cfg, seed=3).state_dict()
    convert.save_meta(sd, cfg, tmp_path, num_shards=num_shards, dtype=torch.float32)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == num_shards
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and "ffn_dim_multiplier" not in params
    back, back_cfg = convert.load_meta(tmp_path)
    assert back_cfg == cfg
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_meta_checkpoint_loads_unchanged_into_the_model():
    cfg = gqa_config()
    sd = Transformer(cfg, seed=4).state_dict()
    (shard,) = convert.to_meta_state_dicts(sd, cfg)
    model = Transformer(cfg, seed=5)
    model.load_state_dict(shard)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_wrong_config_for_checkpoint_names_the_mismatch():
    sd = Transformer(gqa_config(), seed=1).state_dict()
    with pytest.raises(ValueError, match="missing"):
        convert.to_hf_state_dict(sd, gqa_config(n_layers=3))
