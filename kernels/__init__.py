"""Fused Triton kernels for the hot ops of a Llama 2 block (installed as llamatrain.kernels).

Each op is differentiable and matches its reference in `llamatrain.ops`. Without CUDA the kernels
run through Triton's interpreter, which must be switched on before Triton is first imported:
Triton decorates its own standard library (`tl.sum`, `tl.max`, ...) with `@triton.jit` at import
time, and `@triton.jit` reads `TRITON_INTERPRET` when it decorates. So this module sets the flag
before anything below imports Triton, and refuses to load if Triton was already imported without
it (for example by `torch._dynamo`, which imports Triton, run before this package on a CPU).

`LLAMATRAIN_KERNELS_AOT=1` marks a process that only compiles the kernels ahead of time for GPU
targets (see `compile_check`): it needs the real compiler, never the interpreter.
"""

from __future__ import annotations

import os
import sys

import torch

AOT_ENV = "LLAMATRAIN_KERNELS_AOT"


def _triton_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton.language"].sum, InterpretedFunction)


def _configure_interpreter() -> None:
    if os.environ.get(AOT_ENV) == "1":
        want_interpreter = False
    elif torch.cuda.is_available():
        return
    else:
        want_interpreter = True
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1" if want_interpreter else "0"
        return
    import triton.language  # noqa: F401  (so that triton.language is in sys.modules)

    if _triton_is_interpreted() != want_interpreter:
        mode = "with" if _triton_is_interpreted() else "without"
        need = "TRITON_INTERPRET=1 (no CUDA here)" if want_interpreter else "TRITON_INTERPRET=0"
        raise RuntimeError(
            f"llamatrain.kernels: triton was imported {mode} its interpreter before this package; "
            f"set {need} in the environment, or import llamatrain.kernels before anything that "
            "imports triton (torch._dynamo / torch.compile does)"
        )


_configure_interpreter()

from .attention import attention  # noqa: E402
from .cross_entropy import cross_entropy  # noqa: E402
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .rmsnorm import rms_norm  # noqa: E402
from .rotary import rotary  # noqa: E402
from .swiglu import swiglu  # noqa: E402

__all__ = ["attention", "cross_entropy", "linear_cross_entropy", "rms_norm", "rotary", "swiglu"]
