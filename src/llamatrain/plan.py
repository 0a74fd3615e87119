"""Layouts: what fits where. The batch geometry of a layout, the full-size dry run of any layout on
one CPU, and the step-time model; the trainer, `python -m llamatrain.plan` and `carbon project` all
ask this module.

`python -m llamatrain.plan --config CONFIG --gpus N [--gpus-per-node 8] [--device a100-80gb]
[--mfu 0.45] [--fabric ib|roce] [--link-gbps 200] [--json] [--section.key=value ...]`

N is from 1 to MAX_GPUS (65,536) and fills whole nodes of --gpus-per-node, or part of one node;
`carbon project` takes the same counts (check_cluster).

The dry run joins torch's fake process-group backend as rank 0 of N (no other process, no GPU),
builds the model on the meta device and applies the real `parallelize()`: parameter, gradient and
optimizer bytes are read off the DTensor shards rank 0 holds. Activation memory is measured, not
guessed: one forward and backward of a micro-batch runs on fake tensors (FakeTensorMode, so no
FLOP is computed and no byte allocated) under torch's FSDP memory tracker, with the chosen
activation checkpointing. Every block of the model is the same, so the dry run builds one with 4p
and one with 5p blocks (p = 2 for selective checkpointing, else 1) and extends the difference
linearly to the model's depth; in the search, micro-batches of m sequences are taken to hold m
times the activations of one (the layout asked for is measured at its own micro-batch). The ops
run as their PyTorch references (fake tensors hold no data for a Triton kernel), which keep fp32
intermediates the fused kernels do not (not yet checked against a GPU run).
Step time is modelled: --mfu is the model FLOPs utilisation of compute, the same whatever the
checkpointing (layouts that tie are ranked by memory). With --train.float8=tensorwise|rowwise the
converted block linears' FLOPs run at --mfu of the device's fp8 peak and the rest (attention,
output projection) at --mfu of bf16's, and tensorwise all-gathers those linears' weights in float8
(one byte each); a device without float8 tensor cores (A100) is refused. The dry run measures
memory without the float8 conversion: torchao keeps the high-precision inputs for backward, so
activations are about bf16's, and the float8 all-gather only makes the gathered weights smaller.

With --parallel.* overrides it reports that layout; without, it searches tp in 1, 2, 4, 8, FSDP
over every data-parallel rank or inside a node (HSDP), the three activation-checkpointing modes
and micro-batches of 1, 2 and 4, and ranks the layouts that fit by projected step time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

from llamatrain.config import Config, load_config, run_cli, validate
from llamatrain.distributed.float8 import check_device
from llamatrain.distributed.parallel_dims import ParallelDims, batch_geometry
from llamatrain.flops import float8_flops_per_token, float8_params, flops_per_token, num_params
from llamatrain.hardware import BY_KEY, GPU, gpu, peak_flops

GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Fabrics


# Of a device's memory, what a layout may plan to use: the rest is the CUDA context, NCCL's
# buffers, the allocator's fragmentation and the optimizer step's temporaries.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Fabric:
    """What NCCL gets out of a node's network links.

    efficiency: fraction of the line rate that NCCL's bus bandwidth reaches; hop_latency_us: the
    latency of one inter-node step of a ring. InfiniBand: 0.92 (about 23 of 25 GB/s per 200 Gbps
    HDR port in nccl-tests) and 5 us. RoCE is an assumption, not a measurement: Ethernet framing
    and PFC/ECN congestion control cost bandwidth (0.85) and its switches add latency (8 us).
    """

    name: str
    efficiency: float
    hop_latency_us: float


FABRICS = {"ib": Fabric("InfiniBand", 0.92, 5.0), "roce": Fabric("RoCE", 0.85, 8.0)}
NVLINK_HOP_US = 1.0
PARAM_BYTES = 2  # bf16 all-gather (FSDP2 MixedPrecisionPolicy param_dtype)
FLOAT8_BYTES = 1  # tensorwise float8's all-gather of the converted linears' weights
GRAD_BYTES = 4  # fp32 reduce-scatter / all-reduce (reduce_dtype)
ACT_BYTES = 2  # bf16 activations in the tensor-parallel collectives


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int
    activation_checkpointing: str
    micro_batch_size: int

    def overrides(self) -> str:
        """The command-line overrides that select this layout."""
        return (f"--parallel.tp={self.tp} --parallel.dp_shard={self.dp_shard} "
                f"--parallel.dp_replicate={self.dp_replicate} "
                f"--parallel.activation_checkpointing={self.activation_checkpointing} "
                f"--train.micro_batch_size={self.micro_batch_size}")

    def short(self) -> str:
        return (f"tp {self.tp} x dp_shard {self.dp_shard} x dp_replicate {self.dp_replicate}, "
                f"AC {self.activation_checkpointing}, micro-batch {self.micro_batch_size}")


def with_layout(cfg: Config, layout: Layout) -> Config:
    p = replace(cfg.parallel, tp=layout.tp, dp_shard=layout.dp_shard,
                dp_replicate=layout.dp_replicate,
                activation_checkpointing=layout.activation_checkpointing)
    t = replace(cfg.train, micro_batch_size=layout.micro_batch_size)
    return replace(cfg, parallel=p, train=t)


# The most GPUs a plan or a projection models. The dry run joins torch's fake process group as
# rank 0 of that many and builds its device mesh, whose time and memory grow with the count (one
# layout of tiny.toml: 14 s at 8,192 GPUs, 67 s and 0.7 GB at 131,072 on this repo's 2-core test
# machine, and the search measures a dozen layouts): 65,536 is four times the 16,384 GPUs of the
# largest Llama 3 run, and keeps the search within minutes.
MAX_GPUS = 65_536


def check_cluster(num_gpus: int, gpus_per_node: int, *, link_gbps: float | None = None,
                  nics_per_node: int | None = None) -> None:
    """The cluster of a plan or a projection: GPU counts from 1 to MAX_GPUS that fill whole nodes
    (or part of one), and NIC links that carry something. Each mistake is one ValueError."""
    counts = {"--gpus": num_gpus, "--gpus-per-node": gpus_per_node}
    if nics_per_node is not None:
        counts["--nics-per-node"] = nics_per_node
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} = {value!r}: expected an integer >= 1")
    if num_gpus > MAX_GPUS:
        raise ValueError(f"--gpus = {num_gpus:,}: the planner models at most {MAX_GPUS:,} GPUs "
                         "(plan.MAX_GPUS: its dry run builds a process group of that many ranks)")
    if num_gpus > gpus_per_node and num_gpus % gpus_per_node:
        nodes = num_gpus // gpus_per_node
        raise ValueError(
            f"--gpus = {num_gpus} with --gpus-per-node = {gpus_per_node}: not whole nodes "
            f"({nodes} nodes hold {nodes * gpus_per_node}, {nodes + 1} hold "
            f"{(nodes + 1) * gpus_per_node}); allowed: a multiple of {gpus_per_node}, or at "
            "most one node")
    if link_gbps is not None and not (math.isfinite(link_gbps) and link_gbps > 0):
        raise ValueError(f"--link-gbps = {link_gbps!r}: expected a finite number > 0 (the line "
                         "rate of one NIC)")


def check_layout(cfg: Config, num_gpus: int, gpus_per_node: int) -> tuple[Layout, int]:
    """The layout of `cfg` on num_gpus, and its micro-batches per step, or the ValueError the
    trainer would raise for it: the same checks, by the same functions."""
    check_cluster(num_gpus, gpus_per_node)
    validate(cfg)
    dims = ParallelDims.from_config(cfg.parallel, num_gpus, min(gpus_per_node, num_gpus))
    _, accum = dims.batch_geometry(cfg.train)
    layout = Layout(dims.dp_replicate, dims.dp_shard, dims.tp,
                    cfg.parallel.activation_checkpointing, cfg.train.micro_batch_size)
    return layout, accum


def candidate_layouts(cfg: Config, num_gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of the search that the trainer accepts for this model and GPU count."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or num_gpus % tp:
            continue
        dp = num_gpus // tp
        shards = {dp, min(dp, max(1, gpus_per_node // tp))}
        for shard in sorted(shards, reverse=True):
            for ac in ("none", "selective", "full"):
                for mbs in (1, 2, 4):
                    layout = Layout(dp // shard, shard, tp, ac, mbs)
                    try:
                        check_layout(with_layout(cfg, layout), num_gpus, gpus_per_node)
                    except ValueError:
                        continue
                    out.append(layout)
    return out


# ---------------------------------------------------------------------------------------------
# Memory: the dry run on a fake process group


@dataclass
class Memory:
    """Bytes per GPU (rank 0) of one layout."""

    params: int  # fp32 shards of the parameters
    grads: int  # fp32 gradient shards (kept from the reduce-scatter to zero_grad)
    optimizer: int  # AdamW's two fp32 moments of the shards
    gathered: int  # bf16 parameters all-gathered for compute, and collective buffers, at the peak
    activations: int  # saved activations and temporaries at the peak of forward + backward

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations


@contextlib.contextmanager
def fake_world(num_gpus: int):
    """Be rank 0 of num_gpus on torch's fake backend: collectives return at once, nothing is
    sent, so a cluster's layout can be built in one CPU process."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan: a process group is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=num_gpus)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _build(cfg: Config, n_layers: int, num_gpus: int, gpus_per_node: int):
    """A meta-device model of n_layers blocks, parallelized as the trainer would (in fake_world)."""
    import torch

    from llamatrain.distributed.parallelize import parallelize
    from llamatrain.model import Transformer

    dims = ParallelDims.from_config(cfg.parallel, num_gpus, min(gpus_per_node, num_gpus))
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(replace(cfg.model, n_layers=n_layers))
    parallelize(model, cfg.parallel, mesh, param_dtype=torch.bfloat16)
    return model, mesh


