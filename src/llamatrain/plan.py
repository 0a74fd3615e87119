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

A pipelined layout (parallel.pp > 1) is measured stage by stage (the real stage modules of
distributed.pipeline, two micro-batches in a row as the schedule runs them), and each pipeline
rank's memory counts the micro-batches its schedule keeps in flight (in_flight: the first stage
holds the most under 1F1B) and the stages' transfer buffers; the layout's memory is its fullest
rank's.

Step time is modelled (step_model): compute at --mfu of the bf16 peak on the FLOPs the GPUs
execute, recomputation included, so MFU (model FLOPs over time) falls with recomputation; the
pipeline's bubble (bubble_fraction) and the traffic between its stages; FSDP's and tensor
parallelism's collectives. Layouts that tie are ranked by memory. With
--train.float8=tensorwise|rowwise the converted block linears' FLOPs run at --mfu of the device's
fp8 peak and the rest (attention, output projection) at --mfu of bf16's, and tensorwise
all-gathers those linears' weights in float8 (one byte each); a device without float8 tensor cores
(A100) is refused. The dry run measures memory without the float8 conversion: torchao keeps the
high-precision inputs for backward, so activations are about bf16's, and the float8 all-gather
only makes the gathered weights smaller.

With --parallel.* overrides it reports that layout; without, it searches pp in 1, 2, 4, 8, 16 (with
1F1B, interleaved 1F1B with 2 or 4 stages per rank and the interleaved zero bubble), tp in 1, 2,
4, 8, FSDP over every data-parallel rank or inside a node (HSDP), the three activation-
checkpointing modes and micro-batches of 1, 2 and 4, ranks the layouts the trainer accepts by
projected step time and measures them from the fastest down until ten fit.
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
from llamatrain.distributed.parallel_dims import (
    ParallelDims,
    batch_geometry,
    stage_blocks,
    stage_ids,
)
from llamatrain.flops import (
    block_flops_per_token,
    block_params,
    float8_flops_per_token,
    float8_params,
    flops_per_token,
    num_params,
)
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
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    pp_microbatches: int = 0  # 0: every micro-batch of a step in one run of the schedule

    def overrides(self) -> str:
        """The command-line overrides that select this layout."""
        pipeline = (f" --parallel.pp_schedule={self.pp_schedule} "
                    f"--parallel.pp_stages_per_rank={self.pp_stages_per_rank} "
                    f"--parallel.pp_microbatches={self.pp_microbatches}" if self.pp > 1 else "")
        return (f"--parallel.tp={self.tp} --parallel.dp_shard={self.dp_shard} "
                f"--parallel.dp_replicate={self.dp_replicate} "
                f"--parallel.activation_checkpointing={self.activation_checkpointing} "
                f"--train.micro_batch_size={self.micro_batch_size} --parallel.pp={self.pp}"
                f"{pipeline}")

    def short(self) -> str:
        pipeline = (f"pp {self.pp} ({self.schedule_name}) x " if self.pp > 1 else "")
        return (f"{pipeline}tp {self.tp} x dp_shard {self.dp_shard} x dp_replicate "
                f"{self.dp_replicate}, AC {self.activation_checkpointing}, micro-batch "
                f"{self.micro_batch_size}")

    @property
    def schedule_name(self) -> str:
        """The schedule and its stages per rank when it interleaves them, e.g. 'interleaved_1f1b
        x2'; '-' without a pipeline."""
        if self.pp == 1:
            return "-"
        v = self.pp_stages_per_rank
        return self.pp_schedule + (f" x{v}" if v > 1 else "")


