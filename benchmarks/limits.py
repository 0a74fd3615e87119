"""This GPU's own limits, measured at the start of a benchmark run: device-to-device copy bandwidth
and bf16 matmul throughput. Every kernel's "fraction of limit" is its GB/s or TFLOP/s over these,
so a number says how close a kernel comes to what this very machine can do, not to a data sheet.

Also the timer every benchmark here uses: the median of `triton.testing.do_bench` on CUDA (which
flushes the L2 cache before each call), of `time.perf_counter` around calls on a CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> float:
    """Median time of one call of fn, in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        try:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                  return_mode="median"))
        except TypeError:  # a Triton without return_mode
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                  quantiles=[0.5]))
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def copy_gbs(device: torch.device, *, nbytes: int = 1 << 30, rep_ms: float = 100) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    return 2 * nbytes / (ms / 1000) / 1e9


def matmul_tflops(
    device: torch.device, *, n: int = 8192, dtype: torch.dtype = torch.bfloat16, rep_ms: float = 100
) -> float:
    """Square matmul throughput in TFLOP/s (2 n^3 FLOPs per product)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b, out=out), device, rep_ms=rep_ms)
    return 2 * n**3 / (ms / 1000) / 1e12


def measure(device: torch.device, *, quick: bool = False) -> dict[str, float]:
    """Both limits: {"copy_gbs", "matmul_tflops"} (small sizes when quick: a smoke test only)."""
    if quick:
        result = {"copy_gbs": copy_gbs(device, nbytes=1 << 24, rep_ms=20),
                  "matmul_tflops": matmul_tflops(device, n=512, rep_ms=20)}
    else:
        result = {"copy_gbs": copy_gbs(device), "matmul_tflops": matmul_tflops(device)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def section(ctx: Any) -> dict[str, Any]:
    """`make gpu-check`'s limits: both measured, beside the data sheet's bf16 peak
    (llamatrain.hardware); tiny sizes in the rehearsal."""
    from llamatrain.hardware import from_name, peak_flops

    device = torch.device("cpu" if ctx.rehearsal else "cuda")
    name = "cpu" if ctx.rehearsal else torch.cuda.get_device_name(device)
    result: dict[str, Any] = {"device": name, **measure(device, quick=ctx.rehearsal)}
    peak = peak_flops(name, "bf16")
    gpu = from_name(name)
    result["datasheet"] = {"gpu": gpu.key if gpu else None,
                           "bf16_tflops": peak / 1e12 if peak else None,
                           "memory_gib": gpu.memory_gib if gpu else None}
    result["matmul_of_datasheet"] = result["matmul_tflops"] * 1e12 / peak if peak else None
    return result


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(measure(dev, quick=dev.type == "cpu"))
