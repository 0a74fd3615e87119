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
import math
import pickle
import re
from pathlib import Path

import torch

from llamatrain.config import MAX_FFN_HIDDEN, ModelConfig, validate_model
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


# config.json's name for each ModelConfig field, for errors that name what the user sees.
_HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
             "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
             "max_seq_len": "max_position_embeddings", "multiple_of": "intermediate_size",
             "ffn_dim_multiplier": "intermediate_size"}


def _value(config: dict, key: str, kind: type, source: str, default=None):
    """config[key] as `kind` (an int or a number), or `default` when absent and allowed."""
    value = config.get(key)
    value = default if value is None else value
    if value is None:
        raise ValueError(f"{source}: {key} is missing")
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{source}: {key} = {value!r}: expected "
                         f"{'an integer' if kind is int else 'a number'}")
    return value


def model_config_from_hf(config: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json, every size checked against
    config.MODEL_LIMITS before anything is allocated; the FFN size is matched by multiple_of."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object")
    rope = config.get("rope_parameters")
    rope_theta = config.get("rope_theta") or (rope.get("rope_theta")
                                              if isinstance(rope, dict) else None)
    heads = _value(config, "num_attention_heads", int, source)
    cfg = ModelConfig(
        dim=_value(config, "hidden_size", int, source),
        n_layers=_value(config, "num_hidden_layers", int, source),
        n_heads=heads,
        n_kv_heads=_value(config, "num_key_value_heads", int, source, heads),
        vocab_size=_value(config, "vocab_size", int, source),
        norm_eps=float(_value(config, "rms_norm_eps", float, source, 1e-5)),
        rope_theta=float(_value({"rope_theta": rope_theta}, "rope_theta", float, source,
                                10000.0)),
        max_seq_len=_value(config, "max_position_embeddings", int, source, 4096),
    )
    validate_model(cfg, prefix=f"{source}: ", names=_HF_NAMES)
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise ValueError(f"{source}: head_dim = {head_dim!r}: llamatrain's attention has "
                         f"hidden_size / num_attention_heads = {cfg.head_dim}")
    hidden = _value(config, "intermediate_size", int, source)
    if not 1 <= hidden <= MAX_FFN_HIDDEN:
        raise ValueError(f"{source}: intermediate_size = {hidden}: expected an integer from 1 to "
                         f"{MAX_FFN_HIDDEN:,} (config.MAX_FFN_HIDDEN)")
    return _fit_ffn(cfg, hidden, source)


def _fit_ffn(cfg: ModelConfig, hidden: int, source: str = "config.json") -> ModelConfig:
    """Find multiple_of / ffn_dim_multiplier that reproduce an FFN hidden size, or say that none
    does."""
    for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8, 1):
        cfg.multiple_of, cfg.ffn_dim_multiplier = multiple_of, 1.0
        if cfg.ffn_hidden == hidden:
            return cfg
    cfg.multiple_of = 1
    base = int(2 * 4 * cfg.dim / 3)
    multiplier = hidden / base
    # With multiple_of 1 the size is int(multiplier * base), which never decreases as the
    # multiplier grows: a few steps of one ulp towards `hidden` land on it, or step over it.
    for _ in range(64):
        cfg.ffn_dim_multiplier = multiplier
        if cfg.ffn_hidden == hidden:
            return cfg
        multiplier = math.nextafter(multiplier, math.inf if cfg.ffn_hidden < hidden else 0.0)
    raise ValueError(f"{source}: intermediate_size = {hidden}: no multiple_of and "
                     f"ffn_dim_multiplier of the Llama FFN rule give it for hidden_size = "
                     f"{cfg.dim}")


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


