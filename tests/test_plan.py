"""plan.py: the dry run on a fake process group against a real run, the layout rules the trainer
applies, and the 70B on 2,048 A100s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from conftest import REPO
from torch._subclasses.fake_tensor import FakeTensorMode

from llamatrain import flops, hardware, plan
from llamatrain.config import Config, ModelConfig, ParallelConfig, TrainConfig, load_config


def small(tp: int, ac: str, n_layers: int = 3) -> Config:
    """The model of tests/plan_memory_check.py."""
    return Config(model=ModelConfig(dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                    vocab_size=512, multiple_of=32, max_seq_len=128),
                  train=TrainConfig(seq_len=128, micro_batch_size=2),
                  parallel=ParallelConfig(tp=tp, activation_checkpointing=ac))


def run_plan(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamatrain.plan", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize(("tp", "ac"), [(2, "full"), (1, "none")])
def test_dry_run_memory_equals_a_real_two_process_run(tp, ac):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "tests/plan_memory_check.py", str(tp), ac],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    with plan.fake_world(2):
        fake = plan.dry_run(small(tp, ac), 2, 2)
    for key in ("params", "grads", "optimizer"):
        assert getattr(fake, key) == real[key], key
    assert real["params"] > 1_000_000 and real["optimizer"] == 2 * real["params"]
    assert fake.activations == pytest.approx(real["activations"], rel=0.10)
    assert fake.gathered == pytest.approx(real["gathered"], rel=0.10)


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_extending_the_peak_to_the_depth_matches_a_whole_measurement(ac):
    cfg = small(2, ac, n_layers=12)
    with plan.fake_world(8):
        extended = plan.dry_run(cfg, 8, 8)
        model, mesh = plan._build(cfg, 12, 8, 8)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            model.init_rope()
            plan.track_step(model, mesh, cfg)
            gathered, activations = plan._split(plan.track_step(model, mesh, cfg))
        assert extended.params == plan.shard_bytes(model)
    assert extended.gathered + extended.activations == pytest.approx(gathered + activations,
                                                                     rel=0.02)


def test_check_layout_refuses_what_the_trainer_refuses():
    cfg = load_config(REPO / "configs/llama2_70b.toml")
    with pytest.raises(ValueError, match="data-parallel ranks x micro_batch_size x seq_len = "
                                         "2048 x 1 x 4096"):
        plan.check_layout(cfg, 2048, 8)
    layout, accum = plan.check_layout(load_config(REPO / "configs/llama2_70b.toml",
                                                  ["--parallel.tp=8"]), 2048, 8)
    assert (layout.dp_replicate, layout.dp_shard, layout.tp, accum) == (1, 256, 8, 4)
    with pytest.raises(ValueError, match="must divide the 4 GPUs per node"):
        plan.check_layout(load_config(REPO / "configs/llama2_70b.toml", ["--parallel.tp=8"]),
                          2048, 4)


def test_70b_on_2048_a100s_fits_at_tp8():
    # The search over every layout (README's example) takes about a minute here; the test
    # checks the layout it ranks among the best, measured alone.
    start = time.perf_counter()
    proc = run_plan("--config", "configs/llama2_70b.toml", "--gpus", "2048", "--parallel.tp=8",
                    "--json")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    req = result["requested"]
    assert req["fits"] and req["layout"] == {"dp_replicate": 1, "dp_shard": 256, "tp": 8,
                                             "activation_checkpointing": "full",
                                             "micro_batch_size": 1, "pp": 1,
                                             "pp_schedule": "1f1b", "pp_stages_per_rank": 1,
                                             "pp_microbatches": 0}
    assert req["micro_batches"] == 4  # 1,024 sequences over 256 data-parallel ranks
    mem = req["memory"]
    # Rank 0 holds the larger of uneven shards: a little over an even 1/2048 of fp32 weights.
    even = 68_976_648_192 * 4 / 2048
    assert even < mem["params"] < 1.03 * even
    assert mem["grads"] == mem["params"] and mem["optimizer"] == 2 * mem["params"]
    assert mem["activations"] > 0 and mem["total"] <= 0.9 * 80 * 2**30
    kinds = {c["what"]: c for c in req["collectives"]}
    assert kinds["FSDP parameters (bf16)"]["link"] == "InfiniBand"
    assert kinds["sequence parallel activations (bf16)"]["link"] == "NVLink"
    assert kinds["sequence parallel activations (bf16)"]["group"] == 8
    assert 0 < req["compute_s"] < req["step_s"]
    print(f"plan of 70B at 2048 GPUs, tp 8: {seconds:.0f} s")


def test_a_refused_layout_is_one_line_with_one_that_fits():
    proc = run_plan("--config", "configs/tiny.toml", "--gpus", "32", "--parallel.tp=1")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: train.global_batch_tokens = 4096: not a multiple of "
                               "data-parallel ranks x micro_batch_size x seq_len = 32 x 8 x 256")
    assert "; fits: --parallel.tp=" in lines[0]


def test_a_layout_that_does_not_fit_in_memory_is_one_line():
    # tiny.toml's depth at 70B's width: 3.7B parameters, 59 GB of weights and AdamW state.
    wide = ["--model.dim=8192", "--model.n_heads=64", "--model.n_kv_heads=8",
            "--model.vocab_size=32000", "--model.multiple_of=256"]
    proc = run_plan("--config", "configs/tiny.toml", "--gpus", "2", "--device", "a100-40gb",
                    *wide, "--parallel.dp_shard=1", "--parallel.dp_replicate=2")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tp 1 x dp_shard 1 x dp_replicate 2, "
                                                   "AC none, micro-batch 8 needs ")
    assert "GiB per GPU of 36.0 GiB; fits: --parallel.tp=" in lines[0]


def test_carbon_project_uses_the_planner_step_model():
    from llamatrain import carbon

    cfg = load_config(REPO / "configs/llama2_70b.toml",
                      ["--parallel.tp=2", "--parallel.activation_checkpointing=selective"])
    layout, _ = plan.check_layout(cfg, 2048, 8)
    step = plan.step_model(cfg, layout, num_gpus=2048, gpus_per_node=8,
                           device=hardware.gpu("a100-80gb"), mfu=0.45,
                           fabric=plan.FABRICS["ib"], link_gbps=200.0)
    projected = carbon.project(carbon.Plan(config=cfg, tokens=2e12, num_gpus=2048,
                                           device="a100", mfu=0.45, fabric="ib"))
    assert projected["scaling_efficiency"] == step["efficiency"]
    row = next(r for r in projected["scaling"] if r["gpus"] == 2048)
    assert (row["tp"], row["dp_shard"], row["ib_efficiency"]) == (2, 1024, step["efficiency"])
    # Selective checkpointing recomputes every other block's forward: a sixth more block FLOPs.
    assert step["recompute_s"] > 0 and 0.8 < step["efficiency"] < 0.86


def test_pipeline_dry_run_memory_equals_a_real_two_process_run():
    # pp = 2 with 1F1B over 4 micro-batches: the first stage holds 2 of them in flight, the last 1.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "tests/plan_memory_check.py", "1", "none", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = small(1, "none", n_layers=4)
    cfg.parallel.pp = 2
    cfg.train.global_batch_tokens = 4 * 2 * 128  # 4 micro-batches of 2 sequences of 128
    with plan.fake_world(2):
        fake = plan.pipeline_dry_run(cfg, 2, 2)
    for rank in (0, 1):
        for key in ("params", "grads", "optimizer", "gathered"):
            assert getattr(fake[rank], key) == real[rank][key], (rank, key)
        assert fake[rank].activations == pytest.approx(real[rank]["activations"], rel=0.10)
    assert real[0]["activations"] > 1.1 * real[1]["activations"]  # what the first holds more


def test_every_stage_profile_reads_a_warm_step_whatever_ran_before_it():
    # The first step of a 70B stage sharded by tp > 1 in a process allocates up to a fifth more
    # than later ones of the same shapes: a profile measured after another (here of tp = 4)
    # still counts a warm step of its own shapes (tp = 2, which no other test of this file
    # runs), equal to a step run after it.
    def cfg(tp: int) -> Config:
        c = load_config(REPO / "configs/llama2_70b.toml")
        c.parallel.pp, c.parallel.tp, c.parallel.activation_checkpointing = 4, tp, "full"
        return c

    with plan.fake_world(64):
        plan.StageProfile(cfg(4), 64, 8).stage(4, first=False, last=False)
        step = plan.StageProfile(cfg(2), 64, 8).stage(4, first=False, last=False)
        stage, mesh = plan._build_stage(cfg(2), 4, 64, 8, first=False, last=False)
        with FakeTensorMode(allow_non_fake_inputs=True):
            stage.to_empty(device="cpu")
            stage.init_rope()
            peak, saved, _ = plan.track_stage_step(stage, mesh, cfg(2), first=False, last=False)
    gathered, activations = plan._split(peak)
    assert (step.gathered, step.peak, step.saved) == (gathered, activations, saved)


def steps(cfg: Config, num_gpus: int) -> list[tuple[float, plan.Layout, dict]]:
    """Every layout of the search with its step time, fastest first (no dry run)."""
    out = []
    for layout in plan.candidate_layouts(cfg, num_gpus, 8):
        step = plan.step_model(plan.with_layout(cfg, layout), layout, num_gpus=num_gpus,
                               gpus_per_node=8, device=hardware.gpu("a100-80gb"), mfu=0.45,
                               fabric=plan.FABRICS["ib"], link_gbps=200.0)
        out.append((step["step_s"], layout, step))
    return sorted(out, key=lambda x: x[0])


def test_recomputation_is_charged_and_the_7b_on_64_gpus_prefers_no_pipeline():
    cfg = load_config(REPO / "configs/llama2_7b.toml")
    ranked = steps(cfg, 64)
    step, fastest, model = ranked[0]
    assert (fastest.pp, fastest.tp, fastest.activation_checkpointing) == (1, 1, "none")
    assert model["recompute_s"] == 0 and model["mfu"] == pytest.approx(0.45, rel=0.01)
    full = next(x for _, lay, x in ranked
                if lay == replace(fastest, activation_checkpointing="full"))
    # Full recomputation adds a forward of every block: a third of the blocks' FLOPs.
    m = cfg.model
    blocks = m.n_layers * flops.block_flops_per_token(m, cfg.train.seq_len)
    share = blocks / flops.flops_per_token(m, cfg.train.seq_len)
    assert full["recompute_s"] == pytest.approx(model["compute_s"] * share / 3)
    assert full["step_s"] > step + 0.99 * full["recompute_s"]
    assert full["mfu"] == pytest.approx(model["mfu"] * model["step_s"] / full["step_s"])
    with plan.fake_world(64):
        assert plan.dry_run(plan.with_layout(cfg, fastest), 64, 8).total < 0.9 * 80 * 2**30


def test_70b_fits_at_4096_and_8192_a100s_and_a_pipeline_is_fastest_at_8192():
    cfg = load_config(REPO / "configs/llama2_70b.toml")
    ranked = steps(cfg, 8192)
    _, fastest, model = ranked[0]
    assert fastest.pp > 1 and 0 < model["bubble"] < 0.2
    # The fastest layout without a pipeline is 60% slower at 8,192: FSDP over 1,024 ranks.
    assert next(s for s, lay, _ in ranked if lay.pp == 1) > 1.5 * model["step_s"]
    # The fastest of all fits, so it is plan's best; the same pipeline fits at 4,096 (its stage
    # steps measured once: they do not depend on the data-parallel degree).
    budget = 0.9 * 80 * 2**30
    with plan.fake_world(8192):
        profile = plan.StageProfile(plan.with_layout(cfg, fastest), 8192, 8)
        at_8192 = plan.pipeline_dry_run(plan.with_layout(cfg, fastest), 8192, 8,
                                        profile=profile)
    half = replace(fastest, dp_shard=fastest.dp_shard // 2)
    with plan.fake_world(4096):
        at_4096 = plan.pipeline_dry_run(plan.with_layout(cfg, half), 4096, 8, profile=profile)
    for ranks in (at_8192, at_4096):
        assert len(ranks) == fastest.pp and all(0 < r.total < budget for r in ranks)
    # Half the data-parallel ranks: shards about twice the size (the shards read off the
    # modules: the replicated norm gains and the padding of uneven shards weigh more at 512
    # ranks); the same micro-batches in flight, the transfer buffers of twice as many
    # micro-batches (8 MiB each here).
    assert 1.9 * at_8192[0].params < at_4096[0].params < 2 * at_8192[0].params
    assert 0 < at_4096[0].activations - at_8192[0].activations < 0.01 * at_8192[0].activations


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0"], "--gpus = 0: expected an integer >= 1"),
    (["--gpus", "-8"], "--gpus = -8: expected an integer >= 1"),
    (["--gpus", "8", "--gpus-per-node", "0"], "--gpus-per-node = 0: expected an integer >= 1"),
    (["--gpus", "1000000000"], "--gpus = 1,000,000,000: the planner models at most 65,536 GPUs "
     "(plan.MAX_GPUS: its dry run builds a process group of that many ranks)"),
    (["--gpus", "8", "--gpus-per-node", "3"], "--gpus = 8 with --gpus-per-node = 3: not whole "
     "nodes (2 nodes hold 6, 3 hold 9); allowed: a multiple of 3, or at most one node"),
    (["--gpus", "16", "--link-gbps", "0"], "--link-gbps = 0.0: expected a finite number > 0 (the "
     "line rate of one NIC)"),
    (["--gpus", "16", "--link-gbps", "-200"], "--link-gbps = -200.0: expected a finite number"),
    (["--gpus", "16", "--link-gbps", "nan"], "--link-gbps = nan: expected a finite number"),
    (["--gpus", "16", "--nics-per-node", "0"], "--nics-per-node = 0: expected an integer >= 1"),
])
@pytest.mark.parametrize("tool", ["plan", "carbon"])
def test_a_cluster_that_cannot_be_modelled_is_one_line_at_once(tool, args, message):
    """plan and carbon project share plan.check_cluster; it runs before any process group."""
    from llamatrain import carbon

    config = ["--config", str(REPO / "configs/tiny.toml")]
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        if tool == "plan":
            plan.main([*config, *args])
        else:
            carbon.main(["project", *config, "--tokens", "1e9", *args])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 5


def test_part_of_one_node_is_a_cluster_and_whole_nodes_are():
    plan.check_cluster(4, 8)
    plan.check_cluster(24, 8, link_gbps=100.0, nics_per_node=4)
    plan.check_cluster(plan.MAX_GPUS, 8)
