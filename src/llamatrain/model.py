"""The Llama 2 transformer (Touvron et al. 2023, Table 1): pre-norm RMSNorm, grouped-query attention
with rotary embeddings, SwiGLU feed-forward. Parameter names are Meta's, so Meta checkpoints load
unchanged. The model knows nothing of devices or distribution; its hot ops go through `ops`.

Weight initialisation (`init_weights`): every linear and embedding weight is N(0, 0.02), except the
two projections that write into the residual stream (attention `wo`, feed-forward `w2`), which are
N(0, 0.02 / sqrt(2 * n_layers)) so that the residual's variance does not grow with depth (GPT-2's
scheme); RMSNorm weights are 1. Each parameter is drawn in blocks of rows, every block from its own
generator seeded by (seed, parameter name, block), so a shard of any size can draw exactly its rows:
the full weights are the same at any world size.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from llamatrain import ops
from llamatrain.config import ModelConfig

INIT_STD = 0.02
INIT_ROWS_PER_BLOCK = 64


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    """cos, sin of pos * theta^(-2i/head_dim): fp32, each of shape (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    )
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rms_norm(x); with `residual`, the residual add fused in: (rms_norm(x + residual),
        x + residual)."""
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """cos, sin: the rotary tables of at least x's sequence length (positions 0, 1, ...)."""
        batch, seq, _ = x.shape
        # Heads are counted from the projections' width, not n_heads: under tensor parallelism
        # each rank computes only its own heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = ops.rotary(q, k, cos[:seq], sin[:seq])
        out = ops.attention(q, k, v, causal=True)
        return self.wo(out.reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self, h: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input is h + delta (h alone when delta is None); returns (h', delta')
        whose sum is its output. Both residual adds happen inside the norms (one pass over the
        activations, not two): the previous block's output add in attention_norm, the
        attention's in ffn_norm; the feed-forward's is left to the next norm."""
        if delta is None:
            normed = self.attention_norm(h)
        else:
            normed, h = self.attention_norm(delta, residual=h)
        normed, h = self.ffn_norm(self.attention(normed, cos, sin), residual=h)
        return h, self.feed_forward(normed)


class Transformer(nn.Module):
    """`fuse_residual=False` adds each block's output to the stream outside the next norm, for
    layouts whose norms cannot take the residual (the weights are the same either way).

    The blocks are `layers`, keyed by their index in the model. A Transformer with some blocks
    removed and `tok_embeddings`, or `norm` and `output`, set to None runs what it holds (a
    pipeline stage is one; its parameters keep the names they have in the whole model)."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, fuse_residual: bool = True):
        super().__init__()
        self.cfg = cfg
        self.fuse_residual = fuse_residual
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if self.output.weight.device.type != "meta":
            self.init_rope()
            self.init_weights(seed)

    def init_rope(self) -> None:
        """(Re)compute the rotary tables, e.g. after materialising a meta-device model."""
        device = self.rope_cos.device
        self.rope_cos, self.rope_sin = rope_tables(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device
        )

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, param in self.named_parameters():
            param.copy_(init_rows(name, param.shape, 0, param.shape[0], seed=seed,
                                  n_layers=self.cfg.n_layers))
        self.init_rope()

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab); with `targets`, the mean cross-entropy over targets !=
        ignore_index instead, from the output projection and loss fused (no full logits).

        Without tok_embeddings, `tokens` is the residual stream (batch, seq, dim) that the
        blocks before these produced; without output, the residual stream is returned (and
        `targets` unused)."""
        h, delta = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens), None
        for layer in self.layers.values():
            if delta is not None and not self.fuse_residual:
                h, delta = h + delta, None
            h, delta = layer(h, delta, self.rope_cos, self.rope_sin)
        if self.output is None:
            return h if delta is None else h + delta
        if delta is None:  # no layers
            normed = self.norm(h)
        elif self.fuse_residual:
            normed, _ = self.norm(delta, residual=h)
        else:
            normed = self.norm(h + delta)
        if targets is None:
            return self.output(normed)
        if isinstance(self.output.weight, DTensor):
            # FSDP hands forward plain tensors; a DTensor here is tensor-parallel (vocabulary
            # sharded): the fused loss would see a shard of the vocabulary as if it were all.
            raise ValueError(
                "kernels.fused_loss = true needs an output projection that is not tensor-parallel; "
                "set kernels.fused_loss = false to take the loss of the sharded logits"
            )
        return ops.linear_cross_entropy(normed.flatten(0, 1), self.output.weight,
                                        targets.flatten(), ignore_index)  # fmt: skip


def init_std(name: str, n_layers: int) -> float | None:
    """Standard deviation of a parameter's normal init; None for the RMSNorm weights (ones)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return INIT_STD / math.sqrt(2 * n_layers)
    return INIT_STD


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_rows(
    name: str, shape: torch.Size, start: int, stop: int, *, seed: int, n_layers: int
) -> torch.Tensor:
    """Rows [start, stop) of parameter `name`'s initial value, on the CPU, in fp32."""
    std = init_std(name, n_layers)
    rest = tuple(shape[1:])
    if std is None:
        return torch.ones((stop - start, *rest))
    first, last = start // INIT_ROWS_PER_BLOCK, math.ceil(stop / INIT_ROWS_PER_BLOCK)
    pieces = []
    for block in range(first, last):
        rows = min(INIT_ROWS_PER_BLOCK, shape[0] - block * INIT_ROWS_PER_BLOCK)
        g = torch.Generator().manual_seed(_block_seed(seed, name, block))
        pieces.append(torch.empty((rows, *rest)).normal_(0.0, std, generator=g))
    full = torch.cat(pieces) if pieces else torch.empty((0, *rest))
    offset = first * INIT_ROWS_PER_BLOCK
    return full[start - offset : stop - offset]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