def model_config_from_meta(params: dict, vocab_size: int,
                          source: str = "params.json") -> ModelConfig:
    """A ModelConfig from Meta's params.json (whose vocab_size is -1 in Llama 2's release), every
    size checked against config.MODEL_LIMITS."""
    if not isinstance(params, dict):
        raise ValueError(f"{source}: expected a JSON object")
    heads = _value(params, "n_heads", int, source)
    vocab = _value(params, "vocab_size", int, source, -1)
    cfg = ModelConfig(
        dim=_value(params, "dim", int, source),
        n_layers=_value(params, "n_layers", int, source),
        n_heads=heads,
        n_kv_heads=_value(params, "n_kv_heads", int, source, heads),
        vocab_size=vocab if vocab > 0 else vocab_size,
        multiple_of=_value(params, "multiple_of", int, source, 256),
        ffn_dim_multiplier=float(_value(params, "ffn_dim_multiplier", float, source, 1.0)),
        norm_eps=float(_value(params, "norm_eps", float, source, 1e-5)),
        rope_theta=float(_value(params, "rope_theta", float, source, 10000.0)),
        max_seq_len=_value(params, "max_seq_len", int, source, 4096),
    )
    return validate_model(cfg, prefix=f"{source}: ")


def expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's shape for this config (llamatrain/Meta names), from the model itself built on
    the meta device: nothing is allocated."""
    from llamatrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(shapes: dict[str, tuple[int, ...]], model_config: ModelConfig, what: str,
                 describes: str, names: dict[str, str] | None = None) -> None:
    """The weights' shapes (llamatrain names; `names` gives each one's name in the files) must be
    the ones `describes` (the config file) gives, before any weight is read or allocated."""
    expected = expected_shapes(model_config)
    _check_keys(shapes, set(expected), what)
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            shown = (names or {}).get(name, name)
            raise ValueError(f"{what}: {shown} has shape {list(shape)}, but {describes} describes "
                             f"{list(expected[name])}: the config does not belong to these "
                             "weights")


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


# What `save_hf` writes: a directory that holds these and nothing else is a previous export.
HF_EXPORT_FILES = frozenset({"model.safetensors", "config.json", "tokenizer.json",
                             "tokenizer_config.json", "special_tokens_map.json",
                             "tokenizer.model"})
# What `from-hf` / `from-meta` write (a weights-only DCP checkpoint and model.toml).
INIT_FILES = frozenset({".metadata", "model.toml", "tokenizer.model", "trainer.json"})


def _is_init_file(name: str) -> bool:
    return name in INIT_FILES or re.fullmatch(r"__\d+_\d+\.distcp", name) is not None


def clear_output_dir(out: Path, ours, what: str, *, remove: bool) -> None:
    """An output directory must be new, empty, or hold only what a previous `what` wrote (plain
    files `ours` accepts): those are removed when `remove`, and nothing else ever is. Anything
    else there is a ValueError: it would be left beside the new files, and could win over them
    when the directory is loaded (a stale *.safetensors does)."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"{str(out)!r}: not a directory; give a new or empty directory")
    entries = list(out.iterdir())
    foreign = sorted(p.name for p in entries
                     if not ours(p.name) or p.is_symlink() or not p.is_file())
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ValueError(f"{str(out)!r} is not empty and holds files {what} did not write "
                         f"({', '.join(foreign[:5])}{more}): give a new or empty directory")
    if remove:
        for p in entries:
            p.unlink()


def save_hf(state_dict: StateDict, model_config: ModelConfig, out_dir: str | Path,
            dtype: torch.dtype = torch.bfloat16, tokenizer: Tokenizer | None = None) -> Path:
    """Write model.safetensors and config.json that `LlamaForCausalLM.from_pretrained` loads,
    and with a tokenizer, the files `AutoTokenizer.from_pretrained` loads (hf_tokenizer.py), into
    a new or empty directory, or over a previous export (whose files alone are removed)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    hf = to_hf_state_dict(state_dict, model_config)
    clear_output_dir(out, HF_EXPORT_FILES.__contains__, "to-hf", remove=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in hf.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "torch_dtype": str(dtype).removeprefix("torch."), **hf_config(model_config)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, max_length=model_config.max_seq_len)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r}: not readable JSON ({e})") from None


def _load_pickled(path: Path, fix: str) -> dict:
    """torch.load(weights_only=True) of a checkpoint file: plain tensors only, or one line."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(path)!r}: pickle that is not plain tensors (torch.load with "
                         f"weights_only=True refused it: {reason}); llamatrain runs no code "
                         f"from disk: {fix}") from None
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ValueError(f"{str(path)!r}: not a dict of named tensors; {fix}")
    return loaded


