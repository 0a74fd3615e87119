"""Run under torchrun: several training runs in one process group, one after the other (the
pipeline schedules of tests/test_pipeline.py without a torchrun start for each).

argv: a JSON file mapping run names to their command lines (--config PATH --section.key=value
...); exit 0 when every run trains to its end."""

import json
import sys

import torch.distributed as dist

from llamatrain.config import load_config, split_cli
from llamatrain.distributed.world import init_distributed
from llamatrain.train import Trainer

world = init_distributed()
runs = json.loads(open(sys.argv[1]).read())
for name, argv in runs.items():
    cfg = load_config(*split_cli(argv))
    trainer = Trainer(cfg, world)
    try:
        code = trainer.train()
    finally:
        trainer.release()
    if code:
        sys.exit(f"{name}: exit {code}")
    dist.barrier()
dist.destroy_process_group()
