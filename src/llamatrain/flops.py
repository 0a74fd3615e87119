"""Model arithmetic without building a model: parameter count, FLOPs per token and the model FLOPs
utilisation (MFU) that the trainer logs and `carbon project` inverts (peaks from
llamatrain.hardware).

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6N + 12*L*H*Q*T, where N counts
the parameters that take part in matrix multiplies (all but the input embedding table, which is a
lookup; the output projection counts, as torchtitan does) and 12*L*H*Q*T is the attention score
and value products of L layers, H heads of size Q over a context of T, counted without the causal
saving. With it, Table 2's 7B run (2T tokens in 184,320 A100-hours: 3,014 tokens/s per GPU) is
44.5% MFU at A100's 312 TFLOP/s; the 70B run is 46.0%.
"""

from __future__ import annotations

from llamatrain.config import ModelConfig
from llamatrain.hardware import peak_flops


def num_params(model_cfg: ModelConfig) -> int:
    """Exact parameter count of the Transformer that `model_cfg` describes (untied output)."""
    embeddings = 2 * model_cfg.vocab_size * model_cfg.dim  # input table and output projection
    return model_cfg.n_layers * block_params(model_cfg) + embeddings + model_cfg.dim  # + norm


def num_matmul_params(model_cfg: ModelConfig) -> int:
    """Parameters that multiply activations: all but the input embedding table."""
    return num_params(model_cfg) - model_cfg.vocab_size * model_cfg.dim


def block_params(model_cfg: ModelConfig) -> int:
    """Parameters of one transformer block (attention, feed-forward and the two RMSNorm gains)."""
    dim, hidden = model_cfg.dim, model_cfg.ffn_hidden
    attention = 2 * dim * dim + 2 * dim * model_cfg.n_kv_heads * model_cfg.head_dim
    return attention + 3 * dim * hidden + 2 * dim


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
