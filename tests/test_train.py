"""The trainer end to end on CPU: exact resume at the same and other world sizes, real sharding,
signals, faults and the run directory's contents."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import REPO, losses, run_train, tiny_args, train_command

from llamatrain import ops
from llamatrain.config import TrainConfig, load_config
from llamatrain.distributed.parallel_dims import batch_geometry
from llamatrain.train import (
    REQUEUE_EXIT_CODE,
    REQUEUE_MARKER,
    attention_backward,
    lr_at,
    use_deterministic_algorithms,
)

STOP = {"LLAMATRAIN_FAULT_STOP_STEP": "6"}


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    """Uninterrupted runs at world sizes 1 and 2, and runs stopped after step 6 at each."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    # torchrun turns a worker's requeue exit into its own exit 1; the marker file tells.
    for name, nproc, env, code in [("full1", 1, {}, 0), ("full2", 2, {}, 0),
                                   ("stop1", 1, STOP, REQUEUE_EXIT_CODE), ("stop2", 2, STOP, 1)]:
        out[name] = root / name
        check(run_train(tiny_args(prepared_data, out[name]), nproc, env=env), code)
    return out


def resume(runs, prepared_data, tmp_path, src: str, nproc: int):
    run_dir = tmp_path / f"{src}-on-{nproc}"
    shutil.copytree(runs[src], run_dir)
    proc = run_train(tiny_args(prepared_data, run_dir), nproc)
    check(proc)
    assert "resumed from" in proc.stdout and not (run_dir / REQUEUE_MARKER).exists()
    return losses(run_dir)


def test_run_directory_has_everything_design_md_promises(runs):
    run_dir = runs["full2"]
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-12"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-12",
                                                                                "step-8"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "mem_gb",
                "step_time_s", "data_wait_s"):
        assert key in train[0]
    assert train[-1]["tokens_seen"] == 12 * 1024 and train[0]["mfu"] is None  # CPU: no peak
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["world_size"], report["num_nodes"], report["steps"]) == (2, 1, 12)
    assert report["device"] == "cpu" and report["tokens"] == 12 * 1024
    # train.deterministic: the kernels are chosen without timing (PyTorch on a CPU).
    assert report["kernels"] == "torch" and report["kernel_choice"]["how"] == "deterministic"
    for key in ("wall_s", "tokens_per_s", "device_hours", "gpu_hours", "energy_kwh", "tco2eq"):
        assert report[key] > 0, key
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").stat().st_size > 1000
    assert "[model]" in (run_dir / "config.toml").read_text()


def test_world_sizes_1_and_2_see_the_same_samples_and_losses(runs):
    one, two = losses(runs["full1"]), losses(runs["full2"])
    assert one.keys() == two.keys()
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=1e-5), step


def test_fsdp_halves_per_rank_parameter_gradient_and_optimizer_bytes(runs):
    one = json.loads((runs["full1"] / "report.json").read_text())["state_bytes_per_rank"]
    two = json.loads((runs["full2"] / "report.json").read_text())["state_bytes_per_rank"]
    assert one["params"] > 400_000 and one["optimizer"] == 2 * one["params"]
    for key in ("params", "grads", "optimizer"):
        assert abs(two[key] - one[key] / 2) <= 0.01 * one[key], key


@pytest.mark.parametrize("src", ["stop1", "stop2"])
def test_stop_saves_off_interval_checkpoint_and_leaves_the_requeue_marker(runs, src):
    ckpts = runs[src] / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-6"
    state = json.loads((ckpts / "step-6/trainer.json").read_text())
    assert state["step"] == 6 and state["sampler"] == {"consumed": 6 * 16}
    marker = json.loads((runs[src] / REQUEUE_MARKER).read_text())
    assert marker == {"step": 6, "reason": "fault injection"}


@pytest.mark.parametrize(("src", "nproc"), [("stop1", 1), ("stop2", 2)])
def test_resume_at_the_same_world_size_is_bit_identical(runs, prepared_data, tmp_path, src,
                                                        nproc):
    resumed = resume(runs, prepared_data, tmp_path, src, nproc)
    full = losses(runs[f"full{nproc}"])
    assert sorted(resumed) == list(range(1, 13))
    assert all(resumed[s] == full[s] for s in range(7, 13)), (resumed, full)


@pytest.mark.parametrize(("src", "nproc"), [("stop2", 1), ("stop1", 2)])
def test_resume_at_another_world_size_continues_with_the_same_samples(
        runs, prepared_data, tmp_path, src, nproc):
    resumed = resume(runs, prepared_data, tmp_path, src, nproc)
    full = losses(runs["full1"])
    for step in range(7, 13):
        assert math.isclose(resumed[step], full[step], rel_tol=1e-5), step