def shard_bytes(model) -> int:
    """fp32 bytes of the parameter shards this rank holds (from the DTensors' local shards)."""
    from llamatrain.distributed.parallelize import local_bytes

    return local_bytes(model.parameters())


def track_step(model, mesh, cfg: Config) -> dict[str, int]:
    """Peak memory of one forward and backward of one micro-batch by category (the names of
    torch's FSDPMemTracker), measured on whatever tensors the model holds: fake ones in the dry
    run, real ones in the check against reality."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from llamatrain.loss import loss_context, sequence_loss

    tokens = torch.randint(0, cfg.model.vocab_size,
                           (cfg.train.micro_batch_size, cfg.train.seq_len))
    tracker = FSDPMemTracker(model)
    tracker.track_inputs((tokens,))
    # The tracker sees a tensor freed when its last reference goes; a garbage collection in the
    # middle of the step would free reference cycles at a moment that varies from run to run.
    gc.collect()
    gc.disable()
    try:
        with tracker, loss_context(mesh):
            sequence_loss(model(tokens), tokens).backward()
    finally:
        gc.enable()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    model.zero_grad(set_to_none=True)
    return {getattr(k, "value", k): v for k, v in peak.items()}


def _split(peak: dict[str, int]) -> tuple[int, int]:
    """(gathered, activations) of a tracker peak: what the step adds to the persistent shards."""
    gathered = sum(peak.get(k, 0) for k in ("Unsharded Param", "Unsharded Grad", "All Gather",
                                             "Reduce Scatter", "Buffer"))
    activations = sum(peak.get(k, 0) for k in ("Activation", "Temp", "Inputs"))
    return gathered, activations


def dry_run(cfg: Config, num_gpus: int, gpus_per_node: int, *, step: bool = True) -> Memory:
    """Per-GPU memory of cfg's layout on num_gpus, from a fake-process-group run (see the module
    docstring); with step=False only the shards (gathered and activations 0). Must run inside
    fake_world(num_gpus).

    The first blocks and the last (kept gathered for backward) differ from the rest, so the peaks
    of models of 4p and 5p blocks, p = 2 for selective checkpointing and 1 otherwise, are what is
    extended to the model's depth; a model of at most 5p blocks is measured whole."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llamatrain import ops

    ops.set_backend("torch")  # fake tensors have no data for a Triton kernel to read
    period = 2 if cfg.parallel.activation_checkpointing == "selective" else 1
    depth = cfg.model.n_layers
    sizes = (depth,) if depth <= 5 * period else (4 * period, 5 * period)
    measured = []
    # The first step of a layout in a process allocates more than the next (caches warming up):
    # a step of one block first, not counted.
    for n_layers in ((1,) if step else ()) + sizes:
        model, mesh = _build(cfg, n_layers, num_gpus, gpus_per_node)
        params = shard_bytes(model)
        peak: dict[str, int] = {}
        if step:
            with FakeTensorMode(allow_non_fake_inputs=True):
                model.to_empty(device="cpu")
                model.init_rope()
                peak = track_step(model, mesh, cfg)
        gathered, activations = _split(peak)
        measured.append((params, gathered + activations, gathered))
        del model
    measured = measured[-len(sizes):]
    steps = 0 if len(sizes) == 1 else (depth - sizes[0]) / period

    def extend(i: int) -> int:
        return round(measured[0][i] + steps * (measured[-1][i] - measured[0][i]))

    # What is gathered at the peak (a block or two, the root) does not grow with depth; the
    # rest of the step's peak is activations.
    params, transient, gathered = extend(0), extend(1), measured[-1][2]
    return Memory(params=params, grads=params, optimizer=2 * params, gathered=gathered,
                  activations=transient - gathered)


