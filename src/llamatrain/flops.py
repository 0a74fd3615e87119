"""Model arithmetic without building a model: parameter count, FLOPs per token and the model FLOPs
utilisation (MFU) that the trainer logs and `carbon project` inverts (peaks from
llamatrain.hardware).

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6N + 12*L*H*Q*T, where N counts
the parameters that take part in matrix multiplies (all but the input embedding table, which is a
lookup; the output projection counts, as torchtitan does) and 12*L*H*Q*T is the attention score
and value products of L layers, H heads of size Q over a context of T, counted without the causal
saving. With it, Table 2's 7B run (2T tokens in 184,320 A100-hours: 3,014 tokens/s per GPU) is
44.5% MFU at A100's 312 TFLOP/s; the 70B run is 46.0%.

Under train.float8 the same count splits in two (float8_flops_per_token): the 6N of the block
linears that float8 converts, which run at the device's fp8 peak, and the rest (attention scores,
the output projection), which stay at bf16's. MFU stays measured against the bf16 peak.
"""

from __future__ import annotations

from llamatrain.config import ModelConfig
from llamatrain.hardware import peak_flops


def block_linears(model_cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of one block, by its name in the block."""
    dim, q = model_cfg.dim, model_cfg.n_heads * model_cfg.head_dim
    kv, hidden = model_cfg.n_kv_heads * model_cfg.head_dim, model_cfg.ffn_hidden
    return {"attention.wq": (q, dim), "attention.wk": (kv, dim), "attention.wv": (kv, dim),
            "attention.wo": (dim, q), "feed_forward.w1": (hidden, dim),
            "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}


def num_params(model_cfg: ModelConfig) -> int:
    """Exact parameter count of the Transformer that `model_cfg` describes (untied output)."""
    embeddings = 2 * model_cfg.vocab_size * model_cfg.dim  # input table and output projection
    return model_cfg.n_layers * block_params(model_cfg) + embeddings + model_cfg.dim  # + norm


def float8_params(model_cfg: ModelConfig, *, tp: int = 1) -> int:
    """Parameters of the block linears that train.float8 converts when tensor parallelism splits
    them tp ways (the rule is distributed.float8.eligible)."""
    from llamatrain.distributed.float8 import eligible

    per_block = sum(o * i for name, (o, i) in block_linears(model_cfg).items()
                    if eligible(name, o, i, tp=tp))
    return model_cfg.n_layers * per_block


def num_matmul_params(model_cfg: ModelConfig) -> int:
    """Parameters that multiply activations: all but the input embedding table."""
    return num_params(model_cfg) - model_cfg.vocab_size * model_cfg.dim


def block_params(model_cfg: ModelConfig) -> int:
    """Parameters of one transformer block (attention, feed-forward and the two RMSNorm gains)."""
    linears = sum(o * i for o, i in block_linears(model_cfg).values())
    return linears + 2 * model_cfg.dim


def block_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of one block: its share of
    flops_per_token, 6 x its parameters + its attention's 12*H*Q*T."""
    return 6.0 * block_params(model_cfg) + 12.0 * model_cfg.dim * seq_len


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context length seq_len."""
    if seq_len <= 0:
        raise ValueError(f"seq_len = {seq_len}: expected a positive integer")
    n_layers, dim = model_cfg.n_layers, model_cfg.dim  # H*Q = n_heads * head_dim = dim
    return 6.0 * num_matmul_params(model_cfg) + 12.0 * n_layers * dim * seq_len


def float8_flops_per_token(model_cfg: ModelConfig, seq_len: int, *, tp: int = 1
                           ) -> tuple[float, float]:
    """(FLOPs per token of the linears float8 converts, of everything else): their sum is
    flops_per_token."""
    converted = 6.0 * float8_params(model_cfg, tp=tp)
    return converted, flops_per_token(model_cfg, seq_len) - converted


def mfu(
    tokens_per_s_per_device: float,
    model_cfg: ModelConfig,
    seq_len: int,
    device_name: str,
    dtype: str = "bf16",
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None if unknown)."""
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return None
    return tokens_per_s_per_device * flops_per_token(model_cfg, seq_len) / peak
