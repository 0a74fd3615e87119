"""Pipeline parallelism with torch.distributed.pipelining: this rank's stage modules, and the
schedule that runs a step's micro-batches through them.

The blocks are split into pp x pp_stages_per_rank stages by parallel_dims.stage_blocks (evenly;
a remainder goes to the inner stages first, because the first stage also holds the embedding and
the last the final norm, the output projection and the loss), placed looped: rank r holds stages
r, r + pp, ... (parallel_dims.stage_ids). A stage is the Transformer with the other blocks removed
and, away from the ends, its embedding or output set to None (model.py runs what it holds), so its
parameters keep their names in the whole model: DCP saves the same names at any pp degree, a
checkpoint resumes across pp degrees and `convert to-hf` reads it unchanged. Each stage module
gets TP, AC, compile and FSDP2 from parallelize(), as a whole model does.

Schedules (parallel.pp_schedule): torch's ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B
and ScheduleInterleavedZeroBubble (ZB1P: backward split into input- and weight-gradient passes).
The last stage computes the loss of llamatrain.loss: fused with the output projection inside its
forward (which FSDP wraps, so output.weight is gathered as for any forward), or of its logits in
the schedule's loss function. That function weighs each micro-batch's mean by its share of the
global batch's unmasked targets, as the trainer does without pipelining, so torch's own scaling
of the gradients by 1 / micro-batches is turned off.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from llamatrain.config import Config
from llamatrain.distributed.float8 import Float8
from llamatrain.distributed.parallel_dims import (
    SINGLE_STAGE_SCHEDULES,
    ParallelDims,
    stage_blocks,
    stage_ids,
)
from llamatrain.distributed.parallelize import materialize, parallelize
from llamatrain.loss import IGNORE_INDEX, loss_context, output_loss, target_count
from llamatrain.model import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}


def stage_module(model: Transformer, blocks: range, *, first: bool, last: bool) -> Transformer:
    """A copy of a meta-device model holding only `blocks` (and the ends it is first or last
    for), its parameters named as in the whole model."""
    stage = copy.deepcopy(model)
    for key in list(stage.layers):
        if int(key) not in blocks:
            del stage.layers[key]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


class RankModel(nn.Module):
    """The stage modules of one rank as one module, under the names of the whole model: what the
    optimizer steps, clipping measures and DCP saves. It shares the stages' modules; the stages
    themselves (FSDP roots, which the schedule runs) are kept in `stages`."""

    def __init__(self, stages: list[Transformer]):
        super().__init__()
        first = [s for s in stages if s.tok_embeddings is not None]
        last = [s for s in stages if s.output is not None]
        self.tok_embeddings = first[0].tok_embeddings if first else None
        self.layers = nn.ModuleDict({k: b for s in stages for k, b in s.layers.items()})
        self.norm = last[0].norm if last else None
        self.output = last[0].output if last else None
        self.stages = list(stages)  # a plain list: not registered twice


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them.

    `model` is the RankModel for the optimizer and checkpoints; `step` runs one optimizer step's
    micro-batches (forward and backward), `evaluate` the validation batches (forward only)."""

    def __init__(self, cfg: Config, model: Transformer, dims: ParallelDims, mesh: DeviceMesh,
                 device: torch.device, *, rank: int, micro_batches: int,
                 param_dtype: torch.dtype, fused: bool, float8: Float8 | None = None):
        p = cfg.parallel
        self.mesh, self.fused, self.dp_size = mesh, fused, dims.dp_size
        self.micro_batches, self.micro_batch_size = micro_batches, cfg.train.micro_batch_size
        self.group = mesh["pp"].get_group()
        num_stages = dims.pp * p.pp_stages_per_rank
        blocks = stage_blocks(cfg.model.n_layers, num_stages)
        ids = stage_ids(dims.coordinates(rank).pp, dims.pp, p.pp_stages_per_rank)
        parts, converted = [], []
        for i in ids:
            part = stage_module(model, blocks[i], first=i == 0, last=i == num_stages - 1)
            parallelize(part, p, mesh, param_dtype=param_dtype, float8=float8)
            converted += float8.converted if float8 is not None else []
            materialize(part, device, seed=cfg.train.seed)
            parts.append(part)
        if float8 is not None:
            float8.converted = converted  # every stage's, for the log
        self.model = RankModel(parts)
        self.stages = [PipelineStage(part, i, num_stages, device, group=self.group)
                       for part, i in zip(parts, ids, strict=True)]
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)
        # Every micro-batch's loss is weighed by its share of the global batch (see step).
        self._weight = torch.ones((), device=device)
        schedule = SCHEDULES[p.pp_schedule]
        stages = self.stages[0] if p.pp_schedule in SINGLE_STAGE_SCHEDULES else self.stages
        self.schedule = schedule(stages, n_microbatches=micro_batches, loss_fn=self._loss,
                                 scale_grads=False)

    def _loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return output_loss(output, labels, fused=self.fused) * target_count(labels) * self._weight

    def _run(self, batches: list[dict[str, torch.Tensor]], *, train: bool) -> torch.Tensor:
        """The sum of the weighed losses of `batches`, in rounds of micro_batches (0 on ranks
        without the last stage)."""
        total = torch.zeros((), device=self._weight.device)
        run = self.schedule.step if train else self.schedule.eval
        with loss_context(self.mesh):
            for start in range(0, len(batches), self.micro_batches):
                chunk = batches[start : start + self.micro_batches]
                tokens = torch.cat([b["input_ids"] for b in chunk])
                labels = torch.cat([b["labels"] for b in chunk])
                losses: list[torch.Tensor] = []
                # The fused loss runs in the last stage's forward, which needs the targets.
                kwargs = {"targets": labels} if self.fused else {}
                run(*((tokens,) if self.has_first else ()),
                    target=labels if self.has_last else None, losses=losses,
                    return_outputs=False, **kwargs)
                if losses:
                    total += torch.stack(losses).sum().detach()
        return total

    def step(self, micro: list[dict[str, torch.Tensor]], *, global_count: torch.Tensor,
             scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches of one step; the gradients of the
        mean loss over the global_count unmasked targets of the global batch. Returns this
        rank's share of that loss (0 without the last stage). `scale` multiplies the loss
        (fault injection)."""
        # FSDP averages the gradients over the data-parallel ranks: the shares are scaled up by
        # their number, as without pipelining.
        self._weight = scale * self.dp_size / global_count
        return self._run(micro, train=True) / self.dp_size

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """[sum of the losses of every unmasked target of `batches`, their count] (zeros
        without the last stage). Each batch is padded to the micro-batch size, and the batches
        to a multiple of micro_batches, with masked targets, which count for nothing."""
        padded = [_pad(b, self.micro_batch_size) for b in batches]
        blank = {"input_ids": torch.zeros_like(padded[0]["input_ids"]),
                 "labels": torch.full_like(padded[0]["labels"], IGNORE_INDEX)}
        padded += [blank] * (-len(padded) % self.micro_batches)
        self._weight = torch.ones((), device=self._weight.device)
        total = self._run(padded, train=False)
        count = sum(target_count(b["labels"]) for b in batches) if self.has_last else 0
        return torch.stack([total, torch.as_tensor(count, device=total.device).float()])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of every stage of the pipeline by their global norm, which is
        returned: each rank's norm is over its own stages' (sharded) gradients, and the squares
        are summed over the pipeline's ranks."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        square = norm.float() ** 2
        dist.all_reduce(square, group=self.group)
        norm = square.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm


def _pad(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """batch with masked rows appended up to `rows` sequences."""
    short = rows - batch["input_ids"].shape[0]
    if short == 0:
        return batch
    tokens, labels = batch["input_ids"], batch["labels"]
    return {"input_ids": torch.cat([tokens, tokens.new_zeros((short, tokens.shape[1]))]),
            "labels": torch.cat([labels, labels.new_full((short, labels.shape[1]),
                                                         IGNORE_INDEX)])}