HF_PICKLE_FIX = ("convert the weights to safetensors where they were made (e.g. "
                 "model.save_pretrained(DIR, safe_serialization=True)) and run from-hf on DIR")


def load_hf(hf_dir: str | Path) -> tuple[StateDict, ModelConfig]:
    """A Hugging Face directory's weights and config: the config's sizes are checked against
    config.MODEL_LIMITS and against the weights' shapes (read from the file headers) before any
    weight is read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{str(hf_dir)!r}: no config.json (expected a Hugging Face model dir)")
    cfg = model_config_from_hf(_read_json(hf_dir / "config.json"),
                               source=str(hf_dir / "config.json"))
    files = sorted(hf_dir.glob("*.safetensors"))
    ours = {hf: name for name, hf in _HF_TOP.items()}
    ours.update({f"model.layers.{i}.{hf}": f"layers.{i}.{name}" for i in range(cfg.n_layers)
                 for name, hf in _HF_LAYER.items()})
    if not files:
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"{str(hf_dir)!r}: no *.safetensors or pytorch_model*.bin weights")
        hf = {}
        for f in bins:
            hf.update(_load_pickled(f, HF_PICKLE_FIX))
        shapes = {ours.get(k, k): tuple(v.shape) for k, v in hf.items()
                  if not k.endswith("rotary_emb.inv_freq")}
        check_shapes(shapes, cfg, str(hf_dir), "config.json", {v: k for k, v in ours.items()})
        return from_hf_state_dict(hf, cfg), cfg
    shapes, where = {}, {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for k in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                    if k in where:
                        raise ValueError(f"{str(hf_dir)!r}: {k} is in both {where[k]} and "
                                         f"{f.name}: remove the stale file")
                    where[k] = f.name
                    if not k.endswith("rotary_emb.inv_freq"):
                        shapes[ours.get(k, k)] = tuple(handle.get_slice(k).get_shape())
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{str(f)!r}: not a readable safetensors file ({e})") from None
    check_shapes(shapes, cfg, str(hf_dir), "config.json", {v: k for k, v in ours.items()})
    hf: StateDict = {}
    for f in files:
        hf.update(load_file(f))
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


META_PICKLE_FIX = "use Meta's released files, or convert these where they were made"


def load_meta(meta_dir: str | Path) -> tuple[StateDict, ModelConfig]:
    """A Meta directory's weights and config: consolidated.00.pth to consolidated.NN.pth, one per
    model-parallel rank and nothing stray, each the same weights with the same shapes, whose
    merged shapes are the ones params.json describes; checked before any tensor is merged
    (the files are memory-mapped, not read)."""
    meta_dir = Path(meta_dir)
    files = sorted(meta_dir.glob("consolidated.*.pth"))
    if not files or not (meta_dir / "params.json").is_file():
        raise ValueError(f"{str(meta_dir)!r}: expected params.json and consolidated.*.pth")
    wanted = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != wanted:
        stray = sorted({f.name for f in files} - set(wanted)) or [f.name for f in files]
        raise ValueError(f"{str(meta_dir)!r}: the shards of {len(files)}-way model parallelism "
                         f"are {wanted[0]} to {wanted[-1]}, but it holds {', '.join(stray)}: "
                         "remove the stray file(s)")
    shards = [_load_pickled(f, META_PICKLE_FIX) for f in files]
    for f, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))
            raise ValueError(f"{str(f)!r}: holds other weights than {files[0].name} "
                             f"({', '.join(diff[:3])}): the shards are not of one checkpoint")
        for name, tensor in shard.items():
            if tensor.shape != shards[0][name].shape:
                raise ValueError(f"{str(f)!r}: {name} has shape {list(tensor.shape)}, "
                                 f"{files[0].name} {list(shards[0][name].shape)}: the shards are "
                                 "not of one checkpoint")
    if "output.weight" not in shards[0]:
        raise ValueError(f"{str(files[0])!r}: no output.weight (not a Llama checkpoint)")
    vocab = shards[0]["output.weight"].shape[0] * len(files)
    cfg = model_config_from_meta(_read_json(meta_dir / "params.json"), vocab,
                                 source=str(meta_dir / "params.json"))
    shapes = {}
    for name, tensor in shards[0].items():
        if name == "rope.freqs":
            continue
        shape = list(tensor.shape)
        match = _LAYER_RE.match(name)
        dim = _META_SPLIT_DIM.get(match.group(2) if match else name)  # unknown: named below
        if dim is not None and dim < len(shape):
            shape[dim] *= len(files)
        shapes[name] = tuple(shape)
    check_shapes(shapes, cfg, str(meta_dir), "params.json")
    return from_meta_state_dicts(shards, cfg), cfg


# ---------------------------------------------------------------------------------------------
# Command line

USAGE = """usage:
  python -m llamatrain.convert to-hf RUN_DIR/checkpoints/step-N OUT_DIR [--dtype bf16|fp32]
                                     [--tokenizer MODEL] [--no-verify]
  python -m llamatrain.convert from-hf HF_DIR OUT_DIR
  python -m llamatrain.convert from-meta META_DIR OUT_DIR