def test_async_checkpoints_publish_and_resume_bit_identically(runs, prepared_data, tmp_path):
    run_dir = tmp_path / "async"
    args = tiny_args(prepared_data, run_dir, **{"checkpoint.async": "true"})
    check(run_train(args, 2, env=STOP), 1)
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-6"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    check(run_train(args, 2))
    full = losses(runs["full2"])
    assert all(losses(run_dir)[s] == full[s] for s in range(1, 13))


def test_a_finished_run_exits_at_once(runs, prepared_data):
    proc = run_train(tiny_args(prepared_data, runs["full1"]))
    check(proc)
    assert "nothing to do" in proc.stdout


def test_truncated_newest_checkpoint_falls_back_to_the_previous(runs, prepared_data, tmp_path):
    run_dir = tmp_path / "trunc"
    shutil.copytree(runs["full1"], run_dir)
    for f in (run_dir / "checkpoints/step-12").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run_train(tiny_args(prepared_data, run_dir, **{"train.steps": 14}))
    check(proc)
    assert "checkpoint" in proc.stdout and "unreadable" in proc.stdout
    assert "resumed from" in proc.stdout and "step-8" in proc.stdout
    assert sorted(losses(run_dir)) == list(range(1, 15))


def test_injected_nan_is_skipped_and_counted(prepared_data, tmp_path):
    run_dir = tmp_path / "nan"
    proc = run_train(tiny_args(prepared_data, run_dir, **{"train.steps": 6}),
                     env={"LLAMATRAIN_FAULT_NAN_STEPS": "2"})
    check(proc)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    assert records[3]["loss"] is None and records[3]["bad_steps"] == 1
    assert records[4]["bad_steps"] == 0 and math.isfinite(records[6]["loss"])


def test_too_many_nan_steps_stop_with_a_clear_message(prepared_data, tmp_path):
    proc = run_train(tiny_args(prepared_data, tmp_path / "nan", **{"train.max_bad_steps": 2}),
                     env={"LLAMATRAIN_FAULT_NAN_STEPS": "5,6,7"})
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 2 non-finite steps in a row (train.max_bad_steps = 2); last good checkpoint: "
        "step-4")


def test_sigusr1_saves_and_exits_with_requeue_code(prepared_data, tmp_path):
    run_dir = tmp_path / "usr1"
    args = tiny_args(prepared_data, run_dir, **{"train.steps": 100000,
                                                "checkpoint.interval": 100000})
    proc = subprocess.Popen(train_command(args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-2000:]
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert step >= 3 and json.loads((run_dir / "checkpoints" / latest / "trainer.json").read_text(
    ))["step"] == step


def test_sigkilled_rank_is_restarted_by_torchrun_and_resumes(prepared_data, tmp_path):
    run_dir = tmp_path / "kill"
    proc = run_train(tiny_args(prepared_data, run_dir, **{"train.steps": 10}), 2,
                     env={"LLAMATRAIN_FAULT_KILL_STEP": "6"}, max_restarts=1)
    check(proc)
    assert "resumed from" in proc.stdout and "step-4" in proc.stdout
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 10


def test_cosine_schedule_warms_up_then_decays_to_ten_percent():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=3e-4, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(3e-6)
    assert lr_at(99, cfg) == pytest.approx(3e-4)
    # Half way through the decay: half way between the peak and the 10% floor.
    assert lr_at(549, cfg) == pytest.approx(0.55 * 3e-4, rel=2e-3)
    assert lr_at(300, cfg) > lr_at(301, cfg) > lr_at(998, cfg) > lr_at(999, cfg)
    assert lr_at(999, cfg) == pytest.approx(3e-5)


def test_global_batch_must_divide_into_micro_batches_and_names_the_numbers():
    cfg = TrainConfig(global_batch_tokens=4096 * 1000, micro_batch_size=1, seq_len=4096)
    assert batch_geometry(cfg, 8) == (1000, 125)
    with pytest.raises(ValueError, match=r"data-parallel ranks x micro_batch_size x seq_len = 3 x "
                                         r"1 x 4096 = 12288"):
        batch_geometry(cfg, 3)


def test_sft_run_trains_on_answers_only_for_the_given_epochs(prepared_data, tmp_path):
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"the sum is {2 * i}."}
            for i in range(400)]
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "sft"
    proc = run_train(tiny_args(prepared_data, run_dir, **{
        "data.format": "sft", "data.source": source, "train.epochs": 1.0,
        "data.tokenizer": prepared_data / "tokenizer.model", "train.warmup_steps": 0}))
    check(proc)
    steps = int(proc.stdout.split("train.epochs = 1.0: ")[1].split()[0])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == steps >= 2
    first, last = losses(run_dir)[1], losses(run_dir)[steps]
    assert last < first


