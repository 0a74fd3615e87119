"""Run under torchrun: build the model sharded at this world size (argv: dp_replicate and, if
given, parallel.tp) and check that its full weights and logits equal the unsharded model's for the
same seed (exit 0) or not (exit 1)."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llamatrain.config import ModelConfig, ParallelConfig
from llamatrain.distributed.parallel_dims import ParallelDims
from llamatrain.distributed.parallelize import full_state_dict, materialize, parallelize
from llamatrain.distributed.world import init_distributed
from llamatrain.model import Transformer

world = init_distributed()
tp = int(sys.argv[2]) if len(sys.argv) > 2 else 1
# 98-row (and, without tp, 97-row) weights do not split evenly over FSDP's ranks: shards of
# unequal size are the interesting case.
cfg = ModelConfig(dim=80, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97 if tp == 1 else 98,
                  multiple_of=16, max_seq_len=32)
parallel = ParallelConfig(dp_shard=-1, dp_replicate=int(sys.argv[1]), tp=tp)
with torch.device("meta"):
    model = Transformer(cfg)
dims = ParallelDims.from_config(parallel, world.world_size, world.local_world_size)
parallelize(model, parallel, dims.build_mesh(world.device.type), param_dtype=torch.float32)
materialize(model, world.device, seed=11)
sharded = full_state_dict(model)
reference = Transformer(cfg, seed=11).state_dict()
same = all(torch.equal(sharded[k], reference[k]) for k in reference)
tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
logits = model(tokens)
logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
same = same and torch.allclose(logits, Transformer(cfg, seed=11)(tokens), atol=1e-5)
dist.destroy_process_group()
sys.exit(0 if same else 1)