to-hf writes weights, config and the tokenizer (RUN_DIR/tokenizer.model unless --tokenizer names
one) as tokenizer.json, checked to encode exactly as SentencePiece does. The checkpoint is first
verified against the checksums of its trainer.json; --no-verify also reads one that has none.
from-hf and from-meta write a weights-only checkpoint for `--checkpoint.init_from=OUT_DIR`, with
the [model] section to train it with in OUT_DIR/model.toml and checksums in OUT_DIR/trainer.json;
the sizes in config.json / params.json are checked against the weights' shapes first, and pickle
weights load only as plain tensors (torch.load weights_only).
OUT_DIR must be new, empty, or a previous output of the same command (whose files alone are
replaced)."""


def _model_toml(cfg: ModelConfig) -> str:
    from llamatrain.config import Config, to_toml

    text = to_toml(Config(model=cfg))
    section = text.split("[model]\n", 1)[1].split("\n\n", 1)[0]
    return f"[model]\n{section}\n"


NO_VERIFY = "pass --no-verify"


def checkpoint_to_state_dict(step_dir: str | Path, *, verify: bool = True
                             ) -> tuple[StateDict, ModelConfig]:
    """Full weights of a training checkpoint, verified and read in one process, with the run's
    model config; `verify` False also reads one without checksums (dcp.verify_checkpoint)."""
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
    read_model_weights(step_dir, state_dict, verify=verify, bypass=NO_VERIFY)
    return state_dict, cfg


def _write_init_checkpoint(state_dict: StateDict, cfg: ModelConfig, out: Path,
                           source: Path) -> None:
    from llamatrain.checkpoint.dcp import save_model_weights

    clear_output_dir(out, _is_init_file, "from-hf or from-meta", remove=True)
    files = {"model.toml": _model_toml(cfg).encode()}
    if (source / "tokenizer.model").is_file():
        files["tokenizer.model"] = (source / "tokenizer.model").read_bytes()
    save_model_weights({k: v.float() for k, v in state_dict.items()}, out, files=files,
                       source=str(source))


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

    args = list(sys.argv[1:] if argv is None else argv)
    verify = "--no-verify" not in args
    args = [a for a in args if a != "--no-verify"]
    tokenizer_path, args = _pop_option(args, "--tokenizer")
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
    # Before any weight is read: an output directory that would be written over is one line now.
    if command == "to-hf":
        clear_output_dir(out, HF_EXPORT_FILES.__contains__, "to-hf", remove=False)
    else:
        clear_output_dir(out, _is_init_file, "from-hf or from-meta", remove=False)
    if command == "to-hf":
        state_dict, cfg = checkpoint_to_state_dict(src, verify=verify)
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
