"""Weight conversion: Hugging Face and Meta formats round-trip exactly and give the same logits."""

import contextlib
import json
import os
import shutil
import signal

import pytest
import torch
import transformers

from llamatrain import convert
from llamatrain.config import MAX_FFN_HIDDEN, ModelConfig
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


# ------------------------------------------------------------------ imported files as untrusted


@contextlib.contextmanager
def time_bound(seconds: int):
    """Fail, rather than hang, when the body runs longer than `seconds`."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hf_dir(path, **config_changes):
    cfg = gqa_config()
    convert.save_hf(Transformer(cfg, seed=1).state_dict(), cfg, path, dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | config_changes))
    return path


def test_a_config_json_whose_ffn_size_fits_no_rule_ends_at_once(tmp_path):
    path = hf_dir(tmp_path / "hf", intermediate_size=501462895223896)
    with time_bound(10), pytest.raises(ValueError, match=r"config.json: intermediate_size = "
                                       r"501462895223896: expected an integer from 1 to "
                                       r"1,048,576 \(config.MAX_FFN_HIDDEN\)$"):
        convert.load_hf(path)
    # Within the bound, the search for the FFN rule ends too: found, or one line.
    with time_bound(10):
        for hidden in (1, 255, 257, 1000, 4097, 65537, 999_983, MAX_FFN_HIDDEN):
            try:
                assert convert._fit_ffn(gqa_config(dim=4096), hidden).ffn_hidden == hidden
            except ValueError as e:
                assert f"intermediate_size = {hidden}: no multiple_of" in str(e)


def test_sizes_of_the_config_are_checked_against_the_weights_before_reading_them(tmp_path,
                                                                                monkeypatch):
    import safetensors.torch

    path = hf_dir(tmp_path / "hf", hidden_size=16320, num_attention_heads=6, head_dim=2720)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a: pytest.fail("weights read"))
    with pytest.raises(ValueError, match=r"has shape \[\d+(, 96)?\], but config.json describes "
                       r"\[.*16320.*\]: the config does not belong to these weights$"):
        convert.load_hf(path)
    for key, value, allowed in (("num_hidden_layers", 10**9, "1,024"),
                                ("vocab_size", 10**12, "1,048,576")):
        (path / "config.json").write_text(json.dumps(convert.hf_config(gqa_config()) |
                                                     {key: value}))
        with pytest.raises(ValueError, match=rf"config.json: {key} = {value}: expected an "
                           rf"integer from 1 to {allowed}"):
            convert.load_hf(path)


def test_meta_shards_that_are_stray_or_do_not_match_are_refused(tmp_path):
    cfg = gqa_config(vocab_size=102)
    convert.save_meta(Transformer(cfg, seed=3).state_dict(), cfg, tmp_path, num_shards=2,
                      dtype=torch.float32)
    shutil.copy(tmp_path / "consolidated.01.pth", tmp_path / "consolidated.05.pth")
    with pytest.raises(ValueError, match=r"the shards of 3-way model parallelism are "
                       r"consolidated.00.pth to consolidated.02.pth, but it holds "
                       r"consolidated.05.pth: remove the stray file"):
        convert.load_meta(tmp_path)
    (tmp_path / "consolidated.05.pth").unlink()
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = torch.ones(95)
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated.01.pth': norm.weight has shape \[95\], "
                       r"consolidated.00.pth \[96\]: the shards are not of one checkpoint"):
        convert.load_meta(tmp_path)
    del shard["norm.weight"]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"holds other weights than consolidated.00.pth"):
        convert.load_meta(tmp_path)


def test_params_json_that_does_not_describe_the_shards_is_refused(tmp_path):
    cfg = gqa_config(vocab_size=102)
    convert.save_meta(Transformer(cfg, seed=3).state_dict(), cfg, tmp_path, dtype=torch.float32)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {"n_layers": 3}))
    with pytest.raises(ValueError, match=r"missing \['layers.2.attention.wk.weight'"):
        convert.load_meta(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(params | {"dim": 192}))
    with pytest.raises(ValueError, match=r"has shape \[.*\], but params.json describes"):
        convert.load_meta(tmp_path)


def test_to_hf_writes_only_into_an_empty_directory_or_over_its_own_export(tmp_path):
    cfg = gqa_config()
    sd = Transformer(cfg, seed=1).state_dict()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(ValueError, match=r"is not empty and holds files to-hf did not write "
                       r"\(model-00001-of-00002.safetensors\): give a new or empty directory$"):
        convert.save_hf(sd, cfg, out)
    (out / "model-00001-of-00002.safetensors").unlink()
    (out / "tokenizer.json").write_text("{}")  # a previous export's: replaced, not left beside
    convert.save_hf(sd, cfg, out, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    back, _ = convert.load_hf(out)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


class Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_weights_that_are_not_plain_tensors_are_one_line_saying_what_to_do(tmp_path):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(convert.hf_config(gqa_config())))
    torch.save({"model.norm.weight": Payload(tmp_path / "pwned")}, path / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        convert.main(["from-hf", str(path), str(tmp_path / "out")])
    assert not (tmp_path / "pwned").exists() and "\n" not in str(info.value)
    assert str(info.value).startswith(f"'{path / 'pytorch_model.bin'}': pickle that is not plain "
                                      "tensors (torch.load with weights_only=True refused it: ")
    assert str(info.value).endswith(
        "llamatrain runs no code from disk: convert the weights to safetensors where they were "
        "made (e.g. model.save_pretrained(DIR, safe_serialization=True)) and run from-hf on DIR")


def test_a_checkpoint_without_checksums_is_refused_unless_asked_and_then_loudly(tmp_path,
                                                                               capsys):
    from llamatrain.checkpoint.dcp import save_model_weights
    from llamatrain.config import Config, TrainConfig, to_toml

    cfg = gqa_config()
    sd = Transformer(cfg, seed=1).state_dict()
    step = tmp_path / "run/checkpoints/step-1"
    save_model_weights(sd, step)
    (tmp_path / "run/config.toml").write_text(to_toml(Config(model=cfg,
                                                             train=TrainConfig(seq_len=64))))
    back, _ = convert.checkpoint_to_state_dict(step)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    (step / "notes.txt").write_text("planted")
    with pytest.raises(ValueError, match=r"step-1': notes.txt has no checksum in trainer.json$"):
        convert.checkpoint_to_state_dict(step)
    (step / "notes.txt").unlink()
    (step / "trainer.json").unlink()
    with pytest.raises(ValueError, match=r"^checkpoint = '.*step-1': it has no trainer.json, so "
                       r"its files cannot be verified .*; if you trust where it came from, pass "
                       r"--no-verify$"):
        convert.main(["to-hf", str(step), str(tmp_path / "hf")])
    capsys.readouterr()
    back, _ = convert.checkpoint_to_state_dict(step, verify=False)
    assert "WARNING: checkpoint = " in capsys.readouterr().out
    assert all(torch.equal(back[k], sd[k]) for k in sd)
