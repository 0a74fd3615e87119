"""Tensor and sequence parallelism on gloo: the same losses as one process, for pretraining and SFT
masks with activation checkpointing on, and checkpoints that resume at any other layout."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, losses, run_train, tiny_args

from llamatrain.config import ParallelConfig, load_config
from llamatrain.distributed.parallel_dims import ParallelDims

STEPS = 8
AC = {"train.steps": STEPS, "parallel.activation_checkpointing": "full"}


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got, want)


@pytest.fixture(scope="module")
def sft_source(tmp_path_factory):
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"the sum is {2 * i}."}
            for i in range(300)]
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(prepared_data, sft_source, tmp_path_factory):
    """8 steps at 1 process, at tp=2 on 2 processes and at dp2 x tp2 on 4, pretraining and SFT."""
    root = tmp_path_factory.mktemp("tp")
    sft = {"data.format": "sft", "data.source": sft_source,
           "data.tokenizer": prepared_data / "tokenizer.model"}
    out = {}
    for name, nproc, extra in [("one", 1, {}), ("tp2", 2, {"parallel.tp": 2}),
                               ("dp2tp2", 4, {"parallel.tp": 2}),
                               ("sft-one", 1, sft), ("sft-tp2", 2, {**sft, "parallel.tp": 2})]:
        out[name] = root / name
        check(run_train(tiny_args(prepared_data, out[name], **AC, **extra), nproc))
    return out


@pytest.mark.parametrize("name", ["tp2", "dp2tp2"])
def test_tensor_parallel_losses_equal_one_process(runs, name):
    assert "tp = 2" in (runs[name] / "config.toml").read_text()
    same_losses(losses(runs[name]), losses(runs["one"]), range(1, STEPS + 1))


def test_tensor_parallel_sft_losses_equal_one_process(runs):
    one = losses(runs["sft-one"])
    assert one[STEPS] < one[1]
    same_losses(losses(runs["sft-tp2"]), one, range(1, STEPS + 1))


def test_tensor_parallel_shards_parameter_bytes(runs):
    one = json.loads((runs["one"] / "report.json").read_text())["state_bytes_per_rank"]
    four = json.loads((runs["dp2tp2"] / "report.json").read_text())["state_bytes_per_rank"]
    for key in ("params", "grads", "optimizer"):
        assert abs(four[key] - one[key] / 4) <= 0.02 * one[key], key


@pytest.mark.parametrize(("nproc", "extra"), [(1, {}), (2, {"parallel.tp": 2}),
                                              (4, {"parallel.tp": 1})])
def test_dp2_tp2_checkpoint_resumes_at_another_layout_with_the_same_losses(
        runs, prepared_data, tmp_path, nproc, extra):
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs["dp2tp2"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS}")  # resume from step 4
    proc = run_train(tiny_args(prepared_data, run_dir, **AC, **extra), nproc)
    check(proc)
    assert "resumed from" in proc.stdout and "step-4" in proc.stdout
    same_losses(losses(run_dir), losses(runs["one"]), range(5, STEPS + 1))


def test_tp_that_does_not_divide_the_model_names_what_would_work():
    with pytest.raises(ValueError, match=r"^parallel.tp = 3: must divide model.n_heads = 8 "
                                         r"\(would work: 1, 2, 4\)$"):
        load_config(REPO / "configs/tiny.toml", ["--parallel.tp=3"])
    with pytest.raises(ValueError,
                       match=r"must divide model.vocab_size = 4098 \(would work: 1, 2\)"):
        load_config(REPO / "configs/tiny.toml", ["--parallel.tp=4", "--model.vocab_size=4098"])


def test_tp_stays_inside_a_node_and_divides_the_world():
    assert ParallelDims.from_config(ParallelConfig(tp=8), 2048, 8) == ParallelDims(1, 1, 256, 8)
    assert ParallelDims.from_config(ParallelConfig(tp=2, dp_shard=4, dp_replicate=-1), 32, 8) \
        == ParallelDims(1, 4, 4, 2)
    with pytest.raises(ValueError, match=r"parallel.tp = 8: must divide the 4 GPUs per node "
                                         r"\(tensor parallelism stays inside a node; would "
                                         r"work: 1, 2, 4\)"):
        ParallelDims.from_config(ParallelConfig(tp=8), 64, 4)
    with pytest.raises(ValueError, match="must multiply to world size / parallel.tp = 16 / 2 = 8"):
        ParallelDims.from_config(ParallelConfig(tp=2, dp_shard=3, dp_replicate=1), 16, 8)


def test_a_bad_tp_is_one_line_from_the_trainer():
    proc = subprocess.run([sys.executable, "-m", "llamatrain.train", "--config",
                           "configs/tiny.toml", "--parallel.tp=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: parallel.tp = 3: must divide model.n_heads = 8 (would work: 1, 2, 4)"]


def test_triton_kernels_run_on_the_local_heads_and_slices():
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "tests/dist_tp_kernels_check.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