# The pipelines of the search: (schedule, stages per rank), each with every micro-batch of a step
# in one run of the schedule (fewer per run only add bubbles). GPipe has 1F1B's bubble with every
# micro-batch in flight: never faster, it is not searched.
PP_CHOICES = (1, 2, 4, 8, 16)
PIPELINE_SEARCH = (("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4),
                   ("zero_bubble", 2))


def with_layout(cfg: Config, layout: Layout) -> Config:
    p = replace(cfg.parallel, tp=layout.tp, dp_shard=layout.dp_shard,
                dp_replicate=layout.dp_replicate,
                activation_checkpointing=layout.activation_checkpointing, pp=layout.pp,
                pp_schedule=layout.pp_schedule, pp_stages_per_rank=layout.pp_stages_per_rank,
                pp_microbatches=layout.pp_microbatches)
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
    p = cfg.parallel
    run = ParallelDims.for_run(cfg, num_gpus, min(gpus_per_node, num_gpus))
    dims, accum = run.dims, run.accum
    pipeline = ((p.pp_schedule, p.pp_stages_per_rank, p.pp_microbatches) if dims.pp > 1
                else ("1f1b", 1, 0))  # without a pipeline its settings are moot
    layout = Layout(dims.dp_replicate, dims.dp_shard, dims.tp, p.activation_checkpointing,
                    cfg.train.micro_batch_size, dims.pp, *pipeline)
    return layout, accum


def candidate_layouts(cfg: Config, num_gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of the search that the trainer accepts for this model and GPU count."""
    out = []
    for pp in PP_CHOICES:
        for tp in (1, 2, 4, 8):
            if tp > gpus_per_node or num_gpus % (pp * tp):
                continue
            dp = num_gpus // (pp * tp)
            shards = {dp, min(dp, max(1, gpus_per_node // tp))}
            pipelines = PIPELINE_SEARCH if pp > 1 else (("1f1b", 1),)
            for shard in sorted(shards, reverse=True):
                for ac in ("none", "selective", "full"):
                    for mbs in (1, 2, 4):
                        for schedule, v in pipelines:
                            layout = Layout(dp // shard, shard, tp, ac, mbs, pp, schedule, v)
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


# ---------------------------------------------------------------------------------------------
# Memory of a pipeline's ranks


@dataclass(frozen=True)
class StageStep:
    """A stage's micro-batches on fake tensors (track_stage_step): bytes gathered for compute at
    the peak; the activations (the tracker's activation, temporary and input bytes) at the peak,
    those a forward keeps for its backward (what every further micro-batch in flight adds), and
    those held from one micro-batch to the next (the accumulated gradients)."""

    gathered: float
    peak: float
    saved: float
    held: float

    def __add__(self, other: StageStep) -> StageStep:
        return StageStep(self.gathered + other.gathered, self.peak + other.peak,
                         self.saved + other.saved, self.held + other.held)

    def scale(self, k: float) -> StageStep:
        return StageStep(self.gathered * k, self.peak * k, self.saved * k, self.held * k)

    def per_micro_batch(self, k: float) -> StageStep:
        """The step at k times the micro-batch: what a micro-batch adds scales with it."""
        return StageStep(self.gathered, self.held + (self.peak - self.held) * k,
                         self.saved * k, self.held)


def in_flight(layout: Layout, micro_batches: int, pp_rank: int) -> int:
    """Micro-batch chunks (one stage each) whose activations rank pp_rank holds when it runs the
    backward at its memory peak, as torch's schedules order them (m micro-batches, v stages per
    rank): GPipe runs every forward first (m); 1F1B runs pp - r forwards before its first
    backward (min(m, pp - r)); interleaved 1F1B (v - 1) pp + 2 (pp - 1 - r) and one more
    (Megatron's warm-up, capped at m v); the interleaved zero bubble runs fewer warm-up forwards,
    (v - 1) pp + (pp - 1 - r) + 1, but defers r weight-gradient passes, which keep their
    activations: v pp in all (capped at m v)."""
    pp, v, m = layout.pp, layout.pp_stages_per_rank, micro_batches
    if layout.pp_schedule == "gpipe":
        return m
    if layout.pp_schedule == "1f1b":
        return min(m, pp - pp_rank)
    if layout.pp_schedule == "interleaved_1f1b":
        return min((v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1, m * v)
    return min(v * pp, m * v)


def pipeline_buffers(cfg: Config, layout: Layout, micro_batches: int, *, first: bool,
                     last: bool) -> float:
    """Bytes of a stage's transfer buffers, which torch's PipelineStage allocates for every
    micro-batch of the schedule: a stage that receives activations keeps a receive buffer, one
    that sends them a receive buffer for their gradients; each is this rank's sequence slice of
    one micro-batch's residual stream."""
    act = layout.micro_batch_size * cfg.train.seq_len // layout.tp * cfg.model.dim * ACT_BYTES
    return micro_batches * act * ((not first) + (not last))


def rank_stages(cfg: Config, layout: Layout, pp_rank: int) -> list[tuple[range, bool, bool]]:
    """(blocks, first, last) of each stage pipeline rank pp_rank holds."""
    num_stages = layout.pp * layout.pp_stages_per_rank
    blocks = stage_blocks(cfg.model.n_layers, num_stages)
    ids = stage_ids(pp_rank, layout.pp, layout.pp_stages_per_rank)
    return [(blocks[i], i == 0, i == num_stages - 1) for i in ids]


def _build_stage(cfg: Config, n_blocks: int, num_gpus: int, gpus_per_node: int, *,
                 first: bool, last: bool):
    """A meta-device pipeline stage of n_blocks blocks (and the ends it is first or last for),
    parallelized as the trainer would (in fake_world)."""
    import torch

    from llamatrain.distributed.parallelize import parallelize
    from llamatrain.distributed.pipeline import stage_module
    from llamatrain.model import Transformer

    dims = ParallelDims.from_config(cfg.parallel, num_gpus, min(gpus_per_node, num_gpus))
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(replace(cfg.model, n_layers=n_blocks))
    stage = stage_module(model, range(n_blocks), first=first, last=last)
    parallelize(stage, cfg.parallel, mesh, param_dtype=torch.bfloat16)
    return stage, mesh


def track_stage_step(stage, mesh, cfg: Config, *, first: bool, last: bool
                     ) -> tuple[dict[str, int], int, int]:
    """(peak memory by category, activations kept from a forward for its backward, activations
    held between micro-batches) of a
    pipeline stage's micro-batches as the schedule runs all but the last: two forwards and
    backwards in a row, gradients not yet reduced (FSDP accumulates them unsharded, in fp32,
    from the first on), parameters kept gathered. The input of a stage after the first is this
    rank's sequence slice of the residual stream; a stage before the last is given a gradient
    of its output."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from llamatrain.loss import loss_context, sequence_loss

    mbs, seq, tp = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.parallel.tp
    tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq))
    stage.set_requires_gradient_sync(False)
    stage.set_reshard_after_backward(False)
    tracker = FSDPMemTracker(stage)
    gc.collect()
    gc.disable()
    try:
        with tracker, loss_context(mesh):
            for _ in range(2):
                x = (tokens if first else torch.randn(mbs, seq // tp, cfg.model.dim,
                                                      dtype=torch.bfloat16, requires_grad=True))
                # The tracker keeps figures per module call, and refuses a second call of its
                # module: forget them (the peak is kept).
                tracker.reset_mod_stats()
                before = _split(next(iter(tracker.get_tracker_snapshot().values())))[1]
                out = stage(x)
                saved = _split(next(iter(tracker.get_tracker_snapshot().values())))[1] - before
                if last:
                    sequence_loss(out, tokens).backward()
                else:
                    out.backward(torch.ones_like(out))
                del x, out
    finally:
        gc.enable()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    stage.zero_grad(set_to_none=True)
    return {getattr(k, "value", k): v for k, v in peak.items()}, saved, before


class StageProfile:
    """Stage steps measured on fake tensors for one (tp, activation checkpointing): stages of
    blocks only at 4p and 5p blocks (p = 2 for selective checkpointing, else 1) give what a block
    adds, a first and a last stage of 4p blocks what the embedding and the output projection and
    loss add; a stage of at most 5p blocks is measured as it is. Must run inside fake_world."""

    def __init__(self, cfg: Config, num_gpus: int, gpus_per_node: int):
        self.cfg, self.num_gpus, self.gpus_per_node = cfg, num_gpus, gpus_per_node
        self.period = 2 if cfg.parallel.activation_checkpointing == "selective" else 1
        self._steps: dict[tuple[int, bool, bool], StageStep] = {}

    def _measure(self, n_blocks: int, first: bool, last: bool) -> StageStep:
        key = (n_blocks, first, last)
        if key not in self._steps:
            from torch._subclasses.fake_tensor import FakeTensorMode

            from llamatrain import ops

            ops.set_backend("torch")
            stage, mesh = _build_stage(self.cfg, n_blocks, self.num_gpus, self.gpus_per_node,
                                       first=first, last=last)
            with FakeTensorMode(allow_non_fake_inputs=True):
                stage.to_empty(device="cpu")
                stage.init_rope()
                # The first stage step on a new mesh allocates more than any later one (its
                # caches warming up): a step first, not counted, else the 4p-block step of a
                # later profile reads high and the blocks extended from it low.
                if not self._steps:
                    track_stage_step(stage, mesh, self.cfg, first=first, last=last)
                peak, saved, held = track_stage_step(stage, mesh, self.cfg, first=first,
                                                     last=last)
            gathered, activations = _split(peak)
            self._steps[key] = StageStep(gathered, activations, saved, held)
        return self._steps[key]

    def stage(self, n_blocks: int, *, first: bool, last: bool) -> StageStep:
        p = self.period
        if n_blocks <= 5 * p:
            return self._measure(n_blocks, first, last)
        four, five = self._measure(4 * p, False, False), self._measure(5 * p, False, False)
        per_block = (five + four.scale(-1)).scale(1 / p)
        ends = self._measure(4 * p, first, last) + four.scale(-1)
        return four + ends + per_block.scale(n_blocks - 4 * p)


def rank_memory(cfg: Config, layout: Layout, profile: StageProfile, micro_batches: int,
                pp_rank: int, params: int) -> Memory:
    """Memory of pipeline rank pp_rank: its shards (params bytes), what its stages gather, and
    the activations of the micro-batch chunks it holds in flight (in_flight, each a stage's
    saved activations, the stages taken alike) plus one backward's peak over them, plus the
    stages' transfer buffers. The profile may be measured at another micro-batch size."""
    stages = rank_stages(cfg, layout, pp_rank)
    k = layout.micro_batch_size / profile.cfg.train.micro_batch_size
    steps = [profile.stage(len(b), first=f, last=la).per_micro_batch(k) for b, f, la in stages]
    gathered = sum(x.gathered for x in steps)
    saved = sum(x.saved for x in steps) / len(steps)
    transient = max(x.peak - x.saved for x in steps)
    chunks = in_flight(layout, micro_batches, pp_rank)
    buffers = sum(pipeline_buffers(cfg, layout, micro_batches, first=f, last=la)
                  for _, f, la in stages)
    return Memory(params=params, grads=params, optimizer=2 * params, gathered=round(gathered),
                  activations=round(chunks * saved + transient + buffers))


def rank_shard_bytes(cfg: Config, layout: Layout, num_gpus: int, gpus_per_node: int,
                     pp_rank: int) -> int:
    """fp32 bytes of the parameter shards of pipeline rank pp_rank's stages, read off the real
    parallelized stage modules (in fake_world): every pipeline rank's first data-parallel rank
    holds shards of the size rank 0 holds of its own stages."""
    total = 0
    for blocks, first, last in rank_stages(cfg, layout, pp_rank):
        stage, _ = _build_stage(cfg, len(blocks), num_gpus, gpus_per_node, first=first,
                                last=last)
        total += shard_bytes(stage)
    return total


def even_shard_bytes(cfg: Config, layout: Layout, pp_rank: int) -> float:
    """fp32 bytes of pipeline rank pp_rank's parameters as an even share over dp_shard x tp."""
    m = cfg.model
    count = 0
    for blocks, first, last in rank_stages(cfg, layout, pp_rank):
        count += len(blocks) * block_params(m) + first * m.vocab_size * m.dim
        count += last * (m.vocab_size * m.dim + m.dim)
    return count * 4 / (layout.dp_shard * layout.tp)


def pipeline_dry_run(cfg: Config, num_gpus: int, gpus_per_node: int, *,
                     profile: StageProfile | None = None, exact: bool = True
                     ) -> list[Memory]:
    """Per-GPU memory of every pipeline rank of cfg's layout (pp > 1): shards read off the
    stage modules (exact) or an even share (the search), stage steps from `profile` (measured
    for this layout when None; may be of another micro-batch size). Must run inside
    fake_world(num_gpus)."""
    layout, _ = check_layout(cfg, num_gpus, gpus_per_node)
    m = ParallelDims.for_run(cfg, num_gpus, min(gpus_per_node, num_gpus)).pp_micro_batches
    profile = profile or StageProfile(cfg, num_gpus, gpus_per_node)
    out, shards = [], {}
    for r in range(layout.pp):
        kinds = tuple((len(b), f, la) for b, f, la in rank_stages(cfg, layout, r))
        if kinds not in shards:  # ranks whose stages are alike hold alike shards
            shards[kinds] = (rank_shard_bytes(cfg, layout, num_gpus, gpus_per_node, r) if exact
                             else round(even_shard_bytes(cfg, layout, r)))
        out.append(rank_memory(cfg, layout, profile, m, r, shards[kinds]))
    return out


def state_bytes(model_cfg, layout: Layout) -> float:
    """fp32 weights, gradients and AdamW's two moments per GPU as an even share of the model over
    dp_shard x tp GPUs (and pp stages, by the pipeline's fullest stage): the table's figure. The
    dry run reads rank 0's own shards, which uneven splits and the replicated RMSNorm gains make
    up to a few percent larger."""
    if layout.pp == 1:
        return num_params(model_cfg) * 16 / (layout.dp_shard * layout.tp)
    cfg = Config(model=model_cfg)
    return 4 * max(even_shard_bytes(cfg, layout, r) for r in range(layout.pp))


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


def gathered_bytes(cfg: Config, *, tp: int, params: int | None = None,
                   blocks: int | None = None) -> float:
    """Bytes of one tp-slice of `params` parameters holding `blocks` blocks (by default the whole
    model's; a pipeline rank's stages') as FSDP all-gathers them: bf16, but the converted
    linears' weights in float8 under train.float8 = tensorwise."""
    m = cfg.model
    n = num_params(m) if params is None else params
    blocks = m.n_layers if blocks is None else blocks
    fp8 = (float8_params(m, tp=tp) // m.n_layers * blocks if cfg.train.float8 == "tensorwise"
           else 0)
    return ((n - fp8) * PARAM_BYTES + fp8 * FLOAT8_BYTES) / tp


def _link(group: int, stride: int, gpus_per_node: int, fabric: Fabric) -> str:
    return "NVLink" if group * stride <= gpus_per_node else fabric.name


def recomputed_blocks(activation_checkpointing: str, blocks: range) -> int:
    """How many of `blocks` activation checkpointing recomputes in backward: all under full,
    those of even index in the model under selective (distributed.parallelize), none else."""
    if activation_checkpointing == "full":
        return len(blocks)
    if activation_checkpointing == "selective":
        return sum(1 for i in blocks if i % 2 == 0)
    return 0


def compute_seconds(cfg: Config, layout: Layout, *, num_gpus: int, device: GPU, mfu: float
                    ) -> tuple[float, float, float]:
    """(model, recompute, ideal) seconds of one step's compute on the busiest GPU at mfu of the
    device's peaks (mfu: the share of peak the GPU sustains on the FLOPs it executes): bf16's,
    and under train.float8 fp8's for the converted block linears (peak_seconds_per_token).

    model: flops.py's FLOPs (6N + attention, forward and backward) of that GPU's tokens through
    its blocks, the output projection on the last stage; recompute: the forward of every block
    activation checkpointing repeats (a block's forward is a third of its forward and backward);
    ideal: an even share of the step's model FLOPs, tokens / num_gpus. MFU is model FLOPs over
    time, so recomputation lowers it. The float8 engineer's compute term lives here alone."""
    m, seq = cfg.model, cfg.train.seq_len
    bf16 = peak_flops(device.name, "bf16") * mfu
    block = block_flops_per_token(m, seq)
    block_s = block / bf16  # seconds of one token through one block, forward and backward
    if cfg.train.float8 != "none":
        check_device(cfg.train.float8, arch=device.arch, device_name=device.name)
        converted = float8_flops_per_token(m, seq, tp=layout.tp)[0] / m.n_layers
        block_s = converted / (peak_flops(device.name, "fp8") * mfu) + (block - converted) / bf16
    output_s = 6.0 * (m.vocab_size * m.dim + m.dim) / bf16  # the output projection and norm
    # Tokens through each pipeline per step, split over its tensor-parallel group.
    tokens = cfg.train.global_batch_tokens / (num_gpus // layout.pp)
    busiest = (0.0, 0.0)
    for r in range(layout.pp):
        model = recompute = 0.0
        for blocks, _, last in rank_stages(cfg, layout, r):
            model += len(blocks) * block_s + last * output_s
            recompute += recomputed_blocks(layout.activation_checkpointing, blocks) * block_s / 3
        busiest = max(busiest, (model, recompute), key=sum)
    ideal = (cfg.train.global_batch_tokens / num_gpus
             * peak_seconds_per_token(cfg, device, tp=layout.tp) / mfu)
    return busiest[0] * tokens, busiest[1] * tokens, ideal


def bubble_fraction(layout: Layout, micro_batches: int) -> float:
    """The share of a pipelined step that the busiest rank waits, m micro-batches per run of the
    schedule and v stages per rank: GPipe and 1F1B (pp - 1) / (m + pp - 1), interleaved 1F1B
    (pp - 1) / (m v + pp - 1) (Narayanan et al. 2021), the interleaved zero bubble
    (pp - 1) / (3 m v + pp - 1): its weight-gradient passes fill two thirds of the warm-up and
    cool-down that 1F1B leaves idle when forward, input-gradient and weight-gradient passes take
    alike (ZB-H1, Qi et al. 2024). 0 without a pipeline."""
    pp, v, m = layout.pp, layout.pp_stages_per_rank, micro_batches
    if pp == 1:
        return 0.0
    fill = 3 * m * v if layout.pp_schedule == "zero_bubble" else m * v
    return (pp - 1) / (fill + pp - 1)


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

    Compute: compute_seconds, the busiest GPU's model FLOPs and recomputation (bf16's peak, and
    fp8's for the converted linears under train.float8). Pipeline: the bubble of bubble_fraction
    on top of compute, and the activations (forward) and their gradients (backward) sent between
    neighbouring stages, each a tp-slice of a micro-batch's residual stream, over NVLink when
    neighbours share a node, else over the fabric (each GPU its share of the node's NICs); the
    first micro-batch's way down the pipeline and the last one's way back are on the critical
    path, the rest overlaps with compute. FSDP, per step: every GPU all-gathers its tp-slice of
    its stages' parameters (gathered_bytes) twice (forward, backward; once under pipelining,
    which keeps them gathered for the step) and reduce-scatters the gradients within its
    dp_shard group; with replicas (HSDP) it all-reduces its gradient shard across them. A ring
    inside one node runs over NVLink; a ring across nodes moves, per node, what its GPUs send,
    spread over the node's NICs (tp rings per node share them); replica all-reduces go over
    NCCL's tree. They overlap with compute through prefetching, except the first unit's
    all-gather and the last unit's reductions. Tensor parallelism, per block and micro-batch:
    forward all-gathers the sequence before attention and the FFN and reduce-scatters after
    them, backward the reverse, and full activation checkpointing repeats the forward's; over
    NVLink, on the critical path.
    """
    m = cfg.model
    tp, s, r, pp = layout.tp, layout.dp_shard, layout.dp_replicate, layout.pp
    stages = max((rank_stages(cfg, layout, k) for k in range(pp)),
                 key=lambda st: sum(len(b) for b, _, _ in st))
    blocks = sum(len(b) for b, _, _ in stages)
    rank_params = (num_params(m) if pp == 1 else
                   sum(len(b) * block_params(m) + (f + la) * m.vocab_size * m.dim + la * m.dim
                       for b, f, la in stages))
    n_local = rank_params / tp
    units = blocks + 1
    net_bps = nics_per_node * link_gbps / 8 * 1e9 * fabric.efficiency
    nvl_bps = device.intra_node_gbs * 1e9
    net_hop, nvl_hop = fabric.hop_latency_us * 1e-6, NVLINK_HOP_US * 1e-6
    model_s, recompute_s, ideal_s = compute_seconds(cfg, layout, num_gpus=num_gpus,
                                                    device=device, mfu=mfu)
    compute = model_s + recompute_s
    _, accum = batch_geometry(replace(cfg.train, micro_batch_size=layout.micro_batch_size),
                              num_gpus // (pp * tp))
    micro = layout.pp_microbatches or accum  # per run of the schedule
    rounds = accum // micro
    colls: list[Collective] = []
    node_bytes = 0.0
    lat_ag = lat_ar = 0.0
    fsdp = 0.0
    gathers = 2 if pp == 1 else rounds  # all-gathers of each unit per step
    if s > 1:
        ag_bytes = (s - 1) / s * gathered_bytes(cfg, tp=tp, params=rank_params, blocks=blocks)
        rs_bytes = (s - 1) / s * n_local * GRAD_BYTES * (1 if pp == 1 else rounds)
        link = _link(s, tp, gpus_per_node, fabric)
        if link == "NVLink":
            bps, lat_ag = nvl_bps, (s - 1) * nvl_hop
        else:
            nodes = math.ceil(s * tp / gpus_per_node)
            bps = min(nvl_bps, net_bps / tp)
            lat_ag = (nodes - 1) * net_hop + (s - nodes) * nvl_hop
            node_bytes += tp * (gathers * ag_bytes + rs_bytes)
        gathered = "bf16, float8 linears" if cfg.train.float8 == "tensorwise" else "bf16"
        colls += [Collective(f"FSDP parameters ({gathered})", "all-gather", s, link,
                             gathers * units, gathers * ag_bytes,
                             gathers * ag_bytes / bps + gathers * units * lat_ag),
                  Collective("FSDP gradients (fp32)", "reduce-scatter", s, link, units,
                             rs_bytes, rs_bytes / bps + units * lat_ag)]
        fsdp += (gathers * ag_bytes + rs_bytes) / bps
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
    fsdp_comm = fsdp + units * ((gathers + 1) * lat_ag + lat_ar)
    exposed = fsdp / units + 2 * lat_ag + lat_ar
    act = layout.micro_batch_size * cfg.train.seq_len * m.dim * ACT_BYTES
    tp_s = 0.0
    if tp > 1:
        per_call = (tp - 1) / tp * act
        passes = 3 if layout.activation_checkpointing == "full" else 2
        if layout.activation_checkpointing == "selective":
            passes = 2.5
        calls = round(4 * passes * blocks * accum)
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
    bubble = bubble_fraction(layout, micro)
    bubble_s = compute * bubble / (1 - bubble)
    p2p_s = 0.0
    if pp > 1:
        # Pipeline neighbours are num_gpus / pp ranks apart (pp is the outermost mesh axis).
        link = "NVLink" if num_gpus // pp < gpus_per_node else fabric.name
        sends = accum * sum((not f) + (not la) for _, f, la in stages)
        per_send = act / tp
        if link == "NVLink":
            t_send = per_send / nvl_bps + nvl_hop
        else:
            t_send = per_send / (net_bps / gpus_per_node) + net_hop
            node_bytes += gpus_per_node * sends * per_send
        total_p2p = sends * t_send
        hops = pp * layout.pp_stages_per_rank - 1
        p2p_s = 2 * hops * t_send + max(0.0, total_p2p - compute)
        colls.append(Collective("pipeline activations and gradients (bf16)", "send / recv", 2,
                                link, sends, sends * per_send, total_p2p))
    step = (compute + bubble_s + tp_s + p2p_s + exposed + max(0.0, fsdp_comm - compute))
    return {
        "compute_s": compute, "recompute_s": recompute_s, "bubble": bubble,
        "bubble_s": bubble_s, "p2p_s": p2p_s, "fsdp_comm_s": fsdp_comm, "tp_comm_s": tp_s,
        # MFU against the bf16 peak, as the trainer logs it (float8's compute goes faster).
        "step_s": step, "efficiency": ideal_s / step,
        "mfu": cfg.train.global_batch_tokens / num_gpus * flops_per_token(m, cfg.train.seq_len)
        / (peak_flops(device.name, "bf16") * step),
        "micro_batches": accum, "pp_micro_batches": micro,
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


def plan(cfg: Config, setup: Setup, *, search: bool, top: int = 10) -> dict[str, Any]:
    """The dry run of cfg's layout (search=False), or the search: every layout the trainer
    accepts, ranked by step time, measured from the fastest down until `top` of them fit."""
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
    profiles: dict[tuple, StageProfile] = {}

    def evaluate(layout: Layout) -> dict[str, Any]:
        if layout.pp > 1:
            return _evaluate_pipeline(layout)
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

    def _evaluate_pipeline(layout: Layout) -> dict[str, Any]:
        if layout == requested:  # measured as it is
            ranks = pipeline_dry_run(with_layout(cfg, layout), g, gpn)
        else:
            # The search measures stage steps once per (tp, checkpointing), at one sequence per
            # micro-batch, and takes the shards as an even share.
            key = (layout.tp, layout.activation_checkpointing)
            if key not in profiles:
                one = with_layout(cfg, replace(layout, micro_batch_size=1))
                profiles[key] = StageProfile(one, g, gpn)
            ranks = pipeline_dry_run(with_layout(cfg, layout), g, gpn, profile=profiles[key],
                                     exact=False)
        fullest = max(range(len(ranks)), key=lambda i: ranks[i].total)
        out = _evaluate(with_layout(cfg, layout), layout, setup, ranks[fullest])
        out["fullest_rank"] = fullest
        out["ranks"] = [{**asdict(x), "total": x.total} for x in ranks]
        return out

    results, candidates = [], []
    with fake_world(g):
        if requested is not None and refusal is None:  # the config's own layout, as it is
            results.append(evaluate(requested))
        if search or refusal is not None or not results[0]["fits"]:
            # Search for what fits: everything, or for a layout that does not, its alternatives.
            # Step times need no dry run: the layouts are measured fastest first, until `top`
            # fit and the next is slower than the last of them.
            candidates = [x for x in candidate_layouts(cfg, g, gpn) if x != requested]
            device, fabric = gpu(setup.device), FABRICS[setup.fabric]
            timed = sorted(((step_model(with_layout(cfg, x), x, num_gpus=g, gpus_per_node=gpn,
                                        device=device, mfu=setup.mfu, fabric=fabric,
                                        link_gbps=setup.link_gbps,
                                        nics_per_node=setup.nics_per_node)["step_s"], i, x)
                            for i, x in enumerate(candidates)))
            found = [r["step_s"] for r in results if r["fits"]]
            for step_s, _, x in timed:
                if len(found) >= top and step_s > max(found):
                    break
                results.append(evaluate(x))
                if results[-1]["fits"]:
                    found.append(step_s)
    fitting = sorted((r for r in results if r["fits"]),
                     key=lambda r: (r["step_s"], r["memory"]["total"]))
    out = {"params": num_params(cfg.model), "gpus": g, "gpus_per_node": gpn,
           "device": device.name, "memory_gib": device.memory_gib, "mfu": setup.mfu,
           "fabric": FABRICS[setup.fabric].name, "link_gbps": setup.link_gbps,
           "seq_len": cfg.train.seq_len, "global_batch_tokens": cfg.train.global_batch_tokens,
           "float8": cfg.train.float8,
           "searched": search or refusal is not None, "candidates": len(candidates),
           "layouts": results, "fitting": fitting,
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
             f"{USABLE_FRACTION:.0%}); step time at {r['mfu']:.0%} of peak on the FLOPs "
             f"computed{_float8_note(r)}, {r['fabric']} {r['link_gbps']:g} Gbps per NIC"]
    header = (f"{'pp':>3} {'schedule':<19} {'tp':>3} {'shard':>6} {'repl':>5} {'AC':>9} "
              f"{'mbs':>3} {'accum':>5} {'params':>7} {'grads':>6} {'optim':>6} {'gather':>7} "
              f"{'activ':>6} {'total':>6} {'step s':>7} {'bubble':>6} {'MFU':>6}")

    def row(x: dict[str, Any]) -> str:
        lay, mem = Layout(**x["layout"]), x["memory"]
        return (f"{lay.pp:>3} {lay.schedule_name:<19} {lay.tp:>3} {lay.dp_shard:>6} "
                f"{lay.dp_replicate:>5} {lay.activation_checkpointing:>9} "
                f"{lay.micro_batch_size:>3} {x['micro_batches']:>5} {_gib(mem['params']):>7} "
                f"{_gib(mem['grads']):>6} {_gib(mem['optimizer']):>6} "
                f"{_gib(mem['gathered']):>7} {_gib(mem['activations']):>6} "
                f"{_gib(mem['total']):>6} {x['step_s']:>7.2f} {x['bubble']:>6.1%} "
                f"{x['mfu']:>6.1%}")

    chosen = r.get("requested") or r["best"]
    if r["config_refusal"]:
        lines.append(f"the config's own layout is refused: {r['config_refusal']}")
    note = "memory in GiB per GPU, of the fullest pipeline rank"
    if r["searched"]:
        lines += ["", f"layouts that fit, fastest first (of the {r['candidates']} the trainer "
                  f"accepts, measured from the fastest down until {top} fit: "
                  f"{len(r['layouts'])} measured; {note}):", header]
        lines += [row(x) for x in r["fitting"][:top]]
    else:
        lines += ["", f"{note}:", header, row(chosen)]
        lines.append("fits" if chosen["fits"] else
                     f"does NOT fit: {_gib(chosen['memory']['total'])} GiB of "
                     f"{_gib(chosen['budget'])} GiB")
    if chosen is not None:
        lines += ["", f"collectives of one step ({Layout(**chosen['layout']).short()}):"]
        for c in chosen["collectives"]:
            lines.append(f"  {c['what']:<42} {c['kind']:<28} over {c['group']:>5} "
                         f"({c['link']:<10}) x{c['count']:>5}: {c['bytes'] / 1e9:8.2f} GB "
                         f"per GPU, {c['seconds']:.3f} s")
        if "ranks" in chosen:
            lines.append("  memory per pipeline rank (GiB): " + ", ".join(
                f"{i}: {_gib(m['total'])}" for i, m in enumerate(chosen["ranks"])))
        exposed = max(0.0, chosen["step_s"] - chosen["compute_s"] - chosen["bubble_s"]
                   - chosen["tp_comm_s"] - chosen["p2p_s"])
        lines.append(f"  step {chosen['step_s']:.2f} s = compute {chosen['compute_s']:.2f} s "
                     f"(of it recomputation {chosen['recompute_s']:.2f} s) + pipeline bubble "
                     f"{chosen['bubble_s']:.2f} s + tensor parallel {chosen['tp_comm_s']:.2f} s "
                     f"+ pipeline transfers {chosen['p2p_s']:.2f} s + FSDP not hidden behind "
                     f"compute {exposed:.2f} s (of {chosen['fsdp_comm_s']:.2f} s); MFU "
                     f"{chosen['mfu']:.1%}")
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
    parser.add_argument("--mfu", type=float, default=0.45,
                        help="share of the bf16 peak sustained on the FLOPs computed, "
                        "recomputation included (default 0.45)")
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
