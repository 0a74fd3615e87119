"""Run under torchrun (or alone, a world of one): several training runs in one process group,
one after the other, so that a test pays for one start of torchrun, not one per run.

argv: a JSON file mapping run names to {"argv": the run's --config PATH --section.key=value ...,
and optionally "env": environment variables for that run (fault injection), "copy": a run
directory to start from and "remove": a path in it to delete first (to resume from an older
checkpoint)}. Exit 0 when every run trains to its end."""

import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from llamatrain.config import load_config, split_cli
from llamatrain.distributed.world import init_distributed
from llamatrain.train import Trainer


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


world = init_distributed()
for name, run in json.loads(Path(sys.argv[1]).read_text()).items():
    cfg = load_config(*split_cli(run["argv"]))
    if "copy" in run and world.rank == 0:
        shutil.copytree(run["copy"], cfg.run.dir)
        shutil.rmtree(Path(cfg.run.dir) / run["remove"])
    barrier()
    saved = dict(os.environ)
    os.environ.update(run.get("env", {}))
    trainer = Trainer(cfg, world)
    try:
        code = trainer.train()
    finally:
        trainer.release()
        os.environ.clear()
        os.environ.update(saved)
    if code:
        sys.exit(f"{name}: exit {code}")
    barrier()
if dist.is_initialized():
    dist.destroy_process_group()
