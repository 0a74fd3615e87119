"""What keeps a run safe: a resume continues only the run it finds, a run directory has one run at a
time, nothing read from a checkpoint executes code, and damaged files are found, not trusted."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, losses, run_train, tiny_args, write_corpus

from llamatrain.checkpoint import safe_dcp
from llamatrain.checkpoint.runlock import LOCK_FILE, STALE_S, RunDirLocked, RunLock
from llamatrain.config import Config, DataConfig, load_config, to_toml
from llamatrain.data.cache import prepare_source
from llamatrain.train import REQUEUE_MARKER, exit_code_for


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


def last_error(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def done(prepared_data, tmp_path_factory) -> Path:
    """A finished 12-step run with checkpoints step-8 and step-12."""
    run_dir = tmp_path_factory.mktemp("safety") / "done"
    check(run_train(tiny_args(prepared_data, run_dir)))
    return run_dir


@pytest.fixture
def copy(done, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(done, run_dir)
    return run_dir


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under run_dir's checkpoints with its hash, and the run's own files'."""
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" in p.parts)
    files += [run_dir / "metrics.jsonl", run_dir / "config.toml", run_dir / "tokenizer.model"]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


# ------------------------------------------------------------------------------ run identity


@pytest.mark.parametrize(("override", "named"), [
    ({"model.dim": 128}, "model.dim 64 -> 128"),
    ({"train.seq_len": 32}, "seq_len 64 -> 32"),
    ({"train.seed": 1}, "seed 0 -> 1"),
])
def test_a_resume_that_changes_the_run_is_refused_and_touches_nothing(copy, prepared_data,
                                                                      override, named):
    before = snapshot(copy)
    proc = run_train(tiny_args(prepared_data, copy, **{**override, "train.steps": 16}))
    check(proc, 2)
    line = last_error(proc)
    assert line.startswith(f"error: run.dir = '{copy}' holds another run (") and named in line
    assert "--checkpoint.init_from=" in line and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(copy) == before


def test_another_tokenizer_with_the_same_vocabulary_is_refused(copy, tmp_path):
    other = prepare_source(DataConfig(source=str(write_corpus(tmp_path / "c2", seed=7)),
                                      cache_dir=str(tmp_path / "cache"), workers=1,
                                      val_fraction=0.05), vocab_size=384)
    proc = run_train(tiny_args(other, copy, **{"train.steps": 16}))
    check(proc, 2)
    assert "data.tokenizer_sha256" in last_error(proc)


def test_a_legitimate_change_is_logged_and_the_run_goes_on(copy, prepared_data):
    proc = run_train(tiny_args(prepared_data, copy, **{"train.global_batch_tokens": 2048,
                                                       "train.steps": 14}))
    check(proc)
    assert ("resuming step-12 with changed settings: schedule.global_batch_tokens 1024 -> 2048; "
            "schedule.steps 12 -> 14") in proc.stdout
    assert sorted(losses(copy)) == list(range(1, 15))
    # The run keeps its identity: its new checkpoint is its own, so the old ones are pruned.
    assert sorted(p.name for p in (copy / "checkpoints").glob("step-*")) == ["step-12",
                                                                            "step-14"]


