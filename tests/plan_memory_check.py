"""Run under torchrun (gloo): train-step memory of a small model on real tensors, measured with the
tracker the planner uses on fake ones; prints the figures of every rank (pipeline ranks first) as
JSON on rank 0.

argv: parallel.tp, parallel.activation_checkpointing[, parallel.pp]. Without a pipeline, one
micro-batch's step; with one, a step of the 1F1B schedule over 4 micro-batches, after one that
sets the pipeline up, with the stage's transfer buffers counted as activations."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

from llamatrain import ops
from llamatrain.config import Config, ModelConfig, ParallelConfig, TrainConfig
from llamatrain.distributed.parallel_dims import ParallelDims
from llamatrain.distributed.parallelize import local_bytes, materialize, parallelize
from llamatrain.distributed.pipeline import Pipeline
from llamatrain.distributed.world import init_distributed
from llamatrain.loss import loss_context, sequence_loss
from llamatrain.model import Transformer
from llamatrain.plan import _split, track_step
from llamatrain.train import build_optimizer

MICRO_BATCHES = 4

world = init_distributed()
ops.set_backend("torch")
pp = int(sys.argv[3]) if len(sys.argv) > 3 else 1
cfg = Config(model=ModelConfig(dim=128, n_layers=4 if pp > 1 else 3, n_heads=4, n_kv_heads=2,
                               vocab_size=512, multiple_of=32, max_seq_len=128),
             train=TrainConfig(seq_len=128, micro_batch_size=2),
             parallel=ParallelConfig(tp=int(sys.argv[1]), activation_checkpointing=sys.argv[2],
                                     pp=pp))
dims = ParallelDims.from_config(cfg.parallel, world.world_size, world.local_world_size)
mesh = dims.build_mesh(world.device.type)
with torch.device("meta"):
    model = Transformer(cfg.model)


def batches() -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, cfg.model.vocab_size,
                           (cfg.train.micro_batch_size, cfg.train.seq_len))
    return [{"input_ids": tokens, "labels": tokens} for _ in range(MICRO_BATCHES)]


def transfer_buffers(pipeline: Pipeline) -> int:
    """Bytes of the stage's receive buffers and the input gradients it sends back."""
    stage = pipeline.stages[0]
    held = [info.buffer for infos in stage.args_recv_info.values() for info in infos
            if not info.is_root_arg]
    held += [info.buffer for infos in getattr(stage, "grad_recv_info", {}).values()
             for info in infos]
    held += [b.grad for b in held if b is not None and b.grad is not None]
    return local_bytes(held)


if pp == 1:
    parallelize(model, cfg.parallel, mesh, param_dtype=torch.bfloat16)
    materialize(model, world.device, seed=0)
    optimizer = build_optimizer(model, cfg.train, world.device)
    track_step(model, mesh, cfg)  # warm up, as the planner does
    peak = track_step(model, mesh, cfg)
    # A real step for the gradient and AdamW state bytes.
    tokens = torch.randint(0, cfg.model.vocab_size,
                           (cfg.train.micro_batch_size, cfg.train.seq_len))
    with loss_context(mesh):
        sequence_loss(model(tokens), tokens).backward()
    buffers = 0
else:
    pipeline = Pipeline(cfg, model, dims, mesh, world.device, rank=world.rank,
                        micro_batches=MICRO_BATCHES, param_dtype=torch.bfloat16, fused=False)
    model = pipeline.model
    optimizer = build_optimizer(model, cfg.train, world.device)
    count = torch.tensor(float(MICRO_BATCHES * cfg.train.micro_batch_size * cfg.train.seq_len))
    pipeline.step(batches(), global_count=count)  # sets the pipeline up (and warms up)
    model.zero_grad(set_to_none=True)
    stage = pipeline.stages[0]
    tracker = FSDPMemTracker(stage.submod)
    forward = stage.forward_one_chunk

    def forward_one_chunk(*args, **kwargs):
        # The tracker refuses a second forward of its module in one step (it keeps per-module
        # figures, not needed here): forget them before each micro-batch; the peak is kept.
        tracker.reset_mod_stats()
        return forward(*args, **kwargs)

    stage.forward_one_chunk = forward_one_chunk
    with tracker:
        pipeline.step(batches(), global_count=count)
    stage.forward_one_chunk = forward
    peak = {getattr(k, "value", k): v
            for k, v in next(iter(tracker.get_tracker_snapshot("peak").values())).items()}
    buffers = transfer_buffers(pipeline)
params = list(model.parameters())
grads = local_bytes(p.grad for p in params)
optimizer.step()
states = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
gathered, activations = _split(peak)
mine = {"params": local_bytes(params), "grads": grads, "optimizer": local_bytes(states),
        "gathered": gathered, "activations": activations + buffers}
everyone = [None] * world.world_size
dist.all_gather_object(everyone, mine)
if world.rank == 0:
    print(json.dumps(everyone[0] if pp == 1 else everyone))
dist.destroy_process_group()
