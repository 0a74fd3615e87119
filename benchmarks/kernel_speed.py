"""Kernel benchmark: each op of llamatrain.kernels at Llama 2 7B and 70B shapes, forward, backward
and both, against torch eager, torch.compile and, where importable, Liger-Kernel, flash-attn 2 and
apex's fused RMSNorm. Reports the median time, the achieved GB/s (memory-bound ops) or TFLOP/s
(attention), their fraction of this GPU's measured limits, and the peak memory of forward+backward.

Written for CUDA; the same code runs on a CPU with tiny shapes, which is how its tests check it.
Every provider is tried on its own: one that fails to import, compile or run leaves an error in
its row and the others go on.

GB/s counts the bytes an ideal kernel must move (each input read once, each output written once);
TFLOP/s counts attention's two matmuls, halved for the causal mask, and 2.5x that for the backward.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamatrain import ops

MODES = ("fwd", "bwd", "fwd_bwd")
# Providers that compile on first call go last, so a spent time budget cuts them first.
PROVIDER_ORDER = ("llamatrain", "torch", "sdpa_flash", "sdpa_cudnn", "liger", "flash_attn", "apex",
                  "compile")
# SDPA with one backend forced: `torch` lets SDPA choose; these say what each backend does.
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}

Inputs = dict[str, torch.Tensor]
# A provider builds, from fresh inputs, the call to time and any parameters of its own.
Provider = Callable[[Inputs], tuple[Callable[[], Any], list[torch.Tensor]]]


@dataclass
class Shape:
    """The dimensions of one Llama 2 model that the kernels see, for `tokens` tokens."""

    name: str
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    tokens: int
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def of(cls, name: str, model_cfg: Any, tokens: int) -> Shape:
        return cls(name, model_cfg.dim, model_cfg.n_heads, model_cfg.n_kv_heads,
                   model_cfg.ffn_hidden, model_cfg.vocab_size, tokens, model_cfg.norm_eps)


@dataclass
class Case:
    """One op at one shape: how to make its inputs, what a pass must move, who runs it."""

    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype], Inputs]
    work: dict[str, float]  # mode -> bytes (unit GB/s) or FLOPs (unit TFLOP/s)
    unit: str
    providers: dict[str, Provider] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Providers


def _kernels() -> Any:
    return importlib.import_module("llamatrain.kernels")


def _plain(fn: Callable[..., Any], *names: Any, **kwargs: Any) -> Provider:
    """fn called on the inputs of these names; a non-string in `names` is passed as it is, and
    a keyword whose value names an input gets that input."""

    def build(inputs: Inputs) -> tuple[Callable[[], Any], list[torch.Tensor]]:
        args = [inputs[n] if isinstance(n, str) else n for n in names]
        kw = {k: inputs[v] if isinstance(v, str) and v in inputs else v for k, v in kwargs.items()}
        return (lambda: fn(*args, **kw)), []

    return build


def _lazy(resolve: Callable[[], Callable[..., Any]], *names: Any, **kwargs: Any) -> Provider:
    """A provider whose function is looked up (imported, compiled) only when it is built."""

    def build(inputs: Inputs) -> tuple[Callable[[], Any], list[torch.Tensor]]:
        return _plain(resolve(), *names, **kwargs)(inputs)

    return build


def _compiled(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any]]:
    return lambda: torch.compile(fn, dynamic=False)


def _module(make_module: Callable[[int, float], torch.nn.Module], eps: float) -> Provider:
    """An RMSNorm module (Liger's, apex's) given the benchmark's weight, called on x (and on
    the residual r where the inputs have one)."""

    def build(inputs: Inputs) -> tuple[Callable[[], Any], list[torch.Tensor]]:
        x, w = inputs["x"], inputs["w"]
        module = make_module(x.shape[-1], eps).to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            module.weight.copy_(w)
        args = (x, inputs["r"]) if "r" in inputs else (x,)
        return (lambda: module(*args)), list(module.parameters())

    return build


def _liger_rms_norm(dim: int, eps: float) -> torch.nn.Module:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    try:
        return LigerRMSNorm(dim, eps=eps, in_place=False)
    except TypeError:  # versions before in_place
        return LigerRMSNorm(dim, eps=eps)


def _apex_rms_norm(dim: int, eps: float) -> torch.nn.Module:
    from apex.normalization import FusedRMSNorm

    return FusedRMSNorm(dim, eps=eps)


def _liger_swiglu() -> Callable[..., Any]:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def _liger_rope(inputs: Inputs) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """Liger's RoPE takes Hugging Face's layout: (batch, heads, seq, dim) views and cos/sin of the
    full head_dim (rotate-half pairing); it rotates in place, so each call rotates again."""
    from liger_kernel.ops.rope import LigerRopeFunction

    q, k = inputs["q"].transpose(1, 2), inputs["k"].transpose(1, 2)
    cos = torch.cat([inputs["cos"], inputs["cos"]], dim=-1)[None].to(q.dtype)
    sin = torch.cat([inputs["sin"], inputs["sin"]], dim=-1)[None].to(q.dtype)
    return (lambda: LigerRopeFunction.apply(q, k, cos, sin)), []


def _liger_cross_entropy() -> Callable[..., Any]:
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(ignore_index=-100)


def _liger_fused_add_rms_norm(dim: int, eps: float) -> torch.nn.Module:
    from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm

    return LigerFusedAddRMSNorm(dim, eps=eps, in_place=False)


def _liger_linear_cross_entropy() -> Callable[..., Any]:
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda hidden, weight, targets: loss(weight, hidden, targets)


def _add_rms_norm_ref(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float):
    h = x + r
    return ops.rms_norm_ref(h, w, eps), h


def _flash_attn() -> Callable[..., Any]:
    from flash_attn import flash_attn_func

    return flash_attn_func


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _sdpa_with(backend: str) -> Callable[[], Callable[..., Any]]:
    """_sdpa with SDPA held to one backend (its backward is the one the forward chose)."""

    def resolve() -> Callable[..., Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, backend)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([chosen]):
                return _sdpa(q, k, v)

        return run

    return resolve


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Cases


def _randn(*shape: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
           scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """A leaf that requires grad: N(offset, scale^2) in dtype."""
    t = torch.randn(*shape, device=device, dtype=torch.float32, generator=gen) * scale + offset
    return t.to(dtype).requires_grad_()


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def rms_norm_case(s: Shape, elt: int = 2) -> Case:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        return {"x": _randn(1, s.tokens, s.dim, device=device, dtype=dtype, gen=g),
                "w": _randn(s.dim, device=device, dtype=dtype, gen=g, scale=0.1, offset=1.0)}

    act, w = s.tokens * s.dim * elt, s.dim * elt
    # forward: read x and w, write y; backward: read dy, x and w, write dx and dw.
    work = {"fwd": 2 * act + w, "bwd": 3 * act + 2 * w}
    case = Case("rms_norm", s.name, make, {**work, "fwd_bwd": work["fwd"] + work["bwd"]}, "GB/s")
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().rms_norm, "x", "w", s.eps),
        "torch": _plain(ops.rms_norm_ref, "x", "w", s.eps),
        "liger": _module(_liger_rms_norm, s.eps),
        "apex": _module(_apex_rms_norm, s.eps),
        "compile": _lazy(_compiled(ops.rms_norm_ref), "x", "w", s.eps),
    }
    return case


def add_rms_norm_case(s: Shape, elt: int = 2) -> Case:
    """RMSNorm with the residual add fused in: returns the normed sum and the sum."""

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        return {"x": _randn(1, s.tokens, s.dim, device=device, dtype=dtype, gen=g),
                "r": _randn(1, s.tokens, s.dim, device=device, dtype=dtype, gen=g),
                "w": _randn(s.dim, device=device, dtype=dtype, gen=g, scale=0.1, offset=1.0)}

    act, w = s.tokens * s.dim * elt, s.dim * elt
    # forward: read x, r and w, write y and h; backward: read dy, dh, h and w, write dx and dw
    # (the residual's gradient is dx itself).
    work = {"fwd": 4 * act + w, "bwd": 4 * act + 2 * w}
    case = Case("add_rms_norm", s.name, make, {**work, "fwd_bwd": work["fwd"] + work["bwd"]},
                "GB/s")  # fmt: skip
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().rms_norm, "x", "w", s.eps, residual="r"),
        "torch": _plain(_add_rms_norm_ref, "x", "r", "w", s.eps),
        "liger": _module(_liger_fused_add_rms_norm, s.eps),
        "compile": _lazy(_compiled(_add_rms_norm_ref), "x", "r", "w", s.eps),
    }
    return case


def swiglu_case(s: Shape, elt: int = 2) -> Case:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        return {"gate": _randn(1, s.tokens, s.ffn_hidden, device=device, dtype=dtype, gen=g),
                "up": _randn(1, s.tokens, s.ffn_hidden, device=device, dtype=dtype, gen=g)}

    act = s.tokens * s.ffn_hidden * elt
    # forward: read gate and up, write out; backward: read dout, gate and up, write two grads.
    work = {"fwd": 3 * act, "bwd": 5 * act}
    case = Case("swiglu", s.name, make, {**work, "fwd_bwd": 8 * act}, "GB/s")
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().swiglu, "gate", "up"),
        "torch": _plain(ops.swiglu_ref, "gate", "up"),
        "liger": _lazy(_liger_swiglu, "gate", "up"),
        "compile": _lazy(_compiled(ops.swiglu_ref), "gate", "up"),
    }
    return case


def _rope_tables(s: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim)
    angles = torch.outer(torch.arange(s.tokens, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def rotary_case(s: Shape, elt: int = 2) -> Case:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        cos, sin = _rope_tables(s, device)
        return {"q": _randn(1, s.tokens, s.n_heads, s.head_dim, device=device, dtype=dtype, gen=g),
                "k": _randn(1, s.tokens, s.n_kv_heads, s.head_dim, device=device, dtype=dtype,
                            gen=g),
                "cos": cos, "sin": sin}

    qk = s.tokens * (s.n_heads + s.n_kv_heads) * s.head_dim * elt
    tables = 2 * s.tokens * s.head_dim // 2 * 4
    # Both directions read q and k (or their grads) and the fp32 tables, and write q and k.
    work = {"fwd": 2 * qk + tables, "bwd": 2 * qk + tables}
    case = Case("rotary", s.name, make, {**work, "fwd_bwd": 2 * work["fwd"]}, "GB/s")
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().rotary, "q", "k", "cos", "sin"),
        "torch": _plain(ops.rotary_ref, "q", "k", "cos", "sin"),
        "liger": _liger_rope,
        "compile": _lazy(_compiled(ops.rotary_ref), "q", "k", "cos", "sin"),
    }
    return case


def attention_case(s: Shape, deterministic: bool = False) -> Case:
    """Causal GQA attention; `deterministic`: every provider's bit-identical backward (ours:
    dQ in its own kernel, 7 GEMMs per block pair, against 5 with atomics)."""

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        return {
            "q": _randn(1, s.tokens, s.n_heads, s.head_dim, device=device, dtype=dtype, gen=g),
            "k": _randn(1, s.tokens, s.n_kv_heads, s.head_dim, device=device, dtype=dtype, gen=g),
            "v": _randn(1, s.tokens, s.n_kv_heads, s.head_dim, device=device, dtype=dtype, gen=g),
        }

    # QK^T and PV: 2 matmuls of 2*T*T*d FLOPs per head, half of it under the causal mask.
    fwd = 2 * 2 * s.tokens * s.tokens * s.head_dim * s.n_heads / 2
    op = "attention_det" if deterministic else "attention"
    case = Case(op, s.name, make, {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}, "TFLOP/s")
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().attention, "q", "k", "v", causal=True,
                            deterministic=deterministic),
        "torch": _plain(_sdpa, "q", "k", "v"),
        "flash_attn": _lazy(_flash_attn, "q", "k", "v", causal=True, deterministic=deterministic),
    }  # fmt: skip
    if not deterministic:
        case.providers["compile"] = _lazy(_compiled(ops.attention_ref), "q", "k", "v", causal=True)
        for name, backend in SDPA_BACKENDS.items():
            case.providers[name] = _lazy(_sdpa_with(backend), "q", "k", "v")
    return case


def cross_entropy_case(s: Shape, elt: int = 2) -> Case:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        targets = torch.randint(0, s.vocab_size, (s.tokens,), device=device, generator=g)
        targets[:: 16] = -100  # some ignored positions, as with SFT's masked prompts
        return {"logits": _randn(s.tokens, s.vocab_size, device=device, dtype=dtype, gen=g),
                "targets": targets}

    logits = s.tokens * s.vocab_size * elt
    # forward: read the logits; backward: read them again and write their gradient.
    work = {"fwd": logits, "bwd": 2 * logits, "fwd_bwd": 3 * logits}
    case = Case("cross_entropy", s.name, make, work, "GB/s")
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().cross_entropy, "logits", "targets"),
        "torch": _plain(ops.cross_entropy_ref, "logits", "targets"),
        "liger": _lazy(_liger_cross_entropy, "logits", "targets"),
        "compile": _lazy(_compiled(ops.cross_entropy_ref), "logits", "targets"),
    }
    return case


def linear_cross_entropy_case(s: Shape) -> Case:
    """The output projection and the loss, fused (ours, Liger's) or logits then loss."""

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = _gen(device)
        targets = torch.randint(0, s.vocab_size, (s.tokens,), device=device, generator=g)
        targets[:: 16] = -100
        return {"hidden": _randn(s.tokens, s.dim, device=device, dtype=dtype, gen=g),
                "weight": _randn(s.vocab_size, s.dim, device=device, dtype=dtype, gen=g,
                                 scale=0.02),
                "targets": targets}  # fmt: skip

    # The logits' matmul forward; the backward's two (grad of hidden and of the weight).
    matmul = 2 * s.tokens * s.dim * s.vocab_size
    work = {"fwd": matmul, "bwd": 2 * matmul, "fwd_bwd": 3 * matmul}
    case = Case("linear_cross_entropy", s.name, make, work, "TFLOP/s")
    case.providers = {
        "llamatrain": _lazy(lambda: _kernels().linear_cross_entropy, "hidden", "weight",
                            "targets"),
        "torch": _plain(ops.linear_cross_entropy_ref, "hidden", "weight", "targets"),
        "liger": _lazy(_liger_linear_cross_entropy, "hidden", "weight", "targets"),
        "compile": _lazy(_compiled(ops.linear_cross_entropy_ref), "hidden", "weight", "targets"),
    }  # fmt: skip
    return case


def cases(shapes: Sequence[Shape]) -> list[Case]:
    """Every op at every shape; cross-entropy once per distinct (tokens, vocab)."""
    out: list[Case] = []
    seen_vocab: set[tuple[int, int]] = set()
    for s in shapes:
        out += [rms_norm_case(s), add_rms_norm_case(s), swiglu_case(s), rotary_case(s),
                attention_case(s), attention_case(s, deterministic=True)]  # fmt: skip
        if (s.tokens, s.vocab_size) not in seen_vocab:
            seen_vocab.add((s.tokens, s.vocab_size))
            out.append(cross_entropy_case(s))
        out.append(linear_cross_entropy_case(s))
    return out


OPTIONAL = {"liger": "liger_kernel", "flash_attn": "flash_attn", "apex": "apex.normalization"}


def available_providers(device: torch.device) -> list[str]:
    """llamatrain, torch and compile always; on CUDA SDPA's flash and cuDNN backends, and the
    optional packages where they import."""
    names = ["llamatrain", "torch", "compile"]
    if device.type == "cuda":
        names += list(SDPA_BACKENDS)
        names += [name for name, module in OPTIONAL.items() if importable(module)]
    return [p for p in PROVIDER_ORDER if p in names]


# ---------------------------------------------------------------------------------------------
# Measurement


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200]