def test_when_no_checkpoint_loads_the_run_stops_instead_of_starting_over(copy, prepared_data):
    for f in (copy / "checkpoints").glob("step-*/*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    before = snapshot(copy)
    proc = run_train(tiny_args(prepared_data, copy, **{"train.steps": 16}))
    check(proc, 2)
    line = last_error(proc)
    assert "holds checkpoints but none loads (step-12: " in line and "step-8: " in line
    assert "not training over them" in line and snapshot(copy) == before


def test_checkpoints_of_another_run_are_never_pruned(copy, prepared_data):
    """Pruning keeps checkpoint.keep of this run's own checkpoints and deletes nothing else."""
    stranger = copy / "checkpoints" / "step-3"
    shutil.copytree(copy / "checkpoints" / "step-8", stranger)
    state = json.loads((stranger / "trainer.json").read_text())
    state["identity"]["run_id"] = "someone-else"
    (stranger / "trainer.json").write_text(json.dumps(state))
    proc = run_train(tiny_args(prepared_data, copy, **{"train.steps": 16}))
    check(proc)
    names = sorted(p.name for p in (copy / "checkpoints").glob("step-*"))
    assert names == ["step-12", "step-16", "step-3"]


# ---------------------------------------------------------------------- no code from disk


class Payload:
    """Unpickling this runs a shell command that leaves a file: the proof of execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def with_checksum_of(run_dir: Path, step: str, name: str) -> None:
    """Record the planted file's own checksum, as an adversary would."""
    state_path = run_dir / "checkpoints" / step / "trainer.json"
    state = json.loads(state_path.read_text())
    state["checksums"][name] = safe_dcp.file_sha256(run_dir / "checkpoints" / step / name)
    state_path.write_text(json.dumps(state))


@pytest.mark.parametrize("name", [".metadata", "rng-0.pt"])
def test_a_planted_pickle_in_a_checkpoint_does_not_run(copy, prepared_data, tmp_path, name):
    marker = tmp_path / "pwned"
    plant(copy / "checkpoints/step-12" / name, marker)
    with_checksum_of(copy, "step-12", name)
    proc = run_train(tiny_args(prepared_data, copy, **{"train.steps": 14}))
    check(proc)
    assert not marker.exists()
    assert "checkpoint" in proc.stdout and "step-12 is unreadable" in proc.stdout
    assert "resumed from" in proc.stdout and "step-8" in proc.stdout


def test_convert_and_init_from_refuse_a_planted_metadata(copy, prepared_data, tmp_path):
    marker = tmp_path / "pwned"
    step = copy / "checkpoints/step-12"
    plant(step / ".metadata", marker)
    with_checksum_of(copy, "step-12", ".metadata")
    proc = subprocess.run([sys.executable, "-m", "llamatrain.convert", "to-hf", str(step),
                           str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and not marker.exists()
    assert "not DCP metadata" in last_error(proc) and "Traceback" not in proc.stderr
    proc = run_train(tiny_args(prepared_data, tmp_path / "new",
                               **{"checkpoint.init_from": step, "train.steps": 2}))
    assert proc.returncode != 0 and not marker.exists()


def test_non_tensor_values_in_a_checkpoint_load_as_data_only(tmp_path):
    marker = tmp_path / "pwned"
    dcp.save({"x": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=str(tmp_path / "c"),
             no_dist=True)
    assert not marker.exists()
    with pytest.raises(BaseException, match="unsupported GLOBAL posix.system"):
        safe_dcp.load({"x": torch.zeros(2), "extra": None}, tmp_path / "c", no_dist=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------- checksums


def test_a_flipped_byte_is_found_and_the_previous_checkpoint_used(copy, prepared_data):
    shard = sorted((copy / "checkpoints/step-12").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = run_train(tiny_args(prepared_data, copy, **{"train.steps": 14}))
    check(proc)
    assert f"({shard.name} does not match its checksum); trying the previous one" in proc.stdout
    assert "resumed from" in proc.stdout and "step-8" in proc.stdout


def test_every_file_of_a_checkpoint_has_its_checksum(done):
    step = done / "checkpoints/step-12"
    state = json.loads((step / "trainer.json").read_text())
    files = {p.name for p in step.iterdir() if p.name != "trainer.json"}
    assert set(state["checksums"]) == files and ".metadata" in files and "rng-0.pt" in files
    for name, digest in state["checksums"].items():
        assert safe_dcp.file_sha256(step / name) == digest, name
    assert state["identity"]["seq_len"] == 64 and len(state["identity"]["run_id"]) == 32


# ------------------------------------------------------------------------------------ lock


def test_a_second_run_on_a_held_directory_exits_2_naming_the_holder(copy, prepared_data):
    lock = RunLock(copy)
    lock.acquire()
    try:
        proc = run_train(tiny_args(prepared_data, copy, **{"train.steps": 14}))
    finally:
        lock.release()
    check(proc, 2)
    assert f"is in use by host {socket.gethostname()} pid {os.getpid()}" in last_error(proc)
    assert not (copy / LOCK_FILE).exists()


def write_holder(run_dir: Path, **info) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "slurm_job_id": "", "started": time.time(), **info}))
    return path


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_holder(tmp_path, pid=gone.pid)
    logs = []
    lock = RunLock(tmp_path, log=logs.append)
    lock.acquire()
    assert "its process is gone" in logs[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_respected_until_its_heartbeat_stops(tmp_path, monkeypatch):
    path = write_holder(tmp_path, host="node-b", pid=4242, slurm_job_id="77")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunDirLocked, match=r"in use by host node-b pid 4242, SLURM job 77"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_S - 10
    os.utime(path, (old, old))
    logs = []
    lock = RunLock(tmp_path, log=logs.append)
    lock.acquire()
    assert "no heartbeat for" in logs[0]
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    write_holder(tmp_path, host="node-b", pid=4242, slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    logs = []
    lock = RunLock(tmp_path, log=logs.append)
    lock.acquire()
    assert "left by this SLURM job 77" in logs[0]
    lock.release()


# ------------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("override", ["train.lr=inf", "train.grad_clip=nan",
                                      "train.weight_decay=nan", "train.epochs=nan",
                                      "carbon.pue=inf"])
def test_non_finite_settings_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"^{key} = (inf|nan): expected a finite number$"):
        load_config(REPO / "configs/tiny.toml", [f"--{override}"])


def test_no_checkpoint_is_saved_during_a_non_finite_streak(prepared_data, tmp_path):
    run_dir = tmp_path / "streak"
    proc = run_train(tiny_args(prepared_data, run_dir, **{"checkpoint.keep": 5}),
                     env={"LLAMATRAIN_FAULT_NAN_STEPS": "3"})
    check(proc)
    assert ("step 4: no checkpoint during a non-finite streak; a resume starts from the "
            "beginning") in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-12",
                                                                               "step-8"]


# ----------------------------------------------------------------------------- small ones


def test_a_torn_last_metrics_line_does_not_block_the_resume(copy, prepared_data):
    # Keep the records up to step 8 and cut the next one short, as a kill mid-write would.
    kept = [line for line in (copy / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 8]
    (copy / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 9, "lo')
    shutil.rmtree(copy / "checkpoints/step-12")
    (copy / "checkpoints/latest").write_text("step-8\n")
    proc = run_train(tiny_args(prepared_data, copy))
    check(proc)
    assert sorted(losses(copy)) == list(range(1, 13))


def test_a_garbage_latest_file_is_named_and_ignored(copy, prepared_data):
    (copy / "checkpoints/latest").write_bytes(b"\xff\x00garbage")
    proc = run_train(tiny_args(prepared_data, copy, **{"train.steps": 14}))
    check(proc)
    assert "checkpoints/latest holds" in proc.stdout and "ignored" in proc.stdout
    assert "resumed from" in proc.stdout and "step-12" in proc.stdout


def test_a_full_disk_is_one_line(prepared_data, tmp_path):
    """The first metrics record meets a full disk: the ENOSPC its write raises, as a full file
    system raises it, is one line and exit 4."""
    run_dir = tmp_path / "full"
    full = ("import errno, os, runpy, sys\n"
            "import llamatrain.metrics as m\n"
            "def append_text(path, text):\n"
            "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))\n"
            "m.append_text = append_text\n"
            "sys.argv[0] = 'llamatrain.train'\n"
            "runpy.run_module('llamatrain.train', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", full, *tiny_args(prepared_data, run_dir)],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    check(proc, 4)
    assert last_error(proc) == (f"error: disk full: no space left on the device writing "
                                f"{run_dir / 'metrics.jsonl'}; free space there and start the run "
                                "again (it resumes from its last checkpoint)")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("raised", "code"), [(KeyboardInterrupt(), 130),
                                              (OSError(errno.ENOSPC, "No space left"), 4)])
def test_an_interrupt_or_full_disk_inside_dcp_gets_its_own_exit_code(tmp_path, raised, code):
    """DCP wraps whatever its writer raises into a CheckpointException (a BaseException)."""

    class FailingWriter(dcp.FileSystemWriter):
        def write_data(self, plan, planner):
            raise raised

    with pytest.raises(BaseException) as info:
        dcp.save({"x": torch.ones(2)}, storage_writer=FailingWriter(str(tmp_path)), no_dist=True)
    assert type(info.value).__name__ == "CheckpointException"
    assert exit_code_for(info.value, str(tmp_path))[0] == code
    assert exit_code_for(ValueError("x"), str(tmp_path)) == (None, "")


def test_an_empty_run_dir_is_refused():
    with pytest.raises(ValueError, match=r"^run.dir = '': expected a directory path"):
        load_config(REPO / "configs/tiny.toml", ["--run.dir="])


def test_any_run_name_survives_the_written_config(tmp_path):
    cfg = Config()
    cfg.run.name = 'two\nlines "quoted" back\\slash\ttab \x7f\x01 é 😀'
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "config.toml").run.name == cfg.run.name


def test_the_requeue_marker_names_the_signal_another_rank_received(prepared_data, tmp_path):
    run_dir = tmp_path / "sig"
    proc = run_train(tiny_args(prepared_data, run_dir), 2,
                     env={"LLAMATRAIN_FAULT_SIGNAL": "3:1"})
    check(proc, 1)  # torchrun's code for a worker exit of 75
    assert json.loads((run_dir / REQUEUE_MARKER).read_text()) == {"step": 3,
                                                                  "reason": "SIGUSR1"}


def test_make_bench_sets_up_the_venv_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copy(REPO / "Makefile", clone / "Makefile")  # the working tree's, committed or not
    out = subprocess.run(["make", "-n", "bench"], cwd=clone, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "MAKEFLAGS"},
                         check=True).stdout
    assert "python3 -m venv .venv" in out and "pip install -q torch==2.13.0" in out
    assert "PYTHONPATH=src .venv/bin/python benchmarks/run.py" in out