@pytest.mark.parametrize(("name", "overrides", "exact"), [
    ("full-ac", {"parallel.activation_checkpointing": "full"}, True),
    ("selective-ac-compiled", {"parallel.activation_checkpointing": "selective",
                               "parallel.compile": "true"}, False),
])
def test_activation_checkpointing_and_compile_keep_the_losses(runs, prepared_data, tmp_path, name,
                                                              overrides, exact):
    run_dir = tmp_path / name
    check(run_train(tiny_args(prepared_data, run_dir, **{"train.steps": 12, **overrides})))
    full = losses(runs["full1"])
    for step, loss in losses(run_dir).items():
        assert loss == full[step] if exact else math.isclose(loss, full[step], rel_tol=1e-4)


def test_deterministic_training_selects_the_deterministic_attention_backward(monkeypatch):
    def backward_of(*overrides):
        return attention_backward(load_config(str(REPO / "configs/tiny.toml"), list(overrides)))

    assert backward_of() == "atomic"
    assert backward_of("--train.deterministic=true") == "deterministic"
    assert backward_of("--kernels.attention_backward=deterministic") == "deterministic"
    # ...and ops hands the choice to the kernel on every call.
    seen = []
    ops.set_backend("triton", "cpu", backward_of("--train.deterministic=true"))
    try:
        monkeypatch.setattr(ops._kernels, "attention",
                            lambda q, k, v, causal, deterministic: seen.append(deterministic))
        ops.attention(*[None] * 3)
        ops.set_backend("triton", "cpu", "atomic")
        ops.attention(*[None] * 3)
    finally:
        ops.set_backend("torch")
    assert seen == [True, False]


UNFUSED = {"kernels.fused_loss": "false", "kernels.fused_residual": "false"}


def test_fused_loss_and_residual_train_with_the_losses_of_the_unfused_path(runs, prepared_data,
                                                                           tmp_path):
    # runs["full1"] has the defaults: fused output projection + loss, every residual in a norm.
    run_dir = tmp_path / "unfused"
    check(run_train(tiny_args(prepared_data, run_dir, **UNFUSED)))
    fused, unfused = losses(runs["full1"]), losses(run_dir)
    assert fused.keys() == unfused.keys() and len(fused) == 12
    for step, loss in unfused.items():
        assert math.isclose(fused[step], loss, rel_tol=1e-5)


def test_fused_loss_with_sft_ignore_index_equals_the_unfused_loss(prepared_data, tmp_path):
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"the sum is {2 * i}."}
            for i in range(100)]
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"data.format": "sft", "data.source": source, "train.steps": 3,
           "data.tokenizer": prepared_data / "tokenizer.model", "train.warmup_steps": 0}
    for name, extra in (("fused", {}), ("unfused", UNFUSED)):
        check(run_train(tiny_args(prepared_data, tmp_path / name, **sft, **extra)))
    fused, unfused = losses(tmp_path / "fused"), losses(tmp_path / "unfused")
    assert len(fused) == 3 and fused.keys() == unfused.keys()
    for step, loss in unfused.items():
        assert math.isclose(fused[step], loss, rel_tol=1e-5)


def test_missing_optional_packages_are_one_clear_line(prepared_data, tmp_path):
    proc = run_train(tiny_args(prepared_data, tmp_path / "x", **{"train.optimizer":
                                                                 "apex_fused_adam"}))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: train.optimizer = 'apex_fused_adam': NVIDIA apex is not importable")
    proc = run_train(tiny_args(prepared_data, tmp_path / "y", **{"metrics.wandb": "true"}))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: metrics.wandb = true: wandb is not installed (pip install 'llamatrain[wandb]')")


def test_profile_steps_record_a_trace_that_perfetto_opens(prepared_data, tmp_path):
    run_dir = tmp_path / "prof"
    proc = run_train(tiny_args(prepared_data, run_dir, **{"train.steps": 6,
                                                          "metrics.profile_steps": 2}))
    check(proc)
    trace = run_dir / "profile/trace-rank0.json"
    assert f"profiler trace: {trace}" in proc.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::mm" in e.get("name", "") for e in events)


def test_deterministic_mode_gives_cublas_its_fixed_workspace_and_keeps_a_users(monkeypatch):
    # torch refuses the first cuBLAS matmul in deterministic mode without CUBLAS_WORKSPACE_CONFIG.
    try:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        use_deterministic_algorithms()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        use_deterministic_algorithms()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
