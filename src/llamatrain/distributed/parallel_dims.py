"""The layout of a run, in one place: the degrees of its device mesh (pp, dp_replicate, dp_shard,
tp, outermost first), their validation, the mesh, this rank's coordinates in it, and the batch
geometry that follows. The trainer, `python -m llamatrain.plan` and `carbon project` ask
ParallelDims; none of them re-derives a rank from the mesh's order.

Ranks are laid out row-major over (pp, dp_replicate, dp_shard, tp): tp innermost, so that a
tensor-parallel group is consecutive ranks of one node, and pp outermost, so that pipeline stages
sit on different nodes. Every data-parallel rank (dp_replicate x dp_shard of them) reads its own
slice of the global batch; the ranks of one tensor-parallel group and of one pipeline read the
same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamatrain.config import Config, ParallelConfig, TrainConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

AXES = ("pp", "dp_replicate", "dp_shard", "tp")
# Pipeline schedules with one stage per rank; the others interleave several (looped).
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Coordinates:
    """Where one rank sits in the mesh."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    dp_rank: int  # among the dp_replicate x dp_shard data-parallel ranks


@dataclass(frozen=True)
class RunLayout:
    """What a run of a config on a world size is laid out as (ParallelDims.for_run)."""

    dims: ParallelDims
    global_batch: int  # sequences per step
    accum: int  # micro-batches per data-parallel rank and step
    pp_micro_batches: int  # micro-batches per run of the pipeline schedule (accum without one)


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of a layout; their product is the world size."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int,
                    gpus_per_node: int | None = None) -> ParallelDims:
        """The degrees of cfg on world_size ranks, the -1 entry filled in; a mismatch is a
        ValueError naming the key, the value and what would work.

        Tensor parallelism stays inside a node, so tp must divide the GPUs per node (the
        processes per node) as well as the world size; the data-parallel ranks are
        world_size / (pp x tp)."""
        if world_size < 1:
            raise ValueError(f"world size = {world_size}: expected >= 1")
        pp, tp = cfg.pp, cfg.tp
        if world_size % tp:
            raise ValueError(f"parallel.tp = {tp}: must divide the world size {world_size}")
        if gpus_per_node is not None and gpus_per_node % tp:
            fits = [d for d in (1, 2, 4, 8, 16) if gpus_per_node % d == 0 and world_size % d == 0]
            raise ValueError(f"parallel.tp = {tp}: must divide the {gpus_per_node} GPUs per node "
                             f"(tensor parallelism stays inside a node; would work: "
                             f"{', '.join(map(str, fits))})")
        if world_size % (pp * tp):
            raise ValueError(f"parallel.pp = {pp}: pp x tp = {pp * tp} must divide the world "
                             f"size {world_size}")
        dp = world_size // (pp * tp)
        replicate, shard = cfg.dp_replicate, cfg.dp_shard
        if shard == -1:
            shard = dp // replicate
        if replicate == -1:
            replicate = dp // shard
        if replicate * shard != dp:
            split = {f"parallel.{k}": v for k, v in (("pp", pp), ("tp", tp)) if v > 1}
            size = f"the world size {world_size}"
            if len(split) == 1:
                size = f"world size / {next(iter(split))} = {world_size} / {pp * tp} = {dp}"
            elif split:
                size = (f"world size / ({' x '.join(split)}) = {world_size} / ({pp} x {tp}) "
                        f"= {dp}")
            raise ValueError(
                f"parallel.dp_replicate x parallel.dp_shard = {cfg.dp_replicate} x "
                f"{cfg.dp_shard}: must multiply to {size}")
        return cls(pp, replicate, shard, tp)

    @classmethod
    def for_run(cls, cfg: Config, world_size: int, gpus_per_node: int | None = None
                ) -> RunLayout:
        """The one rule of whether cfg's layout runs on world_size ranks, which the trainer,
        `plan` and `carbon project` all call: the degrees (from_config), the batch geometry
        over the data-parallel ranks and the pipeline's micro-batches, or the first ValueError
        among them (one line naming the key, the value and what would work)."""
        dims = cls.from_config(cfg.parallel, world_size, gpus_per_node)
        global_batch, accum = dims.batch_geometry(cfg.train)
        micro = dims.pipeline_micro_batches(cfg.parallel, n_layers=cfg.model.n_layers,
                                            accum=accum)
        return RunLayout(dims, global_batch, accum, micro)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own slice of every global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(AXES, (self.pp, self.dp_replicate, self.dp_shard, self.tp), strict=True))

    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank = {rank}: expected 0 <= rank < {self.world_size}")
        rest, tp = divmod(rank, self.tp)
        rest, shard = divmod(rest, self.dp_shard)
        pp, replicate = divmod(rest, self.dp_replicate)
        return Coordinates(pp, replicate, shard, tp, replicate * self.dp_shard + shard)

    def batch_geometry(self, cfg: TrainConfig) -> tuple[int, int]:
        return batch_geometry(cfg, self.dp_size)

    def pipeline_micro_batches(self, cfg: ParallelConfig, *, n_layers: int, accum: int) -> int:
        """The micro-batches of one run of the pipeline schedule (accum when there is no
        pipeline), or the ValueError that names what breaks the pipeline's rules: every stage
        holds at least one block, the schedule has the stages per rank it needs, and the
        micro-batches divide the accum a data-parallel rank runs per step and fill the
        pipeline (at least pp of them; a multiple of pp for the interleaved schedules)."""
        pp, v, schedule = self.pp, cfg.pp_stages_per_rank, cfg.pp_schedule
        if pp == 1:
            if v > 1:
                raise ValueError(f"parallel.pp_stages_per_rank = {v}: needs parallel.pp > 1")
            return accum
        if schedule in SINGLE_STAGE_SCHEDULES and v != 1:
            raise ValueError(f"parallel.pp_stages_per_rank = {v}: parallel.pp_schedule = "
                             f"{schedule!r} runs one stage per rank (would work: 1, or "
                             "parallel.pp_schedule = 'interleaved_1f1b' or 'zero_bubble')")
        if schedule not in SINGLE_STAGE_SCHEDULES and v < 2:
            raise ValueError(f"parallel.pp_stages_per_rank = {v}: parallel.pp_schedule = "
                             f"{schedule!r} interleaves 2 or more stages per rank (would work: "
                             "2 or more, or parallel.pp_schedule = '1f1b')")
        if pp * v > n_layers:
            fits = [d for d in range(1, v + 1) if pp * d <= n_layers]
            hint = (f"parallel.pp_stages_per_rank = {', '.join(map(str, fits))}" if fits
                    else f"parallel.pp <= {n_layers}")
            raise ValueError(f"parallel.pp = {pp}: pp x pp_stages_per_rank = {pp} x {v} = "
                             f"{pp * v} stages for model.n_layers = {n_layers} blocks; every "
                             f"stage holds at least one (would work: {hint})")
        looped = schedule not in SINGLE_STAGE_SCHEDULES

        def fills(m: int) -> bool:
            return m >= pp and (not looped or m % pp == 0)

        rule = f"a multiple of parallel.pp = {pp}" if looped else f"at least parallel.pp = {pp}"
        if cfg.pp_microbatches == 0:
            if not fills(accum):
                raise ValueError(
                    f"parallel.pp = {pp}: a data-parallel rank runs {accum} micro-batch(es) per "
                    f"step, which do not fill the pipeline ({schedule} needs {rule}; would "
                    "work: a smaller train.micro_batch_size, a larger train.global_batch_tokens "
                    "or fewer data-parallel ranks)")
            return accum
        m = cfg.pp_microbatches
        if accum % m or not fills(m):
            fits = [d for d in range(1, accum + 1) if accum % d == 0 and fills(d)]
            raise ValueError(
                f"parallel.pp_microbatches = {m}: must divide the {accum} micro-batch(es) a "
                f"data-parallel rank runs per step and be {rule} (would work: "
                f"{', '.join(map(str, [0, *fits]))})")
        return m

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The device mesh over the process group: axes pp, dp_replicate and tp where their
        degree is > 1, dp_shard always (FSDP shards over it, even when it is 1)."""
        from torch.distributed.device_mesh import init_device_mesh

        axes = {name: size for name, size in self.shape.items()
                if size > 1 or name == "dp_shard"}
        return init_device_mesh(device_type, tuple(axes.values()), mesh_dim_names=tuple(axes))


def stage_blocks(n_layers: int, num_stages: int) -> list[range]:
    """The blocks of each pipeline stage (distributed.pipeline builds the stages): an even
    split; a remainder goes one block each to the inner stages, then to the first, then to the
    last, because the first also holds the embedding and the last the final norm, the output
    projection and the loss."""
    assert 1 <= num_stages <= n_layers, (num_stages, n_layers)
    base, extra = divmod(n_layers, num_stages)
    sizes = [base] * num_stages
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1]
    for s in order[:extra]:
        sizes[s] += 1
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages pipeline rank pp_rank holds, looped as torch's interleaved schedules place
    them: r, r + pp, r + 2 pp, ..."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel part of the mesh, over which FSDP shards (and replicates)."""
    names = mesh.mesh_dim_names or ()
    data = tuple(n for n in names if n in ("dp_replicate", "dp_shard"))
    return mesh if data == names else mesh[data]


def tp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    names = mesh.mesh_dim_names or () if mesh is not None else ()
    return mesh["tp"] if "tp" in names else None


def batch_geometry(cfg: TrainConfig, dp_size: int) -> tuple[int, int]:
    """(sequences per global batch, micro-batches per data-parallel rank per step).

    dp_size is the number of data-parallel ranks, world size / (pp x tp): the ranks of one
    tensor-parallel group and of one pipeline work on the same sequences."""
    per_pass = dp_size * cfg.micro_batch_size * cfg.seq_len
    if cfg.global_batch_tokens % per_pass:
        raise ValueError(
            f"train.global_batch_tokens = {cfg.global_batch_tokens}: not a multiple of "
            f"data-parallel ranks x micro_batch_size x seq_len = {dp_size} x "
            f"{cfg.micro_batch_size} x {cfg.seq_len} = {per_pass}"
        )
    return cfg.global_batch_tokens // cfg.seq_len, cfg.global_batch_tokens // per_pass
