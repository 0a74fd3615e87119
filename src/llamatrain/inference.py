"""Text generation with a key/value cache, beside the training forward: the same modules and
weights of `model.Transformer`, run one new token at a time against the keys and values of the
tokens before it.

A batch of prompts is right-padded; each row keeps its own position, so row r's next token is
written at cache index len(prompt_r) + step, and a query at position p attends to cache indices
<= p, all of which hold that row's real tokens by then. With `use_cache=False` every step runs the
whole sequence through the training forward instead: the reference the cache must equal token for
token. A model sharded with FSDP2 is gathered one block at a time (`unshard`/`reshard`), as its
own forward hooks would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamatrain import ops
from llamatrain.model import Transformer


@dataclass
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else drawn from the softmax of
    logits / temperature restricted to the top_k tokens and the top_p probability mass."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"sampling {self}: expected temperature >= 0, 0 < top_p <= 1, "
                             "top_k >= 0")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
           ) -> torch.Tensor:
    """Next token of each row of (batch, vocab) logits. Draws take one uniform number per row,
    compared with the cumulative probabilities in vocabulary order, so the same logits and the
    same generator state give the same tokens however they were computed."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order,
                                                                  before >= sampling.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device="cpu").to(logits.device)
    picked = (probs.cumsum(-1) < u * probs.sum(-1, keepdim=True)).sum(-1)
    return picked.clamp(max=logits.shape[-1] - 1)


class KVCache:
    """Keys and values of every layer, (batch, max_len, kv heads, head_dim), allocated at the
    first write so that the local head count of a tensor-parallel layer is whatever it is."""

    def __init__(self, n_layers: int, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            shape = (self.batch, self.max_len, *k.shape[2:])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        rows = torch.arange(self.batch, device=k.device)[:, None].expand_as(positions)
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v
        return self.k[layer], self.v[layer]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ops.rotary_ref's rotation of adjacent pairs, with a (batch, seq, head_dim // 2) table per
    row: rows of one batch stand at different positions while decoding."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


@contextlib.contextmanager
def _gathered(module: torch.nn.Module, *, reshard: bool = True):
    """The full parameters of an FSDP2 unit for the duration (nothing for a plain module)."""
    unshard = getattr(module, "unshard", None)
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        if reshard:
            module.reshard()


@torch.no_grad()
def cached_forward(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
    """Logits of tokens (batch, seq) standing at cache indices `positions` (batch, seq), after
    writing their keys and values into `cache`. Mirrors Block.forward step for step."""
    head_dim = model.cfg.head_dim
    span = int(positions.max()) + 1
    visible = torch.arange(span, device=tokens.device)[None, None, :] <= positions[:, :, None]
    # The root's parameters stay gathered after forward, as FSDP leaves them
    # (reshard_after_forward=False): every rank must be in the same state afterwards.
    with _gathered(model, reshard=False):
        h = model.tok_embeddings(tokens)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        for i, block in enumerate(model.layers.values()):
            with _gathered(block):
                att = block.attention
                x = block.attention_norm(h)
                batch, seq, _ = x.shape
                q = att.wq(x).unflatten(-1, (-1, head_dim))
                k = att.wk(x).unflatten(-1, (-1, head_dim))
                v = att.wv(x).unflatten(-1, (-1, head_dim))
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
                keys, values = cache.write(i, positions, k, v)
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys[:, :span].transpose(1, 2),
                    values[:, :span].transpose(1, 2), attn_mask=visible[:, None],
                    enable_gqa=q.shape[2] != keys.shape[2])
                a = att.wo(out.transpose(1, 2).reshape(batch, seq, -1))
                normed, h = ops.rms_norm(a, block.ffn_norm.weight, block.ffn_norm.eps, residual=h)
                h = h + block.feed_forward(normed)
        return model.output(model.norm(h))


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    sampling: Sampling | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
    before_forward: Callable[[], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt: until EOS (not included), until `stop(tokens so far)` is true
    (included), or max_new_tokens. `before_forward` runs before every forward pass (the lockstep
    of sharded evaluation). Prompts plus new tokens must fit model.cfg.max_seq_len."""
    sampling = sampling or Sampling()
    device = model.rope_cos.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if int(lengths.min()) < 1 or int(lengths.max()) + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompts of {int(lengths.min())}-{int(lengths.max())} tokens + "
                         f"{max_new_tokens} new: expected 1 to {model.cfg.max_seq_len} in all")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature else None
    rows = torch.arange(len(prompts), device=device)
    seqs = [list(p) for p in prompts]
    cache = KVCache(len(model.layers), len(prompts), int(lengths.max()) + max_new_tokens)

    def forward(step: int, new: torch.Tensor | None) -> torch.Tensor:
        if before_forward is not None:
            before_forward()
        if not use_cache:
            return model(_padded(seqs, eos_id, device))[rows, lengths + step - 1]
        if new is None:
            tokens = _padded(seqs, eos_id, device)
            positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
            return cached_forward(model, tokens, positions, cache)[rows, lengths - 1]
        return cached_forward(model, new[:, None], (lengths + step - 1)[:, None], cache)[:, 0]

    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits = forward(0, None)
    for step in range(max_new_tokens):
        new = choose(logits, sampling, generator)
        for r, token in enumerate(new.tolist()):
            seqs[r].append(token)
            if done[r]:
                continue
            if token == eos_id:
                done[r] = True
                continue
            out[r].append(token)
            done[r] = stop is not None and stop(out[r])
        if all(done) or step == max_new_tokens - 1:
            break
        logits = forward(step + 1, new)
    return out
