"""Weights in and out: Hugging Face (safetensors + config.json) and Meta (consolidated.*.pth +
params.json) to and from llamatrain's state dict, whose names are Meta's.

Rotary: llamatrain and Meta rotate adjacent pairs (2i, 2i+1); Hugging Face rotates halves
(i, i + d/2). Exporting to Hugging Face permutes the rows of wq and wk within each head so that the
two conventions give the same attention scores; importing undoes it. Meta's model-parallel
checkpoints (13B: 2 files, 70B: 8) are split along the dimension each layer is parallel in, and
merged on import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llamatrain.config import ModelConfig
from llamatrain.data.hf_tokenizer import save_hf_tokenizer
from llamatrain.data.tokenizer import Tokenizer, load_tokenizer

StateDict = dict[str, torch.Tensor]

# llamatrain/Meta name -> Hugging Face name, per layer ({} is the layer index).
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Meta model-parallel split dimension of each weight (None: replicated in every shard).
_META_SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}


def _permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Adjacent-pair rows (per head) -> half-split rows, as HF's rotate_half expects."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _check_keys(state_dict: StateDict, expected: set[str], what: str) -> None:
    missing, extra = expected - set(state_dict), set(state_dict) - expected
    if missing or extra:
        raise ValueError(
            f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
            " (does the model config match the checkpoint?)"
        )


def _expected_names(cfg: ModelConfig) -> set[str]:
    layer = {f"layers.{i}.{name}" for i in range(cfg.n_layers) for name in _HF_LAYER}
    return layer | set(_HF_TOP)


def to_hf_state_dict(state_dict: StateDict, model_config: ModelConfig) -> StateDict:
    """llamatrain (Meta-named) weights -> the state dict of transformers' LlamaForCausalLM."""
    _check_keys(state_dict, _expected_names(model_config), "llamatrain state dict")
    out: StateDict = {}
    for name, tensor in state_dict.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = tensor
            continue
        layer, rest = _LAYER_RE.match(name).groups()
        if rest == "attention.wq.weight":
            tensor = _permute_to_hf(tensor, model_config.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _permute_to_hf(tensor, model_config.n_kv_heads)
        out[f"model.layers.{layer}.{_HF_LAYER[rest]}"] = tensor
    return out


def from_hf_state_dict(hf_state_dict: StateDict, model_config: ModelConfig) -> StateDict:
    """The state dict of transformers' LlamaForCausalLM -> llamatrain (Meta-named) weights."""
    top = {hf: ours for ours, hf in _HF_TOP.items()}
    layer_names = {hf: ours for ours, hf in _HF_LAYER.items()}
    # Buffers some transformers versions save (rotary inv_freq) carry no weights.
    hf_state_dict = {
        k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")
    }
    out: StateDict = {}
    for name, tensor in hf_state_dict.items():
        if name in top:
            out[top[name]] = tensor
            continue
        match = _HF_LAYER_RE.match(name)
        if match is None or match.group(2) not in layer_names:
            raise ValueError(f"Hugging Face state dict: unexpected weight {name!r}")
        layer, rest = match.groups()
        ours = layer_names[rest]
        if ours == "attention.wq.weight":
            tensor = _permute_from_hf(tensor, model_config.n_heads)
        elif ours == "attention.wk.weight":
            tensor = _permute_from_hf(tensor, model_config.n_kv_heads)
        out[f"layers.{layer}.{ours}"] = tensor
    _check_keys(out, _expected_names(model_config), "Hugging Face state dict")
    return out


def hf_config(model_config: ModelConfig) -> dict:
    """Keyword arguments of a transformers LlamaConfig for this model."""
    c = model_config
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json; the FFN size is matched by multiple_of."""
    rope_theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta")
    cfg = ModelConfig(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta or 10000.0),
        max_seq_len=config.get("max_position_embeddings", 4096),
    )
    return _fit_ffn(cfg, config["intermediate_size"])


def _fit_ffn(cfg: ModelConfig, hidden: int) -> ModelConfig:
    """Find multiple_of / ffn_dim_multiplier that reproduce an FFN hidden size."""
    for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8, 1):
        cfg.multiple_of, cfg.ffn_dim_multiplier = multiple_of, 1.0
        if cfg.ffn_hidden == hidden:
            return cfg
    cfg.multiple_of = 1
    cfg.ffn_dim_multiplier = hidden / int(2 * 4 * cfg.dim / 3)
    while cfg.ffn_hidden != hidden:  # float rounding: nudge until int() lands on hidden
        cfg.ffn_dim_multiplier *= 1 + 1e-9 * (1 if cfg.ffn_hidden < hidden else -1)
    return cfg


def meta_params(model_config: ModelConfig) -> dict:
    """Meta's params.json for this model."""
    c = model_config
    params = {
        "dim": c.dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size,
        "multiple_of": c.multiple_of,
        "norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_seq_len": c.max_seq_len,
    }
    if c.ffn_dim_multiplier != 1.0:
        params["ffn_dim_multiplier"] = c.ffn_dim_multiplier
    return params


def model_config_from_meta(params: dict, vocab_size: int) -> ModelConfig:
    """A ModelConfig from Meta's params.json (whose vocab_size is -1 in Llama 2's release)."""
    return ModelConfig(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier") or 1.0,
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_seq_len=params.get("max_seq_len", 4096),
    )


def _split_dim(name: str) -> int | None:
    match = _LAYER_RE.match(name)
    return _META_SPLIT_DIM[match.group(2) if match else name]


def to_meta_state_dicts(
    state_dict: StateDict, model_config: ModelConfig, num_shards: int = 1
) -> list[StateDict]:
    """Meta's consolidated.NN.pth contents, split for `num_shards`-way model parallelism."""
    _check_keys(state_dict, _expected_names(model_config), "llamatrain state dict")
    shards: list[StateDict] = [{} for _ in range(num_shards)]
    for name, tensor in state_dict.items():
        dim = _split_dim(name)
        if dim is not None and tensor.shape[dim] % num_shards:
            raise ValueError(f"{name} of shape {tuple(tensor.shape)}: not divisible into "
                             f"{num_shards} shards")
        pieces = [tensor] * num_shards if dim is None else tensor.chunk(num_shards, dim)
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone()
    return shards


def from_meta_state_dicts(shards: list[StateDict], model_config: ModelConfig) -> StateDict:
    """Merge Meta's model-parallel shards into one llamatrain state dict."""
    out: StateDict = {}
    for name in shards[0]:
        if name == "rope.freqs":  # Llama 1 checkpoints store the rotary table; we recompute it
            continue
        dim = _split_dim(name)
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
    _check_keys(out, _expected_names(model_config), "Meta checkpoint")
    return out


# ---------------------------------------------------------------------------------------------
# Files


def save_hf(state_dict: StateDict, model_config: ModelConfig, out_dir: str | Path,
            dtype: torch.dtype = torch.bfloat16, tokenizer: Tokenizer | None = None) -> Path:
    """Write model.safetensors and config.json that `LlamaForCausalLM.from_pretrained` loads,
    and with a tokenizer, the files `AutoTokenizer.from_pretrained` loads (hf_tokenizer.py)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(state_dict, model_config)
    save_file({k: v.to(dtype).contiguous() for k, v in hf.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "torch_dtype": str(dtype).removeprefix("torch."), **hf_config(model_config)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, max_length=model_config.max_seq_len)
    return out


def load_hf(hf_dir: str | Path) -> tuple[StateDict, ModelConfig]:
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{str(hf_dir)!r}: no config.json (expected a Hugging Face model dir)")
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        hf: StateDict = {}
        for f in files:
            hf.update(load_file(f))
    else:
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"{str(hf_dir)!r}: no *.safetensors or pytorch_model*.bin weights")
        hf = {}
        for f in bins:
            hf.update(torch.load(f, map_location="cpu", weights_only=True))
    return from_hf_state_dict(hf, cfg), cfg


def save_meta(state_dict: StateDict, model_config: ModelConfig, out_dir: str | Path,
              num_shards: int = 1, dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = to_meta_state_dicts(state_dict, model_config, num_shards)
    for i, shard in enumerate(shards):
        torch.save({k: v.to(dtype) for k, v in shard.items()}, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(meta_params(model_config), indent=2) + "\n")
    return out


def load_meta(meta_dir: str | Path) -> tuple[StateDict, ModelConfig]:
    meta_dir = Path(meta_dir)
    files = sorted(meta_dir.glob("consolidated.*.pth"))
    if not files or not (meta_dir / "params.json").is_file():
        raise ValueError(f"{str(meta_dir)!r}: expected params.json and consolidated.*.pth")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    vocab = shards[0]["output.weight"].shape[0] * len(files)
    cfg = model_config_from_meta(json.loads((meta_dir / "params.json").read_text()), vocab)
    return from_meta_state_dicts(shards, cfg), cfg



# ---------------------------------------------------------------------------------------------
# Command line

USAGE = """usage:
  python -m llamatrain.convert to-hf RUN_DIR/checkpoints/step-N OUT_DIR [--dtype bf16|fp32]
                                     [--tokenizer MODEL]
  python -m llamatrain.convert from-hf HF_DIR OUT_DIR
  python -m llamatrain.convert from-meta META_DIR OUT_DIR
to-hf writes weights, config and the tokenizer (RUN_DIR/tokenizer.model unless --tokenizer names
one) as tokenizer.json, checked to encode exactly as SentencePiece does.
from-hf and from-meta write a weights-only checkpoint for `--checkpoint.init_from=OUT_DIR`, with
the [model] section to train it with in OUT_DIR/model.toml."""


def _model_toml(cfg: ModelConfig) -> str:
    from llamatrain.config import Config, to_toml

    text = to_toml(Config(model=cfg))
    section = text.split("[model]\n", 1)[1].split("\n\n", 1)[0]
    return f"[model]\n{section}\n"


def checkpoint_to_state_dict(step_dir: str | Path) -> tuple[StateDict, ModelConfig]:
    """Full weights of a training checkpoint, read in one process, with the run's model config."""
    from llamatrain.checkpoint.dcp import read_model_weights
    from llamatrain.checkpoint.rundir import RunDir
    from llamatrain.config import load_config
    from llamatrain.model import Transformer

    step_dir = Path(step_dir)
    config = RunDir.of_checkpoint(step_dir).config
    if not (step_dir / ".metadata").is_file() or not config.is_file():
        raise ValueError(f"{str(step_dir)!r}: expected RUN_DIR/checkpoints/step-N of a run "
                         "(with RUN_DIR/config.toml)")
    cfg = load_config(config).model
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state_dict = model.state_dict()
    read_model_weights(step_dir, state_dict)
    return state_dict, cfg


def _write_init_checkpoint(state_dict: StateDict, cfg: ModelConfig, out: Path,
                           source: Path) -> None:
    from llamatrain.checkpoint.dcp import save_model_weights

    save_model_weights({k: v.float() for k, v in state_dict.items()}, out)
    (out / "model.toml").write_text(_model_toml(cfg))
    if (source / "tokenizer.model").is_file():
        (out / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())


def run_tokenizer(step_dir: str | Path, override: str = "") -> Tokenizer:
    """The SentencePiece model of the run a checkpoint belongs to (the trainer keeps a copy in
    RUN_DIR/tokenizer.model), or the one `override` names."""
    from llamatrain.checkpoint.rundir import RunDir

    path = Path(override) if override else RunDir.of_checkpoint(step_dir).tokenizer
    if not path.is_file():
        raise ValueError(f"{str(path)!r}: no tokenizer.model (runs from before the trainer kept "
                         "one: pass --tokenizer DATA_DIR/tokenizer.model)")
    return load_tokenizer(path)


def _pop_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    if name not in args:
        return None, args
    i = args.index(name)
    if i + 1 >= len(args):
        raise ValueError(f"{name}: expected a value")
    return args[i + 1], args[:i] + args[i + 2 :]


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    tokenizer_path, args = _pop_option(list(args), "--tokenizer")
    dtype = torch.bfloat16
    if "--dtype" in args:
        i = args.index("--dtype")
        name = args[i + 1] if i + 1 < len(args) else ""
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
        if name not in dtypes:
            raise ValueError(f"--dtype = {name!r}: expected one of {', '.join(dtypes)}")
        dtype, args = dtypes[name], args[:i] + args[i + 2 :]
    if len(args) != 3 or args[0] not in ("to-hf", "from-hf", "from-meta"):
        print(USAGE, file=sys.stderr)
        return 2
    command, src, out = args[0], Path(args[1]), Path(args[2])
    if command == "to-hf":
        state_dict, cfg = checkpoint_to_state_dict(src)
        tokenizer = run_tokenizer(src, tokenizer_path or "")
        save_hf(state_dict, cfg, out, dtype=dtype, tokenizer=tokenizer)
    else:
        state_dict, cfg = load_hf(src) if command == "from-hf" else load_meta(src)
        _write_init_checkpoint(state_dict, cfg, out, src)
    n = sum(t.numel() for t in state_dict.values())
    print(f"{command}: {n:,} parameters -> {out}")
    return 0


if __name__ == "__main__":
    from llamatrain.config import run_cli

    run_cli(main)
