"""launch/pretrain.sbatch on a real two-node SLURM cluster on localhost (launch/local-cluster):
training across both nodes, preemption with requeue and resume, a node lost mid-run (requeued
without it, resumed on the other), no requeue after a configuration error; and
launch/prepare.sbatch, corpus preparation as an array job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import losses
from slurm_cluster import (
    LAUNCH,
    REPO,
    start_cluster,
    stop_cluster,
    tiny_overrides,
    write_corpus,
)
from test_data import read_split

from llamatrain.data.__main__ import main as data_main

SBATCH = str(LAUNCH / "pretrain.sbatch")
CONFIG = str(REPO / "configs" / "tiny.toml")
STEPS = 50
INTERVAL = 1000  # far beyond STEPS: a checkpoint before the end can only be a preemption's


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    stop_cluster(cluster)


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    return tiny_overrides(tmp_path_factory.getbasetemp() / "launch-data", steps=STEPS,
                          interval=INTERVAL)


@pytest.fixture(scope="module")
def reference(cluster, overrides, tmp_path_factory):
    """An uninterrupted two-node run: (submission directory, job id, final job record)."""
    work = tmp_path_factory.mktemp("reference")
    job_id = cluster.sbatch("--nodes=2", "--job-name=reference", SBATCH, CONFIG, *overrides,
                            cwd=work)
    info = cluster.wait_done(job_id, timeout=240, log=work / f"reference-{job_id}.out")
    return work, job_id, info


def test_local_cluster_has_two_idle_nodes_with_the_machines_cores(cluster):
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T %c %m").stdout.split("\n")
    nodes = [line.split() for line in out if line]
    meminfo = Path("/proc/meminfo").read_text()
    mem_total_mb = int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1]) // 1024

    assert [n[0] for n in nodes] == ["n1", "n2"]
    assert {n[1] for n in nodes} <= {"idle", "allocated", "completing"}
    assert all(int(n[2]) == os.cpu_count() for n in nodes)
    assert all(0.4 * mem_total_mb < int(n[3]) <= 0.5 * mem_total_mb for n in nodes)


def _listening(pid: int) -> set[str]:
    """The local addresses (ip:port) of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
            ip = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6,
                                  b"".join(words))
            found.add(f"{ip}:{int(hex_port, 16)}")
    return found


def test_local_cluster_listens_on_loopback_only_and_keeps_its_state_private(cluster):
    pids = [int((cluster.state / f).read_text()) for f in
            ("slurmctld.pid", "n1/slurmd.pid", "n2/slurmd.pid")]
    addresses = set().union(*(_listening(pid) for pid in pids))
    assert len(addresses) >= 3, addresses  # slurmctld and both slurmd
    assert {a.rsplit(":", 1)[0] for a in addresses} == {"127.0.0.1"}, addresses
    assert cluster.state.stat().st_mode & 0o777 == 0o700


def test_local_cluster_down_leaves_a_process_that_took_a_stale_pid_files_number(tmp_path):
    import subprocess

    for node in ("n1", "n2"):
        (tmp_path / node).mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        # The daemons died without their pid files; pids wrap: the number is another process's.
        for name in ("slurmctld.pid", "n1/slurmd.pid"):
            (tmp_path / name).write_text(f"{bystander.pid}\n")
        subprocess.run([str(LAUNCH / "local-cluster"), "down", "--state", str(tmp_path)],
                       check=True, capture_output=True, timeout=30)
        assert bystander.poll() is None  # not sent SIGTERM
    finally:
        bystander.kill()
        bystander.wait()


def test_local_cluster_up_again_is_a_no_op_on_a_running_cluster(cluster):
    pid_before = (cluster.state / "slurmctld.pid").read_text()

    out = cluster.run(str(LAUNCH / "local-cluster"), "up", "--state", str(cluster.state)).stdout

    assert "already running" in out
    assert (cluster.state / "slurmctld.pid").read_text() == pid_before
    assert f"export SLURM_CONF={cluster.state}/slurm.conf" in out


def test_two_node_job_trains_one_run_across_both_nodes(reference):
    work, job_id, info = reference
    run_dir = work / "runs" / "reference"
    log = (work / f"reference-{job_id}.out").read_text()

    assert info["JobState"] == "COMPLETED", log
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["num_nodes"] == 2
    assert max(losses(run_dir)) == STEPS
    assert "(n1)" in log and "(n2)" in log
    assert "SLURM_RESTART_COUNT=0" in log
    assert "pretrain.sbatch: training finished" in log


