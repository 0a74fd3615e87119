"""Compile every kernel ahead of time for A100 (sm_80) and H100 (sm_90), with no GPU present.

`python -m llamatrain.kernels.compile_check --arch 80 --arch 90` runs each op's real host code
(forward and backward) on meta tensors of Llama 2 7B and 70B shapes in bf16, records the launches
it would make for that GPU (kernel, argument types, block sizes, warps, stages), compiles each
distinct one with `triton.compile`, and prints one line per kernel and arch with its shared memory,
registers and stack (spill) bytes per thread. It exits non-zero if a kernel fails to compile or
needs more shared memory per block than the chip has.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from llamatrain.kernels import AOT_ENV

# Shared memory a block may use, and SM count, per arch (the A100 and H100 datasheets).
SHARED_MEMORY_BYTES = {80: 163 * 1024, 90: 227 * 1024}
NUM_SMS = {80: 108, 90: 132}


@dataclass(frozen=True)
class ModelShape:
    name: str
    dim: int
    ffn_hidden: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int = 32000
    seq_len: int = 4096
    batch: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SHAPES = (
    ModelShape("7B", dim=4096, ffn_hidden=11008, n_heads=32, n_kv_heads=32),
    ModelShape("70B", dim=8192, ffn_hidden=28672, n_heads=64, n_kv_heads=8),
)


@dataclass
class Result:
    arch: int
    kernel: str
    shapes: list[str]
    config: str
    shared: int | None = None
    registers: int | None = None
    stack: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared is not None and (
            self.shared <= SHARED_MEMORY_BYTES[self.arch]
        )

    def line(self) -> str:
        head = f"sm_{self.arch}  {self.kernel:<30} {'+'.join(self.shapes):<7} {self.config}"
        if self.error is not None:
            return f"{head}  FAILED: {self.error}"
        limit = SHARED_MEMORY_BYTES[self.arch]
        regs = "?" if self.registers is None else str(self.registers)
        stack = "?" if self.stack is None else str(self.stack)
        verdict = "ok" if self.ok else "FAILED: over the shared memory limit"
        return (
            f"{head}  shared {self.shared / 1024:.1f}/{limit // 1024} KB  regs {regs}  "
            f"stack {stack} B  {verdict}"
        )


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def record_model_launches(shape: ModelShape, arch: int) -> list:
    """Every launch the ops' forward and backward make at `shape`, configured for `arch`."""
    # The package exports functions named like their modules, so import the modules by path.
    _runtime, attention, cross_entropy, rmsnorm, rotary, swiglu = (
        importlib.import_module(f"llamatrain.kernels.{name}")
        for name in ("_runtime", "attention", "cross_entropy", "rmsnorm", "rotary", "swiglu")
    )
    rows = shape.batch * shape.seq_len
    b, s, hd = shape.batch, shape.seq_len, shape.head_dim
    with _runtime.record_launches(_runtime.Target(arch, NUM_SMS[arch])) as launches:
        x = _meta(b, s, shape.dim)
        w = _meta(shape.dim)
        rstd = _meta(rows, dtype=torch.float32)
        rmsnorm._forward(x, w, 1e-5, None)
        rmsnorm._forward(x, w, 1e-5, x)
        rmsnorm._backward(x, None, x.view(rows, -1), w, rstd)
        rmsnorm._backward(x, x, x.view(rows, -1), w, rstd)

        g = _meta(b, s, shape.ffn_hidden)
        swiglu._forward(g, g)
        swiglu._backward(g, g, g)

        q = _meta(b, s, shape.n_heads, hd)
        k = _meta(b, s, shape.n_kv_heads, hd)
        table = _meta(s, hd // 2, dtype=torch.float32)
        rotary._rotate(q, k, table, table, 0, 1.0)
        rotary._rotate(q, k, table, table, 0, -1.0)

        lse = _meta(b, shape.n_heads, s, dtype=torch.float32)
        attention._forward(q, k, k, True)
        attention._backward(q, q, k, k, q, lse, True)

        logits = _meta(b, s, shape.vocab_size)
        targets = torch.empty(b, s, dtype=torch.int64, device="meta")
        cross_entropy._forward(logits, targets, -100, True)
        cross_entropy._forward(logits, targets, -100, False)  # evaluation: the loss alone
    return launches


def _specializer() -> Callable[[object], tuple[str, object]]:
    """(type, specialisation key) of one argument, exactly as Triton's launcher derives them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    return lambda arg: native_specialize_impl(CUDABackend, arg, False, True, True)


def _source(launch) -> tuple[object, str]:
    """The ASTSource of a recorded launch, and a key that identifies its compiled kernel."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    specialize = _specializer()
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(launch.kernel.params):
        value = launch.args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        kind, key = specialize(value)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    key = repr((launch.kernel.__name__, signature, constexprs, attrs, launch.options))
    return src, key


def _describe(launch) -> str:
    params = [p.name for p in launch.kernel.params if p.is_constexpr]
    shown = " ".join(f"{name}={launch.args[name]}" for name in params)
    return f"{shown} warps={launch.options['num_warps']} stages={launch.options['num_stages']}"


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread) from cuobjdump; stack > 0 means spills."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
    registers = re.search(r"REG:(\d+)", dump)
    stack = re.search(r"STACK:(\d+)", dump)
    return (int(registers.group(1)) if registers else None, int(stack.group(1)) if stack else None)


