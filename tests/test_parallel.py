"""Sharded initialisation and the device mesh."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from llamatrain.config import ParallelConfig
from llamatrain.distributed.parallel_dims import mesh_shape


@pytest.mark.parametrize(("nproc", "replicate", "tp"),
                         [(2, 1, 1), (3, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2)])
def test_sharded_init_gives_the_same_full_weights_at_any_layout(nproc, replicate, tp):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", "tests/dist_init_check.py", str(replicate), str(tp)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mesh_shape_fills_in_the_automatic_axis_and_rejects_mismatches():
    assert mesh_shape(ParallelConfig(dp_shard=-1, dp_replicate=1), 16) == (1, 16, 1)
    assert mesh_shape(ParallelConfig(dp_shard=8, dp_replicate=-1), 32) == (4, 8, 1)
    assert mesh_shape(ParallelConfig(dp_shard=-1, dp_replicate=2), 16) == (2, 8, 1)
    with pytest.raises(ValueError, match="must multiply to the world size 12"):
        mesh_shape(ParallelConfig(dp_shard=8, dp_replicate=-1), 12)


def test_a_single_process_group_carries_a_device_mesh_without_torchrun():
    # What one GPU without torchrun does (with NCCL); here with gloo, in a fresh interpreter.
    code = ("import torch.distributed as dist\n"
            "from llamatrain.distributed.parallelize import (\n"
            "    init_single_process_group, build_mesh, World)\n"
            "from llamatrain.config import ParallelConfig\n"
            "import torch\n"
            "init_single_process_group('gloo')\n"
            "mesh = build_mesh(ParallelConfig(), World(0, 1, 0, 1, torch.device('cpu')))\n"
            "print(tuple(mesh.shape)); dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(1,)"
