"""Launch plumbing shared by the kernels: the target a launch is for, and recording launches.

Every kernel launch goes through `launch`, so the ahead-of-time check (`compile_check`) can run
the real host code on meta tensors, for a GPU that is not here, and compile exactly the kernels,
block sizes and warp counts that code would launch.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from llamatrain.hardware import BY_ARCH, GPU

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Target:
    """What launch configurations depend on: CUDA arch (80 = sm_80; None: the interpreter), SM
    count, the shared memory one block may use (bytes; the opt-in limit) and the L2 cache size
    (bytes; 0 in the interpreter)."""

    arch: int | None
    num_sms: int
    shared_memory: int = 0
    l2_cache: int = 0


# The GPU each CUDA arch is built and checked for (A100, H100, consumer Blackwell: RTX 5090), with
# its SM limits, from llamatrain.hardware.
CHIPS: dict[int, GPU] = BY_ARCH


def chip_target(arch: int) -> Target:
    """The target a launch for CUDA arch `arch` is configured for, on its GPU of CHIPS."""
    chip = CHIPS[arch]
    return Target(arch, chip.num_sms, chip.sm.shared_memory_per_block, chip.l2_cache)


# Programs the interpreter runs for the reductions sized by SM count: a few, so tests exercise the
# cross-program reduction without paying for many slow interpreted programs.
_INTERPRETER_TARGET = Target(arch=None, num_sms=4)


@dataclass
class Launch:
    """One recorded launch: the Triton kernel, its arguments by name, its launch options and
    its grid."""

    kernel: Any
    args: dict[str, Any]
    options: dict[str, Any]
    grid: tuple[int, ...] = ()


@dataclass
class _Recorder:
    target: Target
    launches: list[Launch]


_recorder: _Recorder | None = None


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(
        arch=props.major * 10 + props.minor, num_sms=props.multi_processor_count,
        shared_memory=props.shared_memory_per_block_optin, l2_cache=props.L2_cache_size,
    )  # fmt: skip


def target(device: torch.device) -> Target:
    """The target a launch on `device` is configured for."""
    if _recorder is not None:
        return _recorder.target
    if device.type == "cuda" and not INTERPRETED:
        return _cuda_target(device.index if device.index is not None else 0)
    return _INTERPRETER_TARGET


def traceable(kernel: Any) -> Any:
    """`kernel` as a launch inside a `triton_op` must call it: through `wrap_triton`, so that
    torch.compile can trace the launch, when it is a compiled kernel; the interpreter's function
    as it is (torch 2.11 refuses to wrap it, and nothing traces an interpreted launch: FakeTensors
    hold no data for the interpreter to read)."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return wrap_triton(kernel)
    return kernel


def launch(
    kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int, num_stages: int = 1,
    **constexprs: Any,
) -> None:
    """Launch the `@triton.jit` function `kernel` or record it for `compile_check`."""
    # FMA contraction stated explicitly: Triton 3.9 warns that its default will change.
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if _recorder is not None:
        names = kernel.arg_names
        values = dict(zip(names, args, strict=False)) | constexprs
        if len(args) > len(names) or set(values) != set(names):
            raise TypeError(f"{kernel.__name__}: arguments {sorted(values)} != {sorted(names)}")
        _recorder.launches.append(Launch(kernel, values, options, tuple(grid)))
        return
    traceable(kernel)[grid](*args, **options, **constexprs)


@contextlib.contextmanager
def record_launches(target_: Target) -> Iterator[list[Launch]]:
    """Record instead of running every launch made inside, configured for `target_`."""
    global _recorder
    previous = _recorder
    _recorder = _Recorder(target_, [])
    try:
        yield _recorder.launches
    finally:
        _recorder = previous


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as a 2-D (rows, last dim) view with unit column stride, copying only when it must."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


def row_warps(block: int) -> int:
    """Warps for a program that reduces over `block` elements of one row."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full fp32 products (matching the fp32 reference); tf32 would lose bits."""
    return "ieee" if dtype == torch.float32 else "tf32"