def compile_launch(launch, arch: int) -> Result:
    """Compile one recorded launch for `arch` (Triton's on-disk cache applies) and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(arch, launch.kernel.__name__, [], _describe(launch))
    src, _ = _source(launch)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
    except Exception as e:  # noqa: BLE001  (every compiler failure is reported, then counted)
        result.error = " ".join(str(e).split())[:300]
        return result
    result.shared = compiled.metadata.shared
    result.registers, result.stack = _resource_usage(compiled.asm["cubin"])
    return result


# Filled before the worker processes fork, so each reads its launch by index, unpickled.
_PENDING: list[tuple[object, int]] = []


def _compile_pending(index: int) -> Result:
    launch, arch = _PENDING[index]
    return compile_launch(launch, arch)


def check(archs: list[int], shapes: tuple[ModelShape, ...] = SHAPES) -> list[Result]:
    """Compile every distinct launch of every shape for every arch; one Result per kernel."""
    distinct: dict[tuple[int, str], tuple[object, list[str]]] = {}
    for arch in archs:
        for shape in shapes:
            for launch in record_model_launches(shape, arch):
                _, key = _source(launch)
                _, names = distinct.setdefault((arch, key), (launch, []))
                if shape.name not in names:
                    names.append(shape.name)
    _PENDING[:] = [(launch, arch) for (arch, _), (launch, _) in distinct.items()]
    workers = max(1, min(len(_PENDING), os.cpu_count() or 1))
    # Compiling is CPU-bound Python and ptxas; processes, forked so nothing needs pickling.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = []
        for result, (_, names) in zip(
            pool.map(_compile_pending, range(len(_PENDING))), distinct.values(), strict=True
        ):
            result.shapes = names
            results.append(result)
            print(result.line(), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, action="append", required=True,
        help="CUDA compute capability to compile for: 80 (A100) or 90 (H100); repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for arch in args.arch:
        if arch not in SHARED_MEMORY_BYTES:
            print(f"compile_check: --arch {arch}: expected one of {sorted(SHARED_MEMORY_BYTES)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    if os.environ.get(AOT_ENV) != "1":
        raise RuntimeError(f"compile_check needs a process started with {AOT_ENV}=1")
    start = time.monotonic()
    results = check(args.arch)
    failed = [r for r in results if not r.ok]
    print(f"compile_check: {len(results)} kernels compiled in {time.monotonic() - start:.1f} s, "
          f"{len(failed)} failed")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get(AOT_ENV) != "1":
        # This process loaded the kernels for Triton's interpreter (no CUDA here), which cannot
        # compile for a GPU: run again as a compile-only process.
        sys.stdout.flush()
        module = "llamatrain.kernels.compile_check"
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
                  dict(os.environ, **{AOT_ENV: "1"}))  # fmt: skip
    sys.exit(main())
