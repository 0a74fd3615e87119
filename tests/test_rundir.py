"""The run directory as untrusted input: a run refuses a directory that holds another run's outputs,
a system directory or a planted link, before it writes anything; its writes never follow a link;
the run lock reads a malformed LOCK and a read-only directory as one line each."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args

from llamatrain.checkpoint import rundir
from llamatrain.checkpoint.rundir import RunDir, RunDirRefused, check_usable
from llamatrain.checkpoint.runlock import STALE_S, RunDirLocked, RunLock
from llamatrain.config import load_config, to_toml
from llamatrain.metrics import plot_loss


def tiny_config(run_dir: Path, **overrides):
    args = tiny_args(Path("/data"), run_dir, **overrides)
    return load_config(args[1], args[2:])


def archive(path: Path) -> Path:
    """What an archived run keeps once its checkpoints are deleted."""
    path.mkdir(parents=True)
    cfg = tiny_config(path)
    (path / "config.toml").write_text(to_toml(cfg))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    for name in ("report.json", "report.md", "loss.png", "tokenizer.model"):
        (path / name).write_text(name)
    return path


def digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------- what a run may write into


def test_an_archived_run_is_refused_by_the_trainer_in_one_line_touching_nothing(tmp_path):
    run_dir = archive(tmp_path / "archived")
    before = digests(run_dir)
    proc = run_train(tiny_args(tmp_path / "no-data", run_dir))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: run.dir = '{run_dir}' holds another run's outputs (loss.png, report.json, "
        "report.md) and no checkpoint: choose another run.dir, or move them away"]
    assert digests(run_dir) == before  # no LOCK, .flock or checkpoints/ either


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: (d / "notes.txt").write_text("mine"),
     "holds files that are not a run's (notes.txt) and no checkpoint"),
    (lambda d: [(d / f"f{i}").write_text("") for i in range(7)],
     "holds files that are not a run's (f0, f1, f2, f3, f4 and 2 more) and no checkpoint"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n'),
     "holds a metrics.jsonl without the config.toml of its run, and no checkpoint"),
    (lambda d: (d / "config.toml").write_text(to_toml(tiny_config(d, **{"model.dim": 128}))),
     "holds the outputs of another run that stopped before its first checkpoint (its "
     "config.toml is another run's (model.dim 128 -> 64)): choose another run.dir"),
    (lambda d: (d / "config.toml").write_text("[model]\ndim = 'x'\n"),
     "its config.toml is not a config of this llamatrain (model.dim = 'x': expected an integer)"),
])
def test_a_folder_that_is_not_this_run_s_is_refused_naming_what_is_there(tmp_path, make,
                                                                         expected):
    run_dir = tmp_path / "dir"
    run_dir.mkdir()
    make(run_dir)
    with pytest.raises(RunDirRefused) as info:
        check_usable(run_dir, tiny_config(run_dir))
    assert str(info.value).startswith(f"run.dir = '{run_dir}' ")
    assert expected in str(info.value)


def test_a_new_empty_or_own_unsaved_directory_is_accepted(tmp_path):
    cfg = tiny_config(tmp_path / "own")
    check_usable(tmp_path / "missing", cfg)
    (tmp_path / "empty").mkdir()
    check_usable(tmp_path / "empty", cfg)
    # An attempt of this run that stopped before its first checkpoint: it starts over.
    own = tmp_path / "own"
    (own / "checkpoints/.tmp-step-4").mkdir(parents=True)
    (own / "config.toml").write_text(to_toml(tiny_config(own, **{"train.steps": 20})))
    (own / "nccl_trace").mkdir()
    for name in ("metrics.jsonl", "tokenizer.model", "requeue", ".flock", "LOCK.stale-n1-7",
                 ".metrics.jsonl.123", ".requeue-77"):
        (own / name).write_text("")
    check_usable(own, cfg)
    # A run directory with checkpoints: the resume decides (checkpoint.dcp's identity check).
    (own / "checkpoints/step-4").mkdir()
    (own / "report.json").write_text("{}")
    check_usable(own, cfg)


@pytest.mark.parametrize(("path", "what"), [
    ("/", "is a system directory"), ("/usr", "is a system directory"),
    ("/etc/llamatrain", "is inside the system directory /etc"),
    ("~", "is your home directory"),
])
def test_a_system_directory_is_refused(path, what, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    (tmp_path / "me").mkdir()
    path = Path(path).expanduser()
    with pytest.raises(RunDirRefused, match=rf"^run.dir = '{path}' {what}; a run writes "
                       r"checkpoints, metrics and its config into run.dir: choose a directory "
                       r"of its own \(e.g. runs/NAME\)$"):
        check_usable(path, tiny_config(path))


# ----------------------------------------------------------------------------- planted links


def plant(run_dir: Path, name: str, target: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / name).symlink_to(target)
    return target


def write_report(run: RunDir) -> None:
    rundir.write_atomic(run.report_md, "# report\n")


def copy_tokenizer(run: RunDir) -> None:
    rundir.copy_file(REPO / "README.md", run.tokenizer)


def draw_loss(run: RunDir) -> None:
    run.metrics.write_text(json.dumps({"step": 1, "loss": 2.0, "tokens_seen": 64}) + "\n")
    plot_loss(run.path)


def append_metrics(run: RunDir) -> None:
    rundir.append_text(run.metrics, "{}\n")


def take_lock(run: RunDir) -> None:
    lock = RunLock(run.path)
    try:
        lock.acquire()
    finally:
        lock.release()


@pytest.mark.parametrize(("name", "write"), [
    ("report.md", write_report), ("tokenizer.model", copy_tokenizer), ("loss.png", draw_loss),
    ("metrics.jsonl", append_metrics), (".flock", take_lock),
])
def test_a_planted_link_is_never_written_through(tmp_path, name, write):
    run = RunDir(tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    missing = tmp_path / "created-through-the-link"
    for target in (victim, missing):
        plant(run.path, name, target)
        with pytest.raises(RunDirRefused, match=rf"'{run.path / name}' is a symbolic link \(to "
                           rf"'{target}'\) that llamatrain did not create"):
            write(run)
        (run.path / name).unlink()
    assert victim.read_text() == "precious" and not missing.exists()


@pytest.mark.parametrize("name", ["report.md", "checkpoints", "checkpoints/latest",
                                  "checkpoints/step-8"])
def test_a_planted_link_is_refused_before_the_run_starts(tmp_path, name):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints/step-4").mkdir(parents=True)
    (run_dir / "config.toml").write_text("")
    if name == "checkpoints":
        os.rename(run_dir / "checkpoints", tmp_path / "elsewhere")
    plant(run_dir, name, tmp_path / "elsewhere")
    with pytest.raises(RunDirRefused, match=rf"^run.dir = '{run_dir}': '{name}' is a symbolic "
                       r"link .* where a run writes; remove it, or choose another run.dir$"):
        check_usable(run_dir, tiny_config(run_dir))


# ------------------------------------------------------------------------------------ lock


@pytest.mark.parametrize("text", ['[1, 2]', '{"host": "n1", "pid": "1"}', '"LOCK"', "{{"])
def test_a_lock_that_is_not_a_llamatrain_lock_is_one_line_and_taken_over_when_stale(tmp_path,
                                                                                      text):
    path = tmp_path / "LOCK"
    path.write_text(text)
    with pytest.raises(RunDirLocked, match=rf"^run.dir = '{tmp_path}' holds a LOCK that is not a "
                       rf"llamatrain lock \(.*\); if no run uses this directory, remove {path}$"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_S - 10
    os.utime(path, (old, old))
    logs = []
    lock = RunLock(tmp_path, log=logs.append)
    lock.acquire()
    assert logs[0].startswith("taking over the lock of a LOCK that is not a llamatrain lock: "
                              "no heartbeat for")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


@contextlib.contextmanager
def read_only(path: Path):
    """path as a directory nobody can write: mode 0555, or for root (whom modes do not stop) a
    read-only tmpfs mounted there."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot make a read-only directory as root here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_run_dir_is_one_line(tmp_path):
    with read_only(tmp_path / "ro") as path:
        for run_dir in (path, path / "new"):
            with pytest.raises(RunDirRefused, match=rf"^run.dir = '{run_dir}' cannot be written "
                               r"\((Read-only file system|Permission denied).*\): make it "
                               r"writable, or choose another run.dir$"):
                RunLock(run_dir).acquire()
