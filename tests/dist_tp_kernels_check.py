"""Run under torchrun with 2 processes: tensor parallelism with the Triton kernels (through the
interpreter on a CPU) on each rank's local heads and slices gives the loss and gradients of one
process with the PyTorch references (exit 0), or not (exit 1)."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llamatrain import ops
from llamatrain.config import ModelConfig, ParallelConfig
from llamatrain.distributed.parallel_dims import ParallelDims
from llamatrain.distributed.parallelize import materialize, parallelize
from llamatrain.distributed.world import init_distributed
from llamatrain.loss import loss_context, vocab_parallel_cross_entropy
from llamatrain.model import Transformer

world = init_distributed()
cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                  max_seq_len=8)
tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
targets = torch.roll(tokens, -1, dims=1)

ops.set_backend("torch")
reference = Transformer(cfg, seed=3)
ref_loss = ops.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten())
ref_loss.backward()

ops.set_backend("triton")
parallel = ParallelConfig(tp=2)
dims = ParallelDims.from_config(parallel, world.world_size, world.local_world_size)
mesh = dims.build_mesh(world.device.type)
with torch.device("meta"):
    model = Transformer(cfg)
parallelize(model, parallel, mesh, param_dtype=torch.float32)
materialize(model, world.device, seed=3)
with loss_context(mesh):
    logits = model(tokens)
    assert isinstance(logits, DTensor)
    loss = vocab_parallel_cross_entropy(logits, targets, -100)
    loss.backward()
same = torch.allclose(loss, ref_loss, rtol=1e-4)
ref_grads = {n: p.grad for n, p in reference.named_parameters()}
for name, param in model.named_parameters():
    grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
    ok = torch.allclose(grad, ref_grads[name], rtol=1e-3, atol=1e-5)
    if not ok:
        print(f"rank {world.rank}: gradient of {name} differs", file=sys.stderr)
    same = same and ok
dist.destroy_process_group()
sys.exit(0 if same else 1)
