"""Run under torchrun (gloo): train-step memory of a small model on real tensors, measured with the
tracker the planner uses on fake ones; prints rank 0's figures as JSON.

argv: parallel.tp, parallel.activation_checkpointing."""

import json
import sys

import torch
import torch.distributed as dist

from llamatrain import ops
from llamatrain.config import Config, ModelConfig, ParallelConfig, TrainConfig
from llamatrain.distributed.parallel_dims import ParallelDims
from llamatrain.distributed.parallelize import local_bytes, materialize, parallelize
from llamatrain.distributed.world import init_distributed
from llamatrain.loss import loss_context, sequence_loss
from llamatrain.model import Transformer
from llamatrain.plan import _split, track_step
from llamatrain.train import build_optimizer

world = init_distributed()
ops.set_backend("torch")
cfg = Config(model=ModelConfig(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512,
                               multiple_of=32, max_seq_len=128),
             train=TrainConfig(seq_len=128, micro_batch_size=2),
             parallel=ParallelConfig(tp=int(sys.argv[1]), activation_checkpointing=sys.argv[2]))
dims = ParallelDims.from_config(cfg.parallel, world.world_size, world.local_world_size)
mesh = dims.build_mesh(world.device.type)
with torch.device("meta"):
    model = Transformer(cfg.model)
parallelize(model, cfg.parallel, mesh, param_dtype=torch.bfloat16)
materialize(model, world.device, seed=0)
optimizer = build_optimizer(model, cfg.train, world.device)
track_step(model, mesh, cfg)  # warm up, as the planner does
peak = track_step(model, mesh, cfg)
# A real step for the gradient and AdamW state bytes.
tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len))
with loss_context(mesh):
    sequence_loss(model(tokens), tokens).backward()
params = list(model.parameters())
grads = local_bytes(p.grad for p in params)
optimizer.step()
states = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
gathered, activations = _split(peak)
if world.rank == 0:
    print(json.dumps({"params": local_bytes(params), "grads": grads,
                      "optimizer": local_bytes(states), "gathered": gathered,
                      "activations": activations}))
dist.destroy_process_group()