def test_usr1_saves_off_interval_requeues_and_resumes_to_the_same_losses(
    cluster, overrides, reference, tmp_path
):
    job_id = cluster.sbatch("--nodes=2", "--job-name=preempted", SBATCH, CONFIG, *overrides,
                            cwd=tmp_path)
    run_dir = tmp_path / "runs" / "preempted"
    log_path = tmp_path / f"preempted-{job_id}.out"
    cluster.wait_for("three logged steps",
                     lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 3,
                     timeout=180, job_id=job_id, log=log_path)

    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    info = cluster.wait_done(job_id, timeout=240, log=log_path)

    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log
    assert "requeueing job" in log
    saved = sorted(int(p.name.removeprefix("step-"))
                   for p in (run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and saved[1] == STEPS, saved
    preempted_at = saved[0]
    assert 3 <= preempted_at < STEPS and preempted_at % INTERVAL != 0
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == losses(reference[0] / "runs" / "reference")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2


def _kill_ranks(job_id: int, node: str) -> list[int]:
    """SIGKILL every trainer rank of a job on one node: the processes torchrun started there."""
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in
                       (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURMD_NODENAME") == node
                and "LOCAL_RANK" in env):
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
    return killed


def test_a_node_lost_mid_run_comes_back_on_the_rest_with_the_same_losses(
    cluster, overrides, reference, tmp_path
):
    # Rank 0 sleeps 50 ms in each step (losses unchanged), so that the kill lands mid-run.
    job_id = cluster.sbatch("--nodes=2", "--job-name=nodeloss",
                            "--export=ALL,MIN_NODES=1,LLAMATRAIN_FAULT_SLOW=0:0.05", SBATCH,
                            CONFIG, *overrides, "--checkpoint.interval=10", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "nodeloss"
    log_path = tmp_path / f"nodeloss-{job_id}.out"
    latest = run_dir / "checkpoints" / "latest"
    cluster.wait_for("step-10 saved and two more steps",
                     lambda: latest.exists() and len(losses(run_dir)) >= 12,
                     timeout=180, job_id=job_id, log=log_path)

    logged = max(losses(run_dir))
    assert _kill_ranks(job_id, "n2")
    info = cluster.wait_done(job_id, timeout=240, log=log_path)

    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED", log
    assert (info["Restarts"], info["ExcNodeList"], info["NodeList"]) == ("1", "n2", "n1"), log
    assert re.search(r"node\(s\) n2 failed \(n1: rank [01] exit 75 peer-lost; n2: no rank left a "
                     r"record\); failure 1 of at most 3", log), log
    assert "requeueing job" in log and "excluding n2" in log
    assert "SLURM_RESTART_COUNT=1 nodes=1 (n1)" in log
    assert "resumed from" in log and "saved at world size 2" in log
    # Every step, and the losses of the uninterrupted two-node run (one node now: more
    # accumulation, the same samples).
    resumed, full = losses(run_dir), losses(reference[0] / "runs" / "reference")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["world_size"], report["num_nodes"], report["steps"]) == (1, 1, STEPS)
    goodput = report["goodput"]
    assert goodput["attempts"] == 2 and goodput["lost_steps"] >= logged - 10 >= 2
    assert 0 < goodput["goodput"] < 1
    [failure] = report["failures"]
    assert (failure["failed"], failure["excluded"], failure["job"]) == (["n2"], ["n2"],
                                                                        str(job_id))
    assert "failed node(s) n2; excluded n2; retry" in (run_dir / "report.md").read_text()


def test_a_run_that_fails_is_not_requeued(cluster, overrides, tmp_path):
    job_id = cluster.sbatch("--nodes=2", "--job-name=broken", SBATCH, CONFIG, *overrides,
                            "--train.stepz=3", cwd=tmp_path)
    log_path = tmp_path / f"broken-{job_id}.out"

    info = cluster.wait_done(job_id, timeout=120, log=log_path)

    log = log_path.read_text()
    assert info["JobState"] == "FAILED", log
    assert info["Restarts"] == "0"
    assert "unknown key train.stepz" in log
    assert "not requeueing" in log


def test_prepare_as_a_slurm_array_equals_a_one_process_prepare(cluster, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", num_bytes=150_000)
    options = ["--vocab-size", "512", "--workers", "1", "--tokenizer-sample", "20000",
               "--val-fraction", "0.1"]
    parted = tmp_path / "parted"
    job_id = cluster.sbatch("--array=0-1", "--job-name=prep", str(LAUNCH / "prepare.sbatch"),
                            str(corpus), "--out", str(parted), *options, cwd=tmp_path)
    logs = [tmp_path / f"prep-{job_id}_{k}.out" for k in (0, 1)]

    def ended() -> bool:
        active = cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        return all(log.exists() for log in logs) and not active.stdout.strip()

    cluster.wait_for("both array tasks", ended, timeout=180, log=logs[0])
    text = "".join(log.read_text() for log in logs)
    assert "part 0/2" in text and "part 1/2" in text, text
    assert f"all 2 parts done: {parted} is prepared" in text, text

    one = tmp_path / "one"
    assert data_main(["prepare", "--input", str(corpus), "--out", str(one), *options]) == 0
    assert (one / "tokenizer.model").read_bytes() == (parted / "tokenizer.model").read_bytes()
    for split in ("train", "val"):
        assert np.array_equal(read_split(one, split), read_split(parted, split)), split
    meta = json.loads((parted / "meta.json").read_text())
    assert meta["parts"] == 2 and len(list((parted / "parts").iterdir())) == 2