def measure(
    case: Case,
    provider: str,
    device: torch.device,
    dtype: torch.dtype,
    timer: Callable[..., float],
) -> dict[str, Any]:
    """Time one provider on one case; an exception becomes the row's `error`."""
    row: dict[str, Any] = {"op": case.op, "shape": case.shape, "provider": provider,
                           "unit": case.unit}
    inputs: Inputs = {}
    try:
        inputs = case.make(device, dtype)
        start = time.perf_counter()
        fn, params = case.providers[provider](inputs)
        leaves = [t for t in inputs.values() if t.requires_grad] + params
        outs = _as_tuple(fn())
        grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]

        def fwd_bwd() -> None:
            torch.autograd.backward(_as_tuple(fn()), grads)

        fwd_bwd()  # compiles the backward, if any, before anything is timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - start
        ms = {"fwd": timer(fn, grad_to_none=leaves)}
        try:
            ms["bwd"] = timer(
                lambda: torch.autograd.backward(outs, grads, retain_graph=True),
                grad_to_none=leaves,
            )
        except Exception:  # a backward that cannot run twice on one graph
            ms["bwd"] = math.nan
        ms["fwd_bwd"] = timer(fwd_bwd, grad_to_none=leaves)
        if math.isnan(ms["bwd"]):
            ms["bwd"] = max(ms["fwd_bwd"] - ms["fwd"], 0.0)
            row["bwd_derived"] = True
        scale = 1e9 if case.unit == "GB/s" else 1e12
        for mode in MODES:
            row[f"{mode}_ms"] = ms[mode]
            row[f"{mode}_rate"] = case.work[mode] / (ms[mode] / 1000) / scale if ms[mode] else None
        if device.type == "cuda":
            del outs
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fwd_bwd()
            torch.cuda.synchronize()
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    except Exception as e:
        row["error"] = _error(e)
    finally:
        inputs.clear()
        if device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception as e:  # a kernel that broke the CUDA context: later rows say so too
                row.setdefault("error", _error(e))
    return row


