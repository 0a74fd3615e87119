"""Run under torchrun: build the model sharded at this world size and check that its full weights
equal the unsharded model's for the same seed (exit 0) or not (exit 1)."""

import sys

import torch
import torch.distributed as dist

from llamatrain.config import ModelConfig, ParallelConfig
from llamatrain.model import Transformer
from llamatrain.parallel import (
    build_mesh,
    full_state_dict,
    init_distributed,
    materialize,
    parallelize,
)

world = init_distributed()
# 97 and 80-row weights do not split evenly: shards of unequal size are the interesting case.
cfg = ModelConfig(dim=80, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                  max_seq_len=32)
with torch.device("meta"):
    model = Transformer(cfg)
parallelize(model, ParallelConfig(dp_shard=-1, dp_replicate=int(sys.argv[1])),
            build_mesh(ParallelConfig(dp_shard=-1, dp_replicate=int(sys.argv[1])), world),
            param_dtype=torch.float32)
materialize(model, world.device, seed=11)
sharded = full_state_dict(model)
reference = Transformer(cfg, seed=11).state_dict()
same = all(torch.equal(sharded[k], reference[k]) for k in reference)
tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
same = same and torch.allclose(model(tokens), Transformer(cfg, seed=11)(tokens), atol=1e-5)
dist.destroy_process_group()
sys.exit(0 if same else 1)
