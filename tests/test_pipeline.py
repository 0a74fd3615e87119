"""Pipeline parallelism on gloo: every schedule, pp x dp and pp x tp give the losses, gradient
norms and validation loss of one process (pretraining and SFT masks, activation checkpointing
on, a non-finite step skipped alike), a checkpoint resumes at other pp degrees and converts, and
a layout the pipeline cannot run is one line.

Every run of one world size shares one torchrun start (tests/dist_pipeline_check.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_args

from llamatrain import convert
from llamatrain.config import DataConfig, ParallelConfig
from llamatrain.data.cache import prepare_source
from llamatrain.distributed.parallel_dims import ParallelDims, stage_blocks, stage_ids
from llamatrain.metrics import read_metrics

STEPS = 8
# A 4-block model (pp up to 4), full activation checkpointing, one checkpoint at the end; the
# 16 sequences of a step in micro-batches of 8 (pp x dp2 and pp4 need 4 to fill the pipeline;
# the loss is the global batch's, whatever its micro-batches).
BASE = {"train.steps": STEPS, "model.n_layers": 4, "parallel.activation_checkpointing": "full",
        "checkpoint.interval": STEPS, "train.micro_batch_size": 8}
FOUR = {"train.micro_batch_size": 4}
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)]
NAN = {"LLAMATRAIN_FAULT_NAN_STEPS": "3"}  # the update from step 3 to 4: step 4's record


def launch(spec: dict, nproc: int, root: Path) -> str:
    """Run the runs of `spec` one after another in one process group; their stdout."""
    path = root / f"runs-{nproc}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "tests/dist_pipeline_check.py", str(path)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # Looped schedules have been seen to hang on gloo (FACTS.md): bounded.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def val_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r][-1]["val_loss"]


def same(got: float | None, want: float | None) -> bool:
    """Equal to 1e-5, or both not finite (metrics.jsonl writes those as null)."""
    if got is None or want is None:
        return got is want
    return math.isclose(got, want, rel_tol=1e-5)


def assert_same_run(got: Path, want: Path, steps=range(1, STEPS + 1), *, val: bool = True
                    ) -> None:
    """The same losses and gradient norms at `steps`, and the same validation loss at the end
    (val: for as many data-parallel ranks and the same micro-batch size, which set what is
    validated)."""
    g, w = records(got), records(want)
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert same(g[step][key], w[step][key]), (key, step, g[step][key], w[step][key])
    if val:
        assert same(val_loss(got), val_loss(want))


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    """Every run of this module: references on one process, the schedules on 2, pp2 x dp2 and
    pp2 x tp2 on 4 and resumes of pp2 x dp2's step 4 at pp2 x tp2 and pp4 on 4, and at pp1."""
    root = tmp_path_factory.mktemp("pp")
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"the sum is {2 * i}."}
            for i in range(300)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Prepared here: a run that prepares forks tokenizer workers, which a process that already
    # holds a process group's threads must not do.
    sft_dir = prepare_source(DataConfig(source=str(root / "sft.jsonl"), format="sft",
                                        tokenizer=str(prepared_data / "tokenizer.model"),
                                        cache_dir=str(root / "cache"), workers=1),
                             vocab_size=384)
    formats = {"pre": {}, "sft": {"data.format": "sft", "data.source": sft_dir}}

    def run(name: str, fmt: str = "pre", **extra) -> dict:
        return {"argv": tiny_args(prepared_data, root / name,
                                  **{**BASE, **formats[fmt], **extra})}

    two = {f"{s}-{fmt}": run(f"{s}-{fmt}", fmt, **{"parallel.pp": 2, "parallel.pp_schedule": s,
                                                  "parallel.pp_stages_per_rank": v})
           for s, v in SCHEDULES for fmt in formats}
    two["1f1b-pre"]["env"] = NAN
    # torchao's float8 (emulated on a CPU) in each stage, as parallelize() applies it.
    two["float8"] = run("float8", **{"parallel.pp": 2, "train.float8": "tensorwise"})
    resume = {"copy": str(root / "pp2dp2"), "remove": f"checkpoints/step-{STEPS}"}
    four = {"pp2dp2": run("pp2dp2", **FOUR, **{"parallel.pp": 2, "checkpoint.interval": 4}),
            "pp2tp2": run("pp2tp2", **{"parallel.pp": 2, "parallel.tp": 2}),
            "resume-pp2tp2": {**run("resume-pp2tp2", **{"parallel.pp": 2, "parallel.tp": 2}),
                              **resume},
            "resume-pp4": {**run("resume-pp4", **FOUR, **{"parallel.pp": 4}), **resume}}
    one = {"one-pre": run("one-pre"), "one-sft": run("one-sft", "sft"),
           "one-nan": {**run("one-nan"), "env": NAN},
           "one-float8": run("one-float8", **{"train.float8": "tensorwise"}),
           "resume-pp1": {**run("resume-pp1"), **resume}}
    out = {"root": root, "stdout": {}}
    out["stdout"][2] = launch(two, 2, root)
    out["stdout"][4] = launch(four, 4, root)
    out["stdout"][1] = launch(one, 1, root)
    return out


