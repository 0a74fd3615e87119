"""Sharded initialisation and the device mesh."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from llamatrain.config import ParallelConfig, TrainConfig
from llamatrain.distributed.parallel_dims import ParallelDims


@pytest.mark.parametrize(("nproc", "replicate", "tp"),
                         [(2, 1, 1), (3, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2)])
def test_sharded_init_gives_the_same_full_weights_at_any_layout(nproc, replicate, tp):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", "tests/dist_init_check.py", str(replicate), str(tp)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def dims(world_size: int, gpus_per_node: int | None = None, **parallel) -> tuple[int, ...]:
    d = ParallelDims.from_config(ParallelConfig(**parallel), world_size, gpus_per_node)
    return d.pp, d.dp_replicate, d.dp_shard, d.tp


def test_parallel_dims_fill_in_the_automatic_axis_and_reject_mismatches():
    assert dims(16, dp_shard=-1, dp_replicate=1) == (1, 1, 16, 1)
    assert dims(32, dp_shard=8, dp_replicate=-1) == (1, 4, 8, 1)
    assert dims(16, dp_shard=-1, dp_replicate=2) == (1, 2, 8, 1)
    with pytest.raises(ValueError, match="must multiply to the world size 12"):
        dims(12, dp_shard=8, dp_replicate=-1)
    with pytest.raises(ValueError, match=r"world size = 0: expected >= 1"):
        dims(0)


def test_a_ranks_coordinates_put_tp_innermost_and_pp_outermost():
    d = ParallelDims(pp=2, dp_replicate=2, dp_shard=2, tp=2)
    assert d.world_size == 16 and d.dp_size == 4
    assert d.shape == {"pp": 2, "dp_replicate": 2, "dp_shard": 2, "tp": 2}
    # rank = ((pp * R + r) * S + s) * T + t
    c = d.coordinates(13)  # 13 = ((1 * 2 + 1) * 2 + 0) * 2 + 1
    assert (c.pp, c.dp_replicate, c.dp_shard, c.tp, c.dp_rank) == (1, 1, 0, 1, 2)
    # The two ranks of a tensor-parallel group, and the stages of a pipeline, read one slice.
    assert d.coordinates(12).dp_rank == d.coordinates(13).dp_rank == d.coordinates(5).dp_rank
    assert sorted({d.coordinates(r).dp_rank for r in range(16)}) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"rank = 16: expected 0 <= rank < 16"):
        d.coordinates(16)


def test_the_batch_geometry_is_over_the_data_parallel_ranks():
    train = TrainConfig(global_batch_tokens=64 * 128, micro_batch_size=2, seq_len=128)
    d = ParallelDims(pp=1, dp_replicate=1, dp_shard=4, tp=2)
    assert d.batch_geometry(train) == (64, 8)  # 64 sequences over 4 data-parallel ranks of 2


def test_a_single_process_group_carries_a_device_mesh_without_torchrun():
    # What one GPU without torchrun does (with NCCL); here with gloo, in a fresh interpreter.
    code = ("import torch.distributed as dist\n"
            "from llamatrain.distributed.world import init_single_process_group\n"
            "from llamatrain.distributed.parallel_dims import ParallelDims\n"
            "from llamatrain.config import ParallelConfig, TrainConfig\n"
            "import torch\n"
            "init_single_process_group('gloo')\n"
            "mesh = ParallelDims.from_config(ParallelConfig(), 1).build_mesh('cpu')\n"
            "print(tuple(mesh.shape)); dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(1,)"