def state_bytes(model_cfg, layout: Layout) -> float:
    """fp32 weights, gradients and AdamW's two moments per GPU as an even share of the model over
    dp_shard x tp GPUs: the table's figure. The dry run reads rank 0's own shards, which uneven
    splits and the replicated RMSNorm gains make up to a few percent larger."""
    return num_params(model_cfg) * 16 / (layout.dp_shard * layout.tp)


# ---------------------------------------------------------------------------------------------
# Collectives and step time


@dataclass
class Collective:
    what: str
    kind: str  # all-gather, reduce-scatter, all-reduce
    group: int  # ranks in the group
    link: str  # NVLink or the fabric
    count: int  # per step
    bytes: float  # per GPU per step, what each GPU sends over all `count` calls
    seconds: float  # per step, bandwidth and latency


def peak_seconds_per_token(cfg: Config, device: GPU, *, tp: int) -> float:
    """Seconds one GPU needs for one token's training FLOPs at its peaks: all of flops.py's count
    at bf16's, or under train.float8 the converted linears' at fp8's and the rest at bf16's (a
    device without float8 tensor cores is refused). Divided by an MFU, the compute time."""
    m, seq, bf16 = cfg.model, cfg.train.seq_len, peak_flops(device.name, "bf16")
    if cfg.train.float8 == "none":
        return flops_per_token(m, seq) / bf16
    check_device(cfg.train.float8, arch=device.arch, device_name=device.name)
    converted, rest = float8_flops_per_token(m, seq, tp=tp)
    return converted / peak_flops(device.name, "fp8") + rest / bf16


