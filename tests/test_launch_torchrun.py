"""launch/torchrun.sh without SLURM: two "nodes" on localhost, preemption by SIGUSR1 to the
workers with exit code 75 and resume; torchrun_exit.py's exit codes; one-line user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import (
    LAUNCH,
    REPO,
    free_ports,
    launch_env,
    python_executable,
    read_metrics,
    tiny_overrides,
)

TORCHRUN_SH = str(LAUNCH / "torchrun.sh")
CONFIG = str(REPO / "configs" / "tiny.toml")
STEPS = 50
REQUEUE_EXIT_CODE = 75  # llamatrain.train.REQUEUE_EXIT_CODE

WORKER = """
import os, sys
codes = os.environ["CODES"].split(",")
sys.exit(int(codes[int(os.environ["RANK"])]))
"""


def process_tree() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def torchrun_workers(launcher_pid: int) -> list[int]:
    """The worker processes below a torchrun.sh: the children of its torchrun."""
    tree = process_tree()
    found, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        if "torchrun_exit.py" in cmdline(pid):
            found += tree.get(pid, [])
        else:
            todo += tree.get(pid, [])
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize(("codes", "expected"), [("75,75", 75), ("75,3", 1)])
def test_torchrun_exit_returns_the_workers_common_exit_code(tmp_path, codes, expected):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    proc = subprocess.run(
        [python_executable(), str(LAUNCH / "torchrun_exit.py"), "--standalone",
         "--nproc-per-node=2", str(worker)],
        env=launch_env(CODES=codes), capture_output=True, text=True, timeout=120,
    )

    assert proc.returncode == expected, proc.stderr
    assert f"exited with {expected}" in proc.stderr.splitlines()[-1]


def test_torchrun_sh_reports_a_bad_override_in_one_line(tmp_path):
    proc = subprocess.run([TORCHRUN_SH, CONFIG, "--train.stepz=3"], env=launch_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("torchrun.sh: unknown key train.stepz")


def test_torchrun_sh_needs_node_rank_on_more_than_one_node(tmp_path):
    proc = subprocess.run([TORCHRUN_SH, CONFIG], env=launch_env(NNODES="2"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)

    assert proc.returncode == 2
    assert proc.stderr == "torchrun.sh: NODE_RANK is ''; allowed: 0 to 1 (0 on MASTER_ADDR)\n"


def test_two_nodes_on_localhost_train_stop_on_usr1_with_75_and_resume(tmp_path,
                                                                      tmp_path_factory):
    run_dir = tmp_path / "run"
    args = [TORCHRUN_SH, CONFIG,
            *tiny_overrides(tmp_path_factory.getbasetemp() / "launch-data", steps=STEPS,
                            interval=1000),
            f"--run.dir={run_dir}"]
    port = free_ports(1, start=29600)

    def start_nodes() -> list[subprocess.Popen]:
        return [
            subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=launch_env(NNODES="2", NODE_RANK=str(rank),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for rank in (0, 1)
        ]

    def finish(nodes: list[subprocess.Popen]) -> list[int]:
        codes = []
        for node in nodes:
            out, _ = node.communicate(timeout=240)
            codes.append(node.returncode)
            assert node.returncode in (0, REQUEUE_EXIT_CODE), out[-4000:]
        return codes

    nodes = start_nodes()
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3):
        assert time.monotonic() < deadline, "no training steps after 180 s"
        assert all(node.poll() is None for node in nodes), "a node ended before training"
        time.sleep(0.2)
    # What a scheduler's preemption does: SIGUSR1 to the worker processes, not to torchrun.
    workers = [pid for node in nodes for pid in torchrun_workers(node.pid)]
    assert len(workers) == 2
    assert all("-m llamatrain.train" in cmdline(pid) for pid in workers)
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)

    assert finish(nodes) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[-1])
    assert 3 <= stopped_at < STEPS

    assert finish(start_nodes()) == [0, 0]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["num_nodes"] == 2
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, STEPS + 1))