@pytest.mark.parametrize(("schedule", "fmt"), [(s, f) for s, _ in SCHEDULES
                                               for f in ("pre", "sft")])
def test_every_schedule_gives_the_losses_of_one_process(runs, schedule, fmt):
    root = runs["root"]
    want = root / ("one-nan" if (schedule, fmt) == ("1f1b", "pre") else f"one-{fmt}")
    assert_same_run(root / f"{schedule}-{fmt}", want)
    first = records(want)
    assert first[STEPS]["loss"] < first[1]["loss"]


def test_float8_stages_give_the_losses_of_one_float8_process(runs):
    root = runs["root"]
    # float8 rounds each operand to 3 mantissa bits: a last-bit fp32 difference between the
    # stages' and one process's sums can move a value by a float8 step (grad norms were seen
    # 6e-4 apart at step 3), so the losses are compared to 1e-3, not 1e-5.
    got, want = records(root / "float8"), records(root / "one-float8")
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-3), step
    # Converted: not the losses of the unconverted run.
    assert records(root / "float8")[STEPS]["loss"] != records(root / "one-pre")[STEPS]["loss"]


def test_a_non_finite_step_is_skipped_as_without_a_pipeline(runs):
    got = records(runs["root"] / "1f1b-pre")
    assert got[4]["loss"] is None and got[4]["bad_steps"] == 1 and got[5]["bad_steps"] == 0
    # Skipped means not applied: the losses after it are the one process's, finite.
    assert math.isfinite(got[5]["loss"]) and got[5]["loss"] == pytest.approx(
        records(runs["root"] / "one-nan")[5]["loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["pp2dp2", "pp2tp2"])
def test_pipeline_with_data_or_tensor_parallelism_gives_the_losses_of_one_process(runs, name):
    assert "pp = 2" in (runs["root"] / name / "config.toml").read_text()
    assert_same_run(runs["root"] / name, runs["root"] / "one-pre", val=name == "pp2tp2")


@pytest.mark.parametrize("name", ["resume-pp1", "resume-pp2tp2", "resume-pp4"])
def test_a_pp2_dp2_checkpoint_resumes_at_other_pp_degrees_with_the_same_losses(runs, name):
    root = runs["root"]
    nproc = 1 if name == "resume-pp1" else 4
    assert f"resumed from {root / name}/checkpoints/step-4" in runs["stdout"][nproc]
    # Validation takes eval_batches micro-batches per data-parallel rank: pp4's are smaller.
    assert_same_run(root / name, root / "one-pre", steps=range(5, STEPS + 1),
                    val=name != "resume-pp4")


def test_a_pipelined_checkpoint_converts_as_one_of_pp1(runs):
    root = runs["root"]
    pipelined, cfg = convert.checkpoint_to_state_dict(root / "pp2dp2" / f"checkpoints/step-{STEPS}")
    whole, _ = convert.checkpoint_to_state_dict(root / "one-pre" / f"checkpoints/step-{STEPS}")
    assert pipelined.keys() == whole.keys() and len(whole) == 4 * 9 + 3
    for name, tensor in whole.items():
        torch.testing.assert_close(pipelined[name], tensor, rtol=1e-4, atol=1e-6)
    hf = convert.to_hf_state_dict(pipelined, cfg)
    assert hf["lm_head.weight"].shape == (cfg.vocab_size, cfg.dim)


def test_the_blocks_split_evenly_and_the_remainder_goes_to_the_inner_stages():
    assert stage_blocks(4, 2) == [range(0, 2), range(2, 4)]
    # 40 blocks on 16 stages: 2 each, the 8 left over to stages 1..8, not the ends.
    sizes = [len(b) for b in stage_blocks(40, 16)]
    assert sizes == [2] + [3] * 8 + [2] * 7 and sum(sizes) == 40
    assert [len(b) for b in stage_blocks(5, 2)] == [3, 2]  # no inner stage: the first
    assert [len(b) for b in stage_blocks(9, 4)] == [2, 3, 2, 2]
    assert stage_ids(1, 4, 2) == [1, 5]


def dims(pp: int, world: int = 8) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(pp=pp), world, world)


@pytest.mark.parametrize(("parallel", "n_layers", "accum", "message"), [
    ({"pp": 4, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2}, 4, 8,
     r"^parallel.pp = 4: pp x pp_stages_per_rank = 4 x 2 = 8 stages for model.n_layers = 4 "
     r"blocks; every stage holds at least one \(would work: parallel.pp_stages_per_rank = 1\)$"),
    ({"pp": 2, "pp_stages_per_rank": 2}, 8, 4,
     r"^parallel.pp_stages_per_rank = 2: parallel.pp_schedule = '1f1b' runs one stage per rank"),
    ({"pp": 2, "pp_schedule": "zero_bubble"}, 8, 4,
     r"^parallel.pp_stages_per_rank = 1: parallel.pp_schedule = 'zero_bubble' interleaves 2 or "
     r"more stages per rank"),
    ({"pp": 4}, 8, 2,
     r"^parallel.pp = 4: a data-parallel rank runs 2 micro-batch\(es\) per step, which do not "
     r"fill the pipeline \(1f1b needs at least parallel.pp = 4; would work: a smaller "
     r"train.micro_batch_size"),
    ({"pp": 2, "pp_microbatches": 3}, 8, 8,
     r"^parallel.pp_microbatches = 3: must divide the 8 micro-batch\(es\) a data-parallel rank "
     r"runs per step and be at least parallel.pp = 2 \(would work: 0, 2, 4, 8\)$"),
    ({"pp": 4, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2,
      "pp_microbatches": 6}, 8, 12,
     r"be a multiple of parallel.pp = 4 \(would work: 0, 4, 12\)$"),
    ({"pp": 1, "pp_stages_per_rank": 2}, 8, 4,
     r"^parallel.pp_stages_per_rank = 2: needs parallel.pp > 1$"),
])
def test_a_pipeline_the_layout_cannot_run_is_one_line(parallel, n_layers, accum, message):
    cfg = ParallelConfig(**parallel)
    with pytest.raises(ValueError, match=message):
        dims(cfg.pp).pipeline_micro_batches(cfg, n_layers=n_layers, accum=accum)


def test_the_micro_batches_of_a_schedule_are_a_steps_unless_set():
    assert dims(2).pipeline_micro_batches(ParallelConfig(pp=2), n_layers=4, accum=8) == 8
    cfg = ParallelConfig(pp=2, pp_microbatches=4)
    assert dims(2).pipeline_micro_batches(cfg, n_layers=4, accum=8) == 4
    # The batch geometry is over the data-parallel ranks, world / (pp x tp).
    assert ParallelDims.from_config(ParallelConfig(pp=4, tp=2), 64, 8).dp_size == 8
