"""Float8 training through torchao (`train.float8`, the optional extra `llamatrain[float8]`).

`tensorwise` or `rowwise` turns the seven linears of every block (attention wq, wk, wv, wo;
feed-forward w1, w2, w3) into torchao's Float8Linear, whose matmuls take e4m3 inputs and weights
(and e5m2 output gradients under tensorwise) with dynamic scales: one per tensor, or one per row.
The token embedding and the output projection stay in bf16, as do attention, the norms and the
loss, and so does a linear whose dims on one rank are not multiples of 16 (what torch._scaled_mm
takes). The parameters stay what they were: Float8Linear keeps `weight` (fp32 master, bf16
compute copy under FSDP), so checkpoints hold the same tensors under the same names as a bf16 run.

Under FSDP2 (dp_shard > 1), tensorwise all-gathers the weights in float8 (half of bf16's bytes)
with scales precomputed for all weights in one all-reduce after each optimizer step
(after_optimizer_step); rowwise gathers in bf16. Under tensor parallelism, tensorwise uses
torchao's float8 TP styles (the sequence all-gathers in float8), rowwise the plain ones.

torchao's float8 is meant to run under torch.compile (`parallel.compile = true`), which fuses the
amax, scale and cast of each operand into the neighbouring kernels. Without it every cast is a
pass of its own over the weights and activations, and a float8 step is usually slower than a bf16
one: the trainer says so in its log. On a CPU the matmuls are emulated in fp32 on float8-rounded
operands (torchao's `emulate`), which is how the tests check the numerics; on CUDA never.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamatrain.config import FLOAT8_MODES
from llamatrain.hardware import FP8_MIN_ARCH, has_fp8

if TYPE_CHECKING:  # the rules above the Float8 class serve plan and flops, which run without torch
    import torch
    import torch.nn as nn

# The block linears float8 may convert, and how tensor parallelism splits each (DESIGN: wq, wk,
# wv, w1, w3 by output columns, wo and w2 by input rows).
BLOCK_LINEARS = {"attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
                 "attention.wo": "rowwise", "feed_forward.w1": "colwise",
                 "feed_forward.w2": "rowwise", "feed_forward.w3": "colwise"}
# torch._scaled_mm needs both dims of each operand to be multiples of 16.
ALIGNMENT = 16
INSTALL = "pip install 'llamatrain[float8]'"
_BLOCK_FQN = re.compile(r"layers\.\d+\.(.+)")


def eligible(name: str, out_features: int, in_features: int, *, tp: int = 1) -> bool:
    """Whether float8 converts the block linear `name` (e.g. "attention.wq") of this shape when
    tensor parallelism splits it tp ways: both dims of its per-rank shard multiples of 16."""
    split = BLOCK_LINEARS.get(name)
    if split is None:
        return False
    out_local = out_features / tp if split == "colwise" else out_features
    in_local = in_features / tp if split == "rowwise" else in_features
    return all(d == int(d) and int(d) % ALIGNMENT == 0 for d in (out_local, in_local))


def check_device(mode: str, *, arch: int | None, device_name: str) -> None:
    """One line when `mode` asks for float8 on a GPU without fp8 tensor cores (arch: the CUDA
    compute capability, 90 = sm_90; None for a CPU, which emulates)."""
    if mode != "none" and arch is not None and not has_fp8(arch):
        raise ValueError(
            f"train.float8 = {mode!r}: {device_name} (sm_{arch}) has no float8 tensor cores "
            f"(they need sm_{FP8_MIN_ARCH} or newer: L4, H100, H200, B200); use train.float8 = "
            "'none'")


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


class _DropCudaExtensionNotices(logging.Filter):
    """torchao's import logs that its CUDA extensions (_C_*.so) cannot load, and torch logs a
    deprecation about an enum torchao registers: on a CPU, where emulation uses neither, both are
    noise. Only those two records are dropped, and only on a CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") and "/torchao/_C" in message
                    or "is an Enum subclass and is now natively supported" in message)


@contextmanager
def _quiet_import(device_type: str) -> Iterator[None]:
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    notices = _DropCudaExtensionNotices()
    if device_type != "cuda":
        for log in loggers:
            log.addFilter(notices)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(notices)


def _torchao(mode: str, device_type: str):
    try:
        with _quiet_import(device_type):
            import torchao.float8 as ao_float8
    except ImportError:
        raise ValueError(f"train.float8 = {mode!r}: torchao is not installed ({INSTALL})"
                         ) from None
    return ao_float8


