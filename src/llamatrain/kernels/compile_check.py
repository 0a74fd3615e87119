"""Compile every kernel ahead of time for A100 (sm_80), H100 (sm_90) and consumer Blackwell
(sm_120), with no GPU present, and report what each compiled kernel costs the chip.

`python -m llamatrain.kernels.compile_check` runs each op's real host code (forward and backward)
on meta tensors of Llama 2 7B and 70B shapes in bf16, records the launches it would make for that
GPU (kernel, argument types, block sizes, warps, stages), compiles each distinct one with
`triton.compile`, runs the ptxas that Triton itself uses with `-v` on the PTX, and prints one row
per kernel x arch (with the shapes that launch it): registers per thread, spill bytes, shared
memory against the chip's per-block limit, occupancy (resident warps over the SM's maximum), the
tensor-core instruction the PTX uses (mma.sync = `mma`, Hopper's warpgroup MMA = `wgmma`) and the
number of GEMMs in the kernel (distinct `tl.dot` calls in the source; one inlined into two loops
counts once, so it is the GEMMs per block pair). `--json` prints the rows as JSON instead.

It exits non-zero if a kernel fails to compile, spills registers, or needs more shared memory per
block than the chip has.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import importlib
import json
import math
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

from llamatrain.hardware import GPU
from llamatrain.kernels import AOT_ENV
from llamatrain.kernels._runtime import CHIPS, chip_target


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
    """One compiled kernel for one arch: what ptxas and Triton report about it."""

    arch: int
    kernel: str
    shapes: list[str]
    config: str
    shared: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    num_warps: int = 4
    occupancy: float | None = None
    tensor_cores: str = "-"
    gemms: int = 0
    error: str | None = None

    @property
    def shared_limit(self) -> int:
        return CHIPS[self.arch].sm.shared_memory_per_block

    @property
    def problems(self) -> list[str]:
        """Why this kernel fails the check; empty when it passes."""
        if self.error is not None:
            return [self.error]
        found = []
        if self.shared is None or self.shared > self.shared_limit:
            found.append("over the shared memory limit")
        if self.spill_stores is None or self.spill_stores or self.spill_loads:
            found.append("spills registers")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "shared_limit": self.shared_limit, "ok": self.ok, "problems": self.problems,
        }  # fmt: skip


COLUMNS = ("arch", "kernel", "shapes", "regs", "spill B", "shared KB", "occ", "tc", "gemms")
WIDTHS = (6, 34, 7, 4, 7, 13, 4, 9, 5)


def _row(cells: tuple[str, ...]) -> str:
    return " ".join(f"{c:<{w}}" for c, w in zip(cells, WIDTHS, strict=True))


def table_header() -> str:
    return _row(COLUMNS) + " verdict  config"


def table_line(r: Result) -> str:
    """One row of the table: measured figures, the verdict (`ok` or FAILED: why), the config."""
    if r.error is not None:
        cells = (f"sm_{r.arch}", r.kernel, "+".join(r.shapes), "?", "?", "?", "?", "?", "?")
    else:
        spill = "?" if r.spill_stores is None else str(r.spill_stores + (r.spill_loads or 0))
        cells = (
            f"sm_{r.arch}", r.kernel, "+".join(r.shapes), str(r.registers), spill,
            f"{(r.shared or 0) / 1024:.1f}/{r.shared_limit // 1024}",
            "?" if r.occupancy is None else f"{r.occupancy:.0%}", r.tensor_cores, str(r.gemms),
        )  # fmt: skip
    verdict = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
    return f"{_row(cells)} {verdict}  {r.config}"


def occupancy(chip: GPU, registers: int, shared: int, num_warps: int) -> float:
    """Resident warps over the SM's maximum, from the limits that bound resident blocks:
    registers (allocated per warp in units of 256), shared memory (1 KB of it reserved per block
    by the CUDA runtime), threads and blocks per SM."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = chip.sm.registers_per_sm // regs_per_warp // num_warps
    by_shared = chip.sm.shared_memory_per_sm // (shared + 1024)
    by_threads = chip.sm.max_threads_per_sm // (32 * num_warps)
    blocks = min(by_registers, by_shared, by_threads, chip.sm.max_blocks_per_sm)
    return blocks * num_warps / (chip.sm.max_threads_per_sm // 32)


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def record_model_launches(shape: ModelShape, arch: int) -> list:
    """Every launch the ops' forward and backward make at `shape`, configured for `arch`."""
    # The package exports functions named like their modules, so import the modules by path.
    _runtime, attention, cross_entropy, linear_ce, rmsnorm, rotary, swiglu = (
        importlib.import_module(f"llamatrain.kernels.{name}")
        for name in ("_runtime", "attention", "cross_entropy", "linear_cross_entropy", "rmsnorm",
                     "rotary", "swiglu")
    )  # fmt: skip
    rows = shape.batch * shape.seq_len
    b, s, hd = shape.batch, shape.seq_len, shape.head_dim
    with _runtime.record_launches(chip_target(arch)) as launches:
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
        attention._backward(q, q, k, k, q, lse, True, False)
        attention._backward(q, q, k, k, q, lse, True, True)  # kernels.attention_backward

        logits = _meta(b, s, shape.vocab_size)
        targets = torch.empty(b, s, dtype=torch.int64, device="meta")
        cross_entropy._forward(logits, targets, -100, True)
        cross_entropy._forward(logits, targets, -100, False)  # evaluation: the loss alone
        # The fused linear cross-entropy: the same kernel on chunks, gradient over the logits.
        linear_ce._forward(x.view(rows, -1), _meta(shape.vocab_size, shape.dim),
                           targets.view(-1), -100, True)  # fmt: skip
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


def ptxas_report(ptx: str, arch: int, enable_fp_fusion: bool) -> str:
    """ptxas -v's report on `ptx`, from the ptxas and flags Triton compiles `arch` with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        fmad = [] if enable_fp_fusion else ["--fmad=false"]
        done = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", os.devnull],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()[-300:]}")
    return done.stderr + done.stdout


def parse_ptxas(report: str) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) from a ptxas -v report."""
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report: {report.strip()[-300:]}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def tensor_core_kind(ptx: str) -> str:
    """The tensor-core instructions in `ptx`: wgmma (Hopper), mma (mma.sync), both, or -."""
    kinds = [name for name, op in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if op in ptx]
    return "+".join(kinds) or "-"


_LOC = re.compile(r"^#(loc\d*) = loc\((.*)\)$", re.M)


def count_gemms(ttir: str) -> int:
    """Distinct `tl.dot` calls in the source of a kernel's Triton IR: each dot's location is
    followed through inlined calls to the line of the `tl.dot` itself."""
    locs = dict(_LOC.findall(ttir))

    def source(ref: str) -> str:
        for _ in range(64):  # location chains are short; bounded in case of a cycle
            text = locs.get(ref, ref)
            m = re.match(r"callsite\(#(loc\d*) at", text)
            m = m or re.match(r'"[^"]*"\(#(loc\d*)\)$', text)
            if m is None:
                return text
            ref = m.group(1)
        return ref

    dots = re.findall(r"= tt\.dot .* loc\(#(loc\d*)\)$", ttir, re.M)
    return len({source(ref) for ref in dots})


def compile_launch(launch, arch: int) -> Result:
    """Compile one recorded launch for `arch` (Triton's on-disk cache applies) and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget

    num_warps = launch.options["num_warps"]
    result = Result(arch, launch.kernel.__name__, [], _describe(launch), num_warps=num_warps)
    src, _ = _source(launch)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
        report = ptxas_report(compiled.asm["ptx"], arch, launch.options["enable_fp_fusion"])
        result.registers, result.spill_stores, result.spill_loads = parse_ptxas(report)
    except Exception as e:  # noqa: BLE001  (every compiler failure is reported, then counted)
        result.error = " ".join(str(e).split())[:300]
        return result
    result.shared = compiled.metadata.shared
    result.occupancy = occupancy(CHIPS[arch], result.registers, result.shared, num_warps)
    result.tensor_cores = tensor_core_kind(compiled.asm["ptx"])
    result.gemms = count_gemms(compiled.asm["ttir"])
    return result


def causal_busy(n_blocks: int, n_heads: int, slots: int, heads_first: bool) -> float:
    """Fraction of `slots` (resident programs, all SMs) kept busy by the causal dK/dV programs
    of `n_heads` (batch x kv heads) x `n_blocks` key blocks, key block j costing n_blocks - j,
    when each program starts on the first free slot in issue order (list scheduling). Issue
    order: all heads of block 0, then of block 1, ... (`heads_first`, the kernels' grid) or
    head by head, each from its heaviest block."""
    if heads_first:
        order = [j for j in range(n_blocks) for _ in range(n_heads)]
    else:
        order = [j for _ in range(n_heads) for j in range(n_blocks)]
    free = [0] * slots
    end = total = 0
    for j in order:
        finish = heapq.heappop(free) + n_blocks - j
        heapq.heappush(free, finish)
        end, total = max(end, finish), total + n_blocks - j
    return total / (slots * end)


def balance_lines(results: list[Result], shape: ModelShape = SHAPES[1]) -> list[str]:
    """For each arch: how busy the attention backward keeps the GPU at `shape` (batch 1, the
    worst case), in the kernels' issue order and head by head."""
    lines = []
    for r in results:
        if (r.kernel != "_attn_bwd_dkdv_kernel" or "ATOMIC_DQ=True" not in r.config
                or shape.name not in r.shapes or r.occupancy is None):  # fmt: skip
            continue
        chip = CHIPS[r.arch]
        launch = next(
            launch for launch in record_model_launches(shape, r.arch)
            if launch.kernel.__name__ == r.kernel and launch.args["ATOMIC_DQ"]
        )  # fmt: skip
        n_heads, n_blocks = launch.grid
        per_sm = round(r.occupancy * chip.sm.max_threads_per_sm / 32 / r.num_warps)
        slots = chip.num_sms * per_sm
        ours = causal_busy(n_blocks, n_heads, slots, heads_first=True)
        by_head = causal_busy(n_blocks, n_heads, slots, heads_first=False)
        lines.append(
            f"sm_{r.arch} causal attention backward at {shape.name}, batch {shape.batch}: "
            f"{ours:.0%} of {slots} program slots busy, heaviest blocks first across all heads "
            f"({by_head:.0%} head by head)"
        )
    return lines


# Filled before the worker processes fork, so each reads its launch by index, unpickled.
_PENDING: list[tuple[object, int]] = []


def _compile_pending(index: int) -> Result:
    launch, arch = _PENDING[index]
    return compile_launch(launch, arch)


def check(
    archs: list[int], shapes: tuple[ModelShape, ...] = SHAPES,
    show: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Compile every distinct launch of every shape for every arch; one Result per kernel,
    each passed to `show` as soon as it is measured."""
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
            if show is not None:
                show(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, action="append",
        help=f"CUDA compute capability to compile for, one of {sorted(CHIPS)} "
             "(A100, H100, RTX 5090); repeatable; default: all",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = parser.parse_args(argv)
    archs = args.arch or sorted(CHIPS)
    for arch in archs:
        if arch not in CHIPS:
            print(f"compile_check: --arch {arch}: expected one of {sorted(CHIPS)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    if os.environ.get(AOT_ENV) != "1":
        raise RuntimeError(f"compile_check needs a process started with {AOT_ENV}=1")
    start = time.monotonic()
    if args.json:
        results = check(archs)
        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        print(table_header(), flush=True)
        results = check(archs, show=lambda r: print(table_line(r), flush=True))
    for line in balance_lines(results):
        print(line, file=sys.stderr if args.json else sys.stdout)
    failed = [r for r in results if not r.ok]
    print(f"compile_check: {len(results)} kernels compiled in {time.monotonic() - start:.1f} s, "
          f"{len(failed)} failed", file=sys.stderr if args.json else sys.stdout)  # fmt: skip
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
