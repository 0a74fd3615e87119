"""The training runs of tests/test_float8.py, several trainers in one process so that torch is
imported once: `python tests/float8_runs.py DATA OUT` runs the one-process runs, and under
`torchrun --nproc-per-node=2` the same command runs the two-process ones. Each run leaves its run
directory OUT/<name> (metrics.jsonl, checkpoints, report) and OUT/<name>.log (rank 0's lines).

One process: 50 steps without float8 ("none", checkpoints at 40 and 50), with tensorwise and
rowwise float8, "none" resumed at step 40 with tensorwise ("none-to-tensorwise"), and 8 steps of
tensorwise ("short", checkpoints at 4 and 8), the reference of the two-process runs: tensorwise
under FSDP2 ("fsdp", float8 all-gathers), under tp = 2 ("tp"), and "fsdp" resumed at step 4
without float8 ("fsdp-to-none").
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from llamatrain.config import load_config
from llamatrain.distributed.world import init_distributed
from llamatrain.train import Trainer

REPO = Path(__file__).resolve().parents[1]
LONG, SHORT = 50, 4
# dim 128 and FFN 384 (multiple_of 128): every block linear meets float8's alignment, at tp = 2 too.
MODEL = {"model.vocab_size": 384, "model.dim": 128, "model.n_layers": 1, "model.n_heads": 4,
         "model.n_kv_heads": 2, "model.multiple_of": 128, "model.max_seq_len": 64}


def overrides_of(data: str, run_dir: Path, **overrides) -> list[str]:
    values = {"run.dir": run_dir, "data.source": data, "data.cache_dir": run_dir / "c", **MODEL,
              "train.seq_len": 64, "train.micro_batch_size": 2, "train.global_batch_tokens": 256,
              "train.steps": LONG, "train.warmup_steps": 5, "train.lr": 2e-3,
              "train.deterministic": "true", "train.eval_interval": 0,
              "checkpoint.interval": 40, "checkpoint.keep": 2, "metrics.log_interval": 1,
              **overrides}
    return [f"--{k}={v}" for k, v in values.items()]


def train(world, data: str, out: Path, name: str, *, resume_from: str | None = None,
          **overrides) -> None:
    run_dir = out / name
    if resume_from is not None and world.is_main:
        shutil.copytree(out / resume_from, run_dir)
        last = max(run_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name[5:]))
        shutil.rmtree(last)  # resume from the one before
    if dist.is_initialized():
        dist.barrier()
    cfg = load_config(REPO / "configs/tiny.toml", overrides_of(data, run_dir, **overrides))
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
        trainer = Trainer(cfg, world)
        try:
            trainer.train()
        finally:
            trainer.release()
    if world.is_main:
        (out / f"{name}.log").write_text(lines.getvalue())


def main() -> None:
    data, out = sys.argv[1], Path(sys.argv[2])
    world = init_distributed()
    short = {"train.steps": SHORT, "train.warmup_steps": 2, "checkpoint.interval": 2,
             "train.float8": "tensorwise"}
    if world.world_size == 1:
        train(world, data, out, "none")
        train(world, data, out, "tensorwise", **{"train.float8": "tensorwise"})
        train(world, data, out, "rowwise", **{"train.float8": "rowwise"})
        train(world, data, out, "none-to-tensorwise", resume_from="none",
              **{"train.float8": "tensorwise"})
        train(world, data, out, "short", **short)
    else:
        train(world, data, out, "fsdp", **short)
        train(world, data, out, "tp", **short, **{"parallel.tp": 2, "kernels.fused_loss": "false"})
        train(world, data, out, "fsdp-to-none", resume_from="fsdp",
              **{**short, "train.float8": "none"})
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