@dataclass
class Float8:
    """The float8 conversion of one run: which recipe, whether emulated, and the hooks that
    parallelize() and the training loop call."""

    mode: str
    emulate: bool
    converted: list[str] = dataclasses.field(default_factory=list)
    fsdp_float8_all_gather: bool = False

    @classmethod
    def for_run(cls, mode: str, device: torch.device) -> Float8 | None:
        """None for train.float8 = 'none'; a ValueError (one line) when torchao is missing or the
        GPU has no float8 tensor cores."""
        if mode == "none":
            return None
        if mode not in FLOAT8_MODES:
            raise ValueError(f"train.float8 = {mode!r}: expected one of "
                             f"{', '.join(FLOAT8_MODES)}")
        check_device(mode, arch=_arch(device), device_name=_device_name(device))
        _torchao(mode, device.type)
        return cls(mode, emulate=device.type != "cuda")

    def convert(self, model: nn.Module, *, tp: int, dp_shard: int) -> list[str]:
        """Swap the eligible block linears of `model` (on any device, meta included) for
        Float8Linear in place; returns their names."""
        import torch.nn as nn

        ao = _torchao(self.mode, "cpu" if self.emulate else "cuda")
        # float8 all-gather only pays where FSDP gathers, and exists for tensorwise scales only.
        self.fsdp_float8_all_gather = self.mode == "tensorwise" and dp_shard > 1
        config = dataclasses.replace(ao.Float8LinearConfig.from_recipe_name(self.mode),
                                     emulate=self.emulate,
                                     enable_fsdp_float8_all_gather=self.fsdp_float8_all_gather)
        names: list[str] = []

        def keep(module: nn.Module, fqn: str) -> bool:
            match = _BLOCK_FQN.fullmatch(fqn)
            ok = (isinstance(module, nn.Linear) and match is not None
                  and eligible(match.group(1), module.out_features, module.in_features, tp=tp))
            if ok:
                names.append(fqn)
            return ok

        if self.mode == "rowwise":
            # As torchtitan does: compiled rowwise float8 next to an RMSNorm has produced NaNs
            # (pytorch#150859, open) unless inductor rounds low-precision casts as eager does.
            import torch._inductor.config

            torch._inductor.config.emulate_precision_casts = True
        ao.convert_to_float8_training(model, config=config, module_filter_fn=keep)
        self.converted = names
        return names

    def tp_styles(self, block: nn.Module) -> dict[str, Callable[..., object]]:
        """The float8 TP styles that replace the plain ones of a block's plan (tensorwise only),
        each built from the plain one's arguments: each converted linear's, and the input
        preparation of attention or the feed-forward when every linear reading that input is
        converted (its input is then cast before the all-gather, which moves float8)."""
        # Gloo has no float8 dtype: emulated (CPU) runs cast after the all-gather, as rowwise does,
        # with the same scales (the amax is the global one either way).
        if self.mode != "tensorwise" or self.emulate:
            return {}
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        def prepare(**kwargs) -> PrepareFloat8ModuleInput:
            # The float8 input stays a DTensor into the float8 linears, as torchtitan passes it
            # (they accept one; their outputs are local tensors again).
            return PrepareFloat8ModuleInput(**{**kwargs, "use_local_output": False})

        styles: dict[str, Callable[..., object]] = {}
        readers = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}
        for name, split in BLOCK_LINEARS.items():
            if isinstance(block.get_submodule(name), Float8Linear):
                styles[name] = (Float8ColwiseParallel if split == "colwise"
                                else Float8RowwiseParallel)
        for parent, children in readers.items():
            if all(f"{parent}.{c}" in styles for c in children):
                styles[parent] = prepare
        return styles

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Precompute the float8 scales of the next all-gathers, all weights in one all-reduce."""
        if self.fsdp_float8_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(model)

    def describe(self, *, compiled: bool) -> str:
        """The log line of a run: what was converted, and what to expect."""
        gather = ", float8 FSDP all-gather" if self.fsdp_float8_all_gather else ""
        how = "emulated in fp32 (CPU)" if self.emulate else "float8 tensor cores"
        line = f"float8 {self.mode}: {len(self.converted)} linears{gather}, {how}"
        if not compiled and not self.emulate:
            line += ("; parallel.compile = false: the float8 casts run unfused, usually slower "
                     "than bf16 (set parallel.compile = true)")
        return line


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)
