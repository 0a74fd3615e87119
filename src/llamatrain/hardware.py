"""The GPUs llamatrain knows, one record each: memory, NVLink bandwidth, dense tensor-core peaks
per dtype, thermal design power, and the per-SM limits the kernels are launched and checked for.

Every other module asks here: the planner (memory, NVLink, peaks), MFU (peaks), carbon (TDP) and
the kernels' ahead-of-time check (SM limits by CUDA arch). A device is found by its key
("h100-80gb", or a prefix of one: "a100" is a100-80gb) or by the name torch.cuda.get_device_name()
reports, matched by substrings of the lower-cased name (the row matching most of them).

Figures are NVIDIA's data sheets (dense, no sparsity): bf16 and fp16 share one peak, fp8 is
e4m3/e5m2 on Hopper (A100 has none); per-SM limits are the CUDA programming guide's table of
compute capabilities. The bandwidth inside a node is nccl-tests' bus bandwidth among 8 GPUs
(approximate): NVLink on SXM parts, PCIe on the others (about 20 GB/s Gen4, 40 GB/s Gen5).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SMLimits:
    """What decides whether a kernel launches on one GPU generation, and how many of its blocks
    share an SM."""

    shared_memory_per_block: int  # opt-in maximum of one block, bytes
    shared_memory_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 65536


SM80 = SMLimits(163 * 1024, 164 * 1024, 2048, 32)
SM90 = SMLimits(227 * 1024, 228 * 1024, 2048, 32)
SM120 = SMLimits(99 * 1024, 100 * 1024, 1536, 32)


@dataclass(frozen=True)
class GPU:
    key: str  # what --device takes
    name: str  # what torch.cuda.get_device_name() says
    patterns: tuple[str, ...]  # all of them in the lower-cased device name
    arch: int  # CUDA compute capability, 80 = sm_80
    num_sms: int
    l2_cache: int  # bytes
    sm: SMLimits
    memory_gib: float
    tdp_w: float
    intra_node_gbs: float  # GPU-to-GPU bus bandwidth inside a node: NVLink, or PCIe
    # Dense peaks in TFLOP/s; a dtype missing here has no tensor-core path on the part.
    peak_tflops: dict[str, float] = field(default_factory=dict)


_A100 = {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}
_H100 = {"bf16": 989.0, "fp8": 1979.0, "tf32": 494.5, "fp32": 67.0}
_H100_PCIE = {"bf16": 756.0, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.0}
_NVL = {"bf16": 835.0, "fp8": 1671.0, "tf32": 417.5, "fp32": 60.0}

# The SXM parts of 8-GPU NVLink nodes first: a bare prefix of a key ("a100") means the first.
GPUS: tuple[GPU, ...] = (
    GPU("a100-80gb", "NVIDIA A100-SXM4-80GB", ("a100", "sxm", "80"), 80, 108, 40 * 2**20, SM80,
        80.0, 400.0, 230.0, _A100),
    GPU("a100-40gb", "NVIDIA A100-SXM4-40GB", ("a100",), 80, 108, 40 * 2**20, SM80,
        40.0, 400.0, 230.0, _A100),
    GPU("h100-80gb", "NVIDIA H100 80GB HBM3", ("h100",), 90, 132, 50 * 2**20, SM90,
        80.0, 700.0, 370.0, _H100),
    GPU("h200-141gb", "NVIDIA H200", ("h200",), 90, 132, 50 * 2**20, SM90,
        141.0, 700.0, 370.0, _H100),
    GPU("a100-pcie", "NVIDIA A100 80GB PCIe", ("a100", "pcie"), 80, 108, 40 * 2**20, SM80,
        80.0, 300.0, 20.0, _A100),
    GPU("h100-pcie", "NVIDIA H100 PCIe", ("h100", "pcie"), 90, 114, 50 * 2**20, SM90,
        80.0, 350.0, 40.0, _H100_PCIE),
    GPU("h100-nvl", "NVIDIA H100 NVL", ("h100", "nvl"), 90, 132, 50 * 2**20, SM90,
        94.0, 400.0, 40.0, _NVL),
    GPU("h200-nvl", "NVIDIA H200 NVL", ("h200", "nvl"), 90, 132, 50 * 2**20, SM90,
        141.0, 600.0, 40.0, _NVL),
    GPU("rtx-5090", "NVIDIA GeForce RTX 5090", ("rtx", "5090"), 120, 170, 96 * 2**20, SM120,
        32.0, 575.0, 40.0),
)
BY_KEY = {g.key: g for g in GPUS}
# The GPU each CUDA arch the kernels are built for is checked against (compile_check).
BY_ARCH = {80: BY_KEY["a100-80gb"], 90: BY_KEY["h100-80gb"], 120: BY_KEY["rtx-5090"]}

# fp16 and bf16 share one tensor-core peak on these parts.
DTYPES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "bf16", "float16": "bf16", "torch.float16": "bf16",
    "fp8": "fp8", "float8": "fp8",
    "tf32": "tf32",
    "fp32": "fp32", "float32": "fp32", "torch.float32": "fp32",
}  # fmt: skip

# float8 (e4m3/e5m2) tensor cores: Ada (sm_89) and Hopper (sm_90) onwards; an A100 (sm_80) has none.
FP8_MIN_ARCH = 89


def has_fp8(arch: int) -> bool:
    """Whether a GPU of CUDA compute capability `arch` (90 = sm_90) has float8 tensor cores."""
    return arch >= FP8_MIN_ARCH


# An unknown GPU is charged like an A100; a CPU process like a share of a server socket. Both
# are order-of-magnitude figures: set carbon.power_w for the machine at hand.
UNKNOWN_GPU_W = 400.0
CPU_W = 100.0
_GPU_WORDS = ("nvidia", "cuda", "gpu")


def gpu(key: str) -> GPU:
    """The GPU of a --device key, or the first whose key starts with it ("a100" = a100-80gb)."""
    k = key.lower()
    match = BY_KEY.get(k) or next((g for g in GPUS if g.key.startswith(k)), None)
    if match is None:
        raise ValueError(f"device = {key!r}: expected one of {', '.join(BY_KEY)}")
    return match


def from_name(device_name: str) -> GPU | None:
    """The GPU that torch.cuda.get_device_name() calls device_name, or None (a CPU, or a GPU not
    in the table)."""
    name = device_name.lower()
    matches = [g for g in GPUS if all(p in name for p in g.patterns)]
    return max(matches, key=lambda g: len(g.patterns), default=None)  # the most specific


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of one device in dtype, or None for a CPU, an unknown device, or a dtype
    the device has no tensor-core path for (fp8 on an A100)."""
    kind = DTYPES.get(str(dtype).lower())
    if kind is None:
        raise ValueError(f"dtype = {dtype!r}: expected one of {', '.join(sorted(DTYPES))}")
    g = from_name(device_name)
    if g is None or kind not in g.peak_tflops:
        return None
    return g.peak_tflops[kind] * 1e12


def is_gpu(device_name: str) -> bool:
    name = device_name.lower()
    return any(w in name for w in _GPU_WORDS) or from_name(name) is not None


def tdp_watts(device_name: str) -> float:
    """Power charged per device when nothing is measured or configured; device_name is what
    torch.cuda.get_device_name() says (a bare "cuda" gets the unknown-GPU figure), or "cpu"."""
    g = from_name(device_name)
    if g is not None:
        return g.tdp_w
    return UNKNOWN_GPU_W if is_gpu(device_name) else CPU_W
