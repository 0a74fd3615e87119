"""Which implementation each op of a run uses: its Triton kernel or its PyTorch path (SDPA for
attention), decided once at startup for the whole run.

`kernels.backend = "triton" | "torch"` forces every op. `"auto"` on CUDA times, on the run's own
shapes, each op's forward and backward with the kernel and with PyTorch for a few milliseconds
and keeps the faster, so that a kernel never measured on this GPU can never make a run slower
than PyTorch would be. Rank 0 times and broadcasts its choice and timings in one collective: every
rank runs the same ops. With `train.deterministic` timings, which vary from run to run, must not
decide: auto then takes every kernel on CUDA without timing. Off CUDA auto is PyTorch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from llamatrain import ops
from llamatrain.config import Config, ModelConfig

IMPLS = ("triton", "torch")
# Timing of one op with one implementation: warm-up calls (the first compiles the kernel), then
# calls until this much time has passed, at least MIN_CALLS of them; the median counts.
WARMUP_CALLS = 2
TIME_MS = 5.0
MIN_CALLS = 3

# A timer gets the op's name, the implementation and one forward+backward call of it; it returns
# milliseconds per call. Tests inject one; the default runs the call.
Timer = Callable[[str, str, Callable[[], None]], float]


@dataclass(frozen=True)
class OpShapes:
    """What the ops of one micro-batch see on one rank (local heads and FFN slice under tensor
    parallelism, the rank's slice of the sequence for the norms under sequence parallelism)."""

    batch: int
    seq_len: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    norm_eps: float
    tp: int = 1
    fused_residual: bool = True
    fused_loss: bool = True

    @classmethod
    def of(cls, model: ModelConfig, *, micro_batch_size: int, seq_len: int, tp: int = 1,
           fused_residual: bool = True, fused_loss: bool = True) -> OpShapes:
        return cls(micro_batch_size, seq_len, model.dim, model.n_heads // tp,
                   model.n_kv_heads // tp, model.head_dim, model.ffn_hidden // tp,
                   model.vocab_size, model.norm_eps, tp, fused_residual, fused_loss and tp == 1)

    @property
    def loss_op(self) -> str:
        """The loss the trainer takes through ops: fused with the output projection (tp = 1),
        else of whole logits (under tp the vocabulary-parallel loss, which is not an op here)."""
        return "linear_cross_entropy" if self.fused_loss else "cross_entropy"

    @property
    def timed_ops(self) -> tuple[str, ...]:
        return ("rms_norm", "swiglu", "rotary", "attention", self.loss_op)


@dataclass
class KernelChoice:
    """The implementation of each op, how it was decided, and the timings (ms per forward +
    backward) it was decided on."""

    backend: str  # kernels.backend as configured
    how: str  # forced | deterministic | no CUDA | timed on rank 0
    ops: dict[str, str]  # op -> triton | torch
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # "op impl" -> why it could not run

    @property
    def resolved(self) -> str:
        """triton, torch, or mixed."""
        used = set(self.ops.values())
        return used.pop() if len(used) == 1 else "mixed"

    def kernel_ops(self) -> list[str]:
        return [op for op, impl in self.ops.items() if impl == "triton"]

    def summary(self) -> str:
        """One log line: the choice, and for a timed one every op's two timings."""
        head = f"kernels.backend = {self.backend}: {self.resolved} ({self.how})"
        if not self.timings_ms:
            return head
        parts = [f"{op} {self.ops[op]} ({t['triton']:.3g} vs {t['torch']:.3g} ms)"
                 for op, t in self.timings_ms.items()]
        failed = "".join(f"; {what} failed: {why}" for what, why in self.errors.items())
        return f"{head}; triton vs torch, forward+backward: " + ", ".join(parts) + failed

    def as_dict(self) -> dict[str, Any]:
        """For report.json: an implementation that could not run has null for its time."""
        timings = {op: {impl: ms if math.isfinite(ms) else None for impl, ms in t.items()}
                   for op, t in self.timings_ms.items()}
        return {**asdict(self), "timings_ms": timings, "resolved": self.resolved}


def default_timer(op: str, impl: str, call: Callable[[], None]) -> float:
    """Median milliseconds of `call` after WARMUP_CALLS, over TIME_MS of calls (MIN_CALLS at
    least), synchronising the GPU around each."""
    for _ in range(WARMUP_CALLS):
        call()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + TIME_MS / 1000
    while len(times) < MIN_CALLS or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _op_call(op: str, s: OpShapes, device: torch.device, dtype: torch.dtype
             ) -> Callable[[], None]:
    """One forward and backward of `op` through `ops` at the shapes `s`, with whatever
    implementation ops is set to when it is called."""
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, device=device, generator=gen) * scale
        return t.to(dtype).requires_grad_()

    tokens = s.batch * s.seq_len
    if op == "rms_norm":
        # Under sequence parallelism each rank normalises its slice of the sequence.
        rows = s.seq_len // s.tp if s.tp > 1 else s.seq_len
        x, w = leaf(s.batch, rows, s.dim), leaf(s.dim, scale=0.1)
        r = leaf(s.batch, rows, s.dim) if s.fused_residual else None
        fn = lambda: ops.rms_norm(x, w, s.norm_eps, residual=r)  # noqa: E731
    elif op == "swiglu":
        gate, up = leaf(s.batch, s.seq_len, s.ffn_hidden), leaf(s.batch, s.seq_len, s.ffn_hidden)
        fn = lambda: ops.swiglu(gate, up)  # noqa: E731
    elif op == "rotary":
        q = leaf(s.batch, s.seq_len, s.n_heads, s.head_dim)
        k = leaf(s.batch, s.seq_len, s.n_kv_heads, s.head_dim)
        angles = torch.rand(s.seq_len, s.head_dim // 2, device=device, generator=gen) * math.pi
        cos, sin = angles.cos(), angles.sin()
        fn = lambda: ops.rotary(q, k, cos, sin)  # noqa: E731
    elif op == "attention":
        q = leaf(s.batch, s.seq_len, s.n_heads, s.head_dim)
        k = leaf(s.batch, s.seq_len, s.n_kv_heads, s.head_dim)
        v = leaf(s.batch, s.seq_len, s.n_kv_heads, s.head_dim)
        fn = lambda: ops.attention(q, k, v, causal=True)  # noqa: E731
    elif op in ("linear_cross_entropy", "cross_entropy"):
        targets = torch.randint(0, s.vocab_size, (tokens,), device=device, generator=gen)
        if op == "linear_cross_entropy":
            hidden, weight = leaf(tokens, s.dim), leaf(s.vocab_size, s.dim, scale=0.02)
            fn = lambda: ops.linear_cross_entropy(hidden, weight, targets)  # noqa: E731
        else:
            logits = leaf(tokens, s.vocab_size)
            fn = lambda: ops.cross_entropy(logits, targets)  # noqa: E731
    else:
        raise AssertionError(op)
    grads: list[torch.Tensor] = []

    def call() -> None:
        out = fn()
        outs = list(out) if isinstance(out, tuple) else [out]
        if not grads:
            grads.extend(torch.randn(o.shape, device=device, generator=gen).to(o.dtype)
                         for o in outs)
        torch.autograd.backward(outs, grads)

    return call


def _time_ops(s: OpShapes, device: torch.device, dtype: torch.dtype, attention_backward: str,
              timer: Timer, errors: dict[str, str]) -> dict[str, dict[str, float]]:
    """ms per forward+backward of each op with each implementation; one that raises (a kernel
    that does not compile for this GPU, say) takes infinity and its error goes to `errors`."""
    timings: dict[str, dict[str, float]] = {}
    try:
        for op in s.timed_ops:
            call = _op_call(op, s, device, dtype)
            timings[op] = {}
            for impl in IMPLS:
                ops.set_backend(impl, device.type, attention_backward, kernel_ops=[op])
                try:
                    timings[op][impl] = float(timer(op, impl, call))
                except Exception as e:  # the other implementation is still there to use
                    timings[op][impl] = math.inf
                    errors[f"{op} {impl}"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            del call
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return timings


def _broadcast(timings: dict[str, dict[str, float]], ops_: tuple[str, ...],
               device: torch.device) -> dict[str, dict[str, float]]:
    """Rank 0's timings on every rank, in one collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return timings
    flat = [timings[op][impl] for op in ops_ for impl in IMPLS] if timings else []
    values = torch.tensor(flat or [math.nan] * (len(ops_) * len(IMPLS)), dtype=torch.float64,
                          device=device)
    dist.broadcast(values, src=0)
    it = iter(values.tolist())
    return {op: {impl: next(it) for impl in IMPLS} for op in ops_}


def choose_kernels(cfg: Config, *, tp: int, device: torch.device, dtype: torch.dtype,
                   attention_backward: str, timer: Timer | None = None) -> KernelChoice:
    """Decide each op's implementation for a run of `cfg` on `device` and set ops to it.

    Every rank must call it (a timed choice is a collective). `timer` replaces the default
    timing; given one, auto times on any device (tests time on a CPU)."""
    backend = cfg.kernels.backend
    on_cuda = device.type == "cuda"
    shapes = OpShapes.of(cfg.model, micro_batch_size=cfg.train.micro_batch_size,
                         seq_len=cfg.train.seq_len, tp=tp,
                         fused_residual=cfg.kernels.fused_residual,
                         fused_loss=cfg.kernels.fused_loss)
    timings: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    if backend != "auto":
        how, default = "forced", backend
    elif cfg.train.deterministic:
        how, default = "deterministic", "triton" if on_cuda else "torch"
    elif not on_cuda and timer is None:
        how, default = "no CUDA", "torch"
    else:
        how, default = "timed on rank 0", "triton"
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            timings = _time_ops(shapes, device, dtype, attention_backward,
                                timer or default_timer, errors)
        timings = _broadcast(timings, shapes.timed_ops, device)
    chosen = {op: default for op in ops.OPS}
    for op, t in timings.items():
        chosen[op] = "triton" if math.isfinite(t["triton"]) and t["triton"] <= t["torch"] \
            else "torch"
    choice = KernelChoice(backend, how, chosen, timings, errors)
    ops.set_backend("triton" if choice.kernel_ops() else "torch", device.type,
                    attention_backward, kernel_ops=choice.kernel_ops())
    return choice
