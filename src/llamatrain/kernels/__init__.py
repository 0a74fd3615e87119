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


def _interpreter_loop_bounds() -> None:
    """Let the interpreter of Triton 3.6 take runtime loop bounds with numpy >= 2.4.

    That interpreter holds every runtime scalar (a kernel argument, `tl.program_id`, a
    `tl.minimum` of them) as a one-element array and makes a loop bound of it with
    `int(array)`, which numpy 2.4 refuses for an array of one dimension: every loop whose bound
    is not a constexpr fails ("only 0-dimensional arrays can be converted to Python scalars"),
    and no kernel source can make a runtime bound anything else there. Newer Triton squeezes the
    array first; this gives an interpreter that fails the probe below that same `__index__`.
    Compiled kernels are not touched."""
    import operator
    from types import SimpleNamespace

    import numpy as np
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_llamatrain", False):
        return

    class Probe:
        handle = SimpleNamespace(data=np.array([3]))

    scope = interpreter._LangPatchScope()
    patch_tensor(Probe, scope)
    try:
        operator.index(Probe())
        return  # this interpreter takes one-element arrays as loop bounds
    except TypeError:
        pass
    finally:
        scope.restore()

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._llamatrain = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_configure_interpreter()
if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_loop_bounds()

from .attention import attention  # noqa: E402
from .cross_entropy import cross_entropy  # noqa: E402
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .rmsnorm import rms_norm  # noqa: E402
from .rotary import rotary  # noqa: E402
from .swiglu import swiglu  # noqa: E402

__all__ = ["attention", "cross_entropy", "linear_cross_entropy", "rms_norm", "rotary", "swiglu"]