def run(
    shapes: Sequence[Shape],
    device: torch.device,
    *,
    timer: Callable[..., float],
    limits: dict[str, float] | None = None,
    providers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    budget_s: float = 240.0,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for every case x provider, in provider order so that a spent budget skips the
    compiled providers first; each row gets its fraction of the measured limits and is handed
    to `on_row` as soon as it is measured."""
    names = list(providers) if providers is not None else available_providers(device)
    all_cases = cases(shapes)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for provider in [p for p in PROVIDER_ORDER if p in names]:
        for case in all_cases:
            if provider not in case.providers:
                continue
            if time.perf_counter() - start > budget_s:
                row = {"op": case.op, "shape": case.shape, "provider": provider,
                       "unit": case.unit, "error": f"skipped: budget of {budget_s:g} s spent"}
            else:
                row = measure(case, provider, device, dtype, timer)
            rows.append(row)
            _fraction(row, limits)
            log(_line(row))
            if on_row is not None:
                on_row(row)
    order = {(c.op, c.shape): i for i, c in enumerate(all_cases)}
    rows.sort(key=lambda r: (order[(r["op"], r["shape"])], PROVIDER_ORDER.index(r["provider"])))
    return rows


def _fraction(row: dict[str, Any], limits: dict[str, float] | None) -> None:
    if not limits or row.get("fwd_bwd_rate") is None:
        return
    limit = limits["copy_gbs"] if row["unit"] == "GB/s" else limits["matmul_tflops"]
    for mode in MODES:
        if row.get(f"{mode}_rate") is not None:
            row[f"{mode}_frac"] = row[f"{mode}_rate"] / limit


def _line(row: dict[str, Any]) -> str:
    head = f"  {row['op']:<20} {row['shape']:<4} {row['provider']:<10}"
    if "error" in row:
        return f"{head} {row['error']}"
    if row["fwd_bwd_rate"] is None:
        return f"{head} fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
    return (f"{head} fwd {row['fwd_ms']:.3f} ms  bwd {row['bwd_ms']:.3f} ms  "
            f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms  {row['fwd_bwd_rate']:.1f} {row['unit']}")


# The rehearsal's shape: every op's code path, in seconds through the interpreter.
REHEARSAL_SHAPE = Shape("tiny", dim=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=256,
                        tokens=32)
# Seconds of the section's budget kept for the measurement under way when it runs out (a
# torch.compile of a 70B case takes tens of seconds).
BUDGET_MARGIN_S = {"gpu": 35.0, "rehearsal": 10.0}


def attention_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Causal attention forward+backward TFLOP/s and ms of each provider at each shape."""
    return [{"op": r["op"], "shape": r["shape"], "provider": r["provider"],
             "fwd_bwd_tflops": r.get("fwd_bwd_rate"), "fwd_bwd_ms": r.get("fwd_bwd_ms"),
             "of_matmul": r.get("fwd_bwd_frac"), "error": r.get("error")}
            for r in rows if r["op"] in ("attention", "attention_det")]


def _one_call(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """The rehearsal's timer: one call (the interpreter takes a good part of a second)."""
    for t in grad_to_none:
        t.grad = None
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def section(ctx: Any) -> dict[str, Any]:
    """`make gpu-check`'s kernel table: the 7B and 70B shapes at 4,096 tokens in bf16 on a GPU,
    the tiny shape in fp32 in the rehearsal; % of the limits the limits section measured."""
    from dataclasses import asdict

    import limits as limits_mod  # benchmarks/ is sys.path[0] of a section's process

    from llamatrain.config import load_config

    root = Path(__file__).resolve().parents[1]
    mode = "rehearsal" if ctx.rehearsal else "gpu"
    if ctx.rehearsal:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [REHEARSAL_SHAPE]
        # Not torch.compile: one compile takes longer than the whole rehearsal on 2 cores.
        providers = ["llamatrain", "torch", "sdpa_flash"]
        timer = _one_call
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [Shape.of(n, load_config(root / f"configs/llama2_{n}.toml").model, 4096)
                  for n in ("7b", "70b")]
        providers = available_providers(device)
        timer = lambda fn, **kw: limits_mod.median_ms(  # noqa: E731
            fn, device, warmup_ms=10, rep_ms=50, **kw)
    measured = ctx.earlier("limits")
    lim = ({"copy_gbs": measured["copy_gbs"], "matmul_tflops": measured["matmul_tflops"]}
           if measured else None)
    rows = run(shapes, device, timer=timer, limits=lim, providers=providers, dtype=dtype,
               budget_s=max(1.0, ctx.budget_s - BUDGET_MARGIN_S[mode]), on_row=ctx.progress)
    return {"shapes": [asdict(s) for s in shapes], "dtype": str(dtype).removeprefix("torch."),
            "providers": providers, "limits": lim, "rows": rows,
            "attention": attention_summary(rows)}


if __name__ == "__main__":
    # The whole table on this GPU, printed (`make gpu-check` and `make bench` keep it in files).
    import limits as limits_mod  # this folder is sys.path[0] when run as a script

    from llamatrain.config import load_config

    dev = torch.device("cuda")
    paper = [Shape.of(n, load_config(f"configs/llama2_{n}.toml").model, 4096)
             for n in ("7b", "70b")]
    run(paper, dev, timer=lambda fn, **kw: limits_mod.median_ms(fn, dev, **kw),
        limits=limits_mod.measure(dev), budget_s=240.0)