def gathered_bytes(cfg: Config, *, tp: int) -> float:
    """Bytes of one tp-slice of the parameters as FSDP all-gathers them: bf16, but the converted
    linears' weights in float8 under train.float8 = tensorwise."""
    n = num_params(cfg.model)
    fp8 = float8_params(cfg.model, tp=tp) if cfg.train.float8 == "tensorwise" else 0
    return ((n - fp8) * PARAM_BYTES + fp8 * FLOAT8_BYTES) / tp


def _link(group: int, stride: int, gpus_per_node: int, fabric: Fabric) -> str:
    return "NVLink" if group * stride <= gpus_per_node else fabric.name


def step_model(
    cfg: Config,
    layout: Layout,
    *,
    num_gpus: int,
    gpus_per_node: int,
    device: GPU,
    mfu: float,
    fabric: Fabric,
    link_gbps: float,
    nics_per_node: int = 8,
) -> dict[str, Any]:
    """One optimizer step of a layout: its collectives, compute time and step time.

    Compute: the step's tokens over num_gpus GPUs, each at peak_seconds_per_token / mfu (bf16's
    peak, and fp8's for the converted linears under train.float8). FSDP, per step: every GPU
    all-gathers its tp-slice of the parameters (gathered_bytes) twice (forward, backward) and
    reduce-scatters the gradients within its dp_shard group; with replicas (HSDP) it
    all-reduces its gradient shard across them. A ring inside one node runs over NVLink; a ring
    across nodes moves, per node, what its GPUs send, spread over the node's NICs (tp rings per
    node share them); replica all-reduces go over NCCL's tree. They overlap
    with compute through prefetching, except the first unit's all-gather and the last unit's
    reductions. Tensor parallelism, per block and micro-batch: forward all-gathers the sequence
    before attention and the FFN and reduce-scatters after them, backward the reverse, and full
    activation checkpointing repeats the forward's; over NVLink, on the critical path.
    """
    m = cfg.model
    tp, s, r = layout.tp, layout.dp_shard, layout.dp_replicate
    n_local = num_params(m) / tp
    units = m.n_layers + 1
    net_bps = nics_per_node * link_gbps / 8 * 1e9 * fabric.efficiency
    nvl_bps = device.intra_node_gbs * 1e9
    net_hop, nvl_hop = fabric.hop_latency_us * 1e-6, NVLINK_HOP_US * 1e-6
    tokens = cfg.train.global_batch_tokens
    compute = tokens / num_gpus * peak_seconds_per_token(cfg, device, tp=tp) / mfu
    _, accum = batch_geometry(replace(cfg.train, micro_batch_size=layout.micro_batch_size),
                              num_gpus // tp)
    colls: list[Collective] = []
    node_bytes = 0.0
    lat_ag = lat_ar = 0.0
    fsdp = 0.0
    if s > 1:
        ag_bytes = (s - 1) / s * gathered_bytes(cfg, tp=tp)
        rs_bytes = (s - 1) / s * n_local * GRAD_BYTES
        link = _link(s, tp, gpus_per_node, fabric)
        if link == "NVLink":
            bps, lat_ag = nvl_bps, (s - 1) * nvl_hop
        else:
            nodes = math.ceil(s * tp / gpus_per_node)
            bps = min(nvl_bps, net_bps / tp)
            lat_ag = (nodes - 1) * net_hop + (s - nodes) * nvl_hop
            node_bytes += tp * (2 * ag_bytes + rs_bytes)
        gathered = "bf16, float8 linears" if cfg.train.float8 == "tensorwise" else "bf16"
        colls += [Collective(f"FSDP parameters ({gathered})", "all-gather", s, link, 2 * units,
                             2 * ag_bytes, 2 * ag_bytes / bps + 2 * units * lat_ag),
                  Collective("FSDP gradients (fp32)", "reduce-scatter", s, link, units,
                             rs_bytes, rs_bytes / bps + units * lat_ag)]
        fsdp += (2 * ag_bytes + rs_bytes) / bps
    if r > 1:
        ar_bytes = 2 * (r - 1) / r * n_local / s * GRAD_BYTES
        link = _link(r, s * tp, gpus_per_node, fabric)
        if link == "NVLink":
            t_ar, lat_ar = ar_bytes / nvl_bps, 2 * (r - 1) * nvl_hop
        else:
            per_node = gpus_per_node * ar_bytes
            t_ar, lat_ar = per_node / net_bps, 2 * math.ceil(math.log2(r)) * net_hop
            node_bytes += per_node
        colls.append(Collective("HSDP gradient shards (fp32)", "all-reduce", r, link, units,
                                ar_bytes, t_ar + units * lat_ar))
        fsdp += t_ar
    fsdp_comm = fsdp + units * (3 * lat_ag + lat_ar)
    exposed = fsdp / units + 2 * lat_ag + lat_ar
    tp_s = 0.0
    if tp > 1:
        act = layout.micro_batch_size * cfg.train.seq_len * m.dim * ACT_BYTES
        per_call = (tp - 1) / tp * act
        passes = 3 if layout.activation_checkpointing == "full" else 2
        if layout.activation_checkpointing == "selective":
            passes = 2.5
        calls = round(4 * passes * m.n_layers * accum)
        t_call = per_call / nvl_bps + (tp - 1) * nvl_hop
        tp_s = calls * t_call
        colls.append(Collective("sequence parallel activations (bf16)",
                                "all-gather + reduce-scatter", tp, "NVLink", calls,
                                calls * per_call, tp_s))
        # The embedding's reduce-scatter and the logits' all-gather, forward and backward.
        edge = 4 * accum
        colls.append(Collective("embedding and output activations (bf16)",
                                "reduce-scatter + all-gather", tp, "NVLink", edge,
                                edge * per_call, edge * t_call))
        tp_s += edge * t_call
    step = compute + tp_s + exposed + max(0.0, fsdp_comm - compute)
    return {
        "compute_s": compute, "fsdp_comm_s": fsdp_comm, "tp_comm_s": tp_s, "step_s": step,
        "efficiency": compute / step, "micro_batches": accum,
        "node_gb_per_step": node_bytes / 1e9,
        "collectives": [asdict(c) for c in colls],
    }


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class Setup:
    """The cluster and assumptions of a plan."""

    num_gpus: int
    gpus_per_node: int = 8
    device: str = "a100-80gb"
    mfu: float = 0.45
    fabric: str = "ib"
    link_gbps: float = 200.0
    nics_per_node: int = 8


def _evaluate(cfg: Config, layout: Layout, setup: Setup, memory: Memory) -> dict[str, Any]:
    device = gpu(setup.device)
    budget = device.memory_gib * GIB * USABLE_FRACTION
    def model(c: Config) -> dict[str, Any]:
        return step_model(c, layout, num_gpus=setup.num_gpus, gpus_per_node=setup.gpus_per_node,
                          device=device, mfu=setup.mfu, fabric=FABRICS[setup.fabric],
                          link_gbps=setup.link_gbps, nics_per_node=setup.nics_per_node)

    step = model(cfg)
    if cfg.train.float8 != "none":  # what float8 saves: the same layout's step in bf16
        bf16 = model(replace(cfg, train=replace(cfg.train, float8="none")))
        step["bf16"] = {"step_s": bf16["step_s"], "compute_s": bf16["compute_s"]}
    return {"layout": asdict(layout), "overrides": layout.overrides(),
            "memory": {**asdict(memory), "total": memory.total}, "budget": budget,
            "fits": memory.total <= budget, **step}


def plan(cfg: Config, setup: Setup, *, search: bool) -> dict[str, Any]:
    """The dry run of cfg's layout (search=False) or of every candidate layout, ranked."""
    check_cluster(setup.num_gpus, setup.gpus_per_node, link_gbps=setup.link_gbps,
                  nics_per_node=setup.nics_per_node)
    if setup.fabric not in FABRICS:
        raise ValueError(f"fabric = {setup.fabric!r}: expected one of {', '.join(FABRICS)}")
    if not 0 < setup.mfu <= 1:
        raise ValueError(f"mfu = {setup.mfu!r}: expected a fraction in (0, 1]")
    device = gpu(setup.device)
    check_device(cfg.train.float8, arch=device.arch, device_name=device.name)
    g, gpn = setup.num_gpus, setup.gpus_per_node
    requested, refusal, own_refusal = None, None, None
    try:
        requested, _ = check_layout(cfg, g, gpn)
    except ValueError as e:
        own_refusal = str(e)
        if not search:
            refusal = own_refusal
    shards: dict[tuple, Memory] = {}
    steps: dict[tuple, Memory] = {}

    def evaluate(layout: Layout) -> dict[str, Any]:
        if layout == requested:  # measured as it is
            memory = dry_run(with_layout(cfg, layout), g, gpn)
        else:
            # The search measures a step once per (tp, checkpointing), at full FSDP and one
            # sequence (activations scale with the micro-batch), and the shards per mesh.
            key = (layout.tp, layout.activation_checkpointing)
            if key not in steps:
                full = Layout(1, g // layout.tp, layout.tp, layout.activation_checkpointing, 1)
                steps[key] = dry_run(with_layout(cfg, full), g, gpn)
            mesh = (layout.tp, layout.dp_shard, layout.dp_replicate)
            if mesh not in shards:
                shards[mesh] = (steps[key] if layout.dp_replicate == 1 else
                                dry_run(with_layout(cfg, layout), g, gpn, step=False))
            one = steps[key]
            memory = replace(shards[mesh], gathered=one.gathered,
                             activations=one.activations * layout.micro_batch_size)
        return _evaluate(with_layout(cfg, layout), layout, setup, memory)

    results = []
    with fake_world(g):
        if not search and refusal is None:
            results.append(evaluate(requested))
        if search or refusal is not None or not results[0]["fits"]:
            # Search for what fits: everything, or for a layout that does not, its alternatives.
            results += [evaluate(x) for x in candidate_layouts(cfg, g, gpn) if x != requested]
    fitting = sorted((r for r in results if r["fits"]),
                     key=lambda r: (r["step_s"], r["memory"]["total"]))
    out = {"params": num_params(cfg.model), "gpus": g, "gpus_per_node": gpn,
           "device": device.name, "memory_gib": device.memory_gib, "mfu": setup.mfu,
           "fabric": FABRICS[setup.fabric].name, "link_gbps": setup.link_gbps,
           "seq_len": cfg.train.seq_len, "global_batch_tokens": cfg.train.global_batch_tokens,
           "float8": cfg.train.float8,
           "searched": search or refusal is not None, "layouts": results, "fitting": fitting,
           "best": fitting[0] if fitting else None, "refusal": refusal,
           "config_refusal": own_refusal}
    if not search and refusal is None:
        out["requested"] = results[0]
        out["searched"] = len(results) > 1
    return out


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _float8_note(r: dict[str, Any]) -> str:
    if r["float8"] == "none":
        return ""
    return (f" (float8 {r['float8']}: the block linears at {r['mfu']:.0%} of the fp8 peak, the "
            "rest of bf16's)")


def format_result(r: dict[str, Any], *, top: int = 10) -> str:
    lines = [f"{r['params'] / 1e9:.2f}B parameters, sequence {r['seq_len']}, global batch "
             f"{r['global_batch_tokens']:,} tokens, on {r['gpus']:,} x {r['device']} "
             f"({r['gpus_per_node']} per node, {r['memory_gib']:g} GiB, plan up to "
             f"{USABLE_FRACTION:.0%}); step time at MFU {r['mfu']:.0%}{_float8_note(r)}, "
             f"{r['fabric']} {r['link_gbps']:g} Gbps per NIC"]
    header = (f"{'tp':>3} {'shard':>6} {'repl':>5} {'AC':>9} {'mbs':>3} {'accum':>5} "
              f"{'params':>7} {'grads':>6} {'optim':>6} {'gather':>7} {'activ':>6} "
              f"{'total':>6} {'step s':>7} {'eff':>6}")

    def row(x: dict[str, Any]) -> str:
        lay, mem = x["layout"], x["memory"]
        return (f"{lay['tp']:>3} {lay['dp_shard']:>6} {lay['dp_replicate']:>5} "
                f"{lay['activation_checkpointing']:>9} {lay['micro_batch_size']:>3} "
                f"{x['micro_batches']:>5} {_gib(mem['params']):>7} {_gib(mem['grads']):>6} "
                f"{_gib(mem['optimizer']):>6} {_gib(mem['gathered']):>7} "
                f"{_gib(mem['activations']):>6} {_gib(mem['total']):>6} {x['step_s']:>7.2f} "
                f"{x['efficiency']:>6.1%}")

    chosen = r.get("requested") or r["best"]
    if r["config_refusal"]:
        lines.append(f"the config's own layout is refused: {r['config_refusal']}")
    if r["searched"]:
        lines += ["", f"layouts that fit, fastest first ({len(r['fitting'])} of "
                  f"{len(r['layouts'])} the trainer accepts; memory in GiB per GPU):", header]
        lines += [row(x) for x in r["fitting"][:top]]
    else:
        lines += ["", "memory in GiB per GPU:", header, row(chosen)]
        lines.append("fits" if chosen["fits"] else
                     f"does NOT fit: {_gib(chosen['memory']['total'])} GiB of "
                     f"{_gib(chosen['budget'])} GiB")
    if chosen is not None:
        lines += ["", f"collectives of one step ({Layout(**chosen['layout']).short()}):"]
        for c in chosen["collectives"]:
            lines.append(f"  {c['what']:<42} {c['kind']:<28} over {c['group']:>5} "
                         f"({c['link']:<10}) x{c['count']:>5}: {c['bytes'] / 1e9:8.2f} GB "
                         f"per GPU, {c['seconds']:.3f} s")
        exposed = chosen["step_s"] - chosen["compute_s"] - chosen["tp_comm_s"]
        lines.append(f"  step {chosen['step_s']:.2f} s = compute {chosen['compute_s']:.2f} s + "
                     f"tensor parallel {chosen['tp_comm_s']:.2f} s + FSDP not hidden behind "
                     f"compute {exposed:.2f} s (of {chosen['fsdp_comm_s']:.2f} s)")
        if "bf16" in chosen:
            bf16 = chosen["bf16"]
            lines.append(f"  float8 {r['float8']}: step {chosen['step_s']:.2f} s (compute "
                         f"{chosen['compute_s']:.2f} s) against {bf16['step_s']:.2f} s (compute "
                         f"{bf16['compute_s']:.2f} s) in bf16: "
                         f"{bf16['step_s'] / chosen['step_s'] - 1:+.0%} steps per hour")
        lines.append(f"  use: {chosen['overrides']}")
    return "\n".join(lines)


def refusal_line(r: dict[str, Any]) -> str | None:
    """One line when the requested layout is refused or does not fit: why, and what fits."""
    best = r["best"]
    fits = f"; fits: {best['overrides']}" if best else "; no layout of the search fits"
    if r["refusal"] is not None:
        return f"{r['refusal']}{fits}"
    req = r.get("requested")
    if req is not None and not req["fits"]:
        return (f"{Layout(**req['layout']).short()} needs {_gib(req['memory']['total'])} GiB "
                f"per GPU of {_gib(req['budget'])} GiB{fits}")
    if req is None and best is None:
        return f"no layout of the search fits {r['gpus']} x {r['device']}"
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, through run_cli, instead of usage + exit
        raise ValueError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m llamatrain.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--device", default="a100-80gb", help=", ".join(BY_KEY))
    parser.add_argument("--mfu", type=float, default=0.45)
    parser.add_argument("--fabric", choices=sorted(FABRICS), default="ib")
    parser.add_argument("--link-gbps", type=float, default=200.0)
    parser.add_argument("--nics-per-node", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=")[0])]
    if bad:
        raise ValueError(f"argument {bad[0]!r}: expected --section.key=value")
    cfg = load_config(args.config, overrides)
    search = not any(o.startswith("--parallel.") for o in overrides)
    setup = Setup(args.gpus, args.gpus_per_node, args.device, args.mfu, args.fabric,
                  args.link_gbps, args.nics_per_node)
    result = plan(cfg, setup, search=search)
    line = refusal_line(result)
    if line is not None:
        raise ValueError(line)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
