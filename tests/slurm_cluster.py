"""What the launch tests share: the two-node local SLURM cluster (launch/local-cluster) in a temp
directory, and the tiny model, corpus and overrides their training runs use."""

from __future__ import annotations

import os
import socket
import subprocess
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamatrain import metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PYTHON = REPO / ".venv" / "bin" / "python"


def python_executable() -> str:
    """The project's venv interpreter where there is one, else the one running the tests."""
    import sys

    return str(PYTHON) if PYTHON.exists() else sys.executable


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for launch scripts: this interpreter first on PATH, loopback-only gloo, one
    thread per process (two "nodes" share two cores)."""
    python = Path(python_executable())
    env = dict(os.environ)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = str(python)
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_ports(count: int, *, start: int = 17100, stop: int = 30000) -> int:
    """The first port p of `count` consecutive free loopback ports p, p+1, ..."""
    for base in range(start, stop, count):
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports in {start}-{stop}")


@dataclass
class Cluster:
    """A running local cluster; commands run against its slurm.conf."""

    state: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, cwd=cwd, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def sbatch(self, *args: str, cwd: Path) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (there is no accounting, so no sacct)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for(self, what: str, predicate: Callable[[], bool], *, timeout: float,
                 job_id: int | None = None, log: Path | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                detail = f"\njob: {self.job(job_id)}" if job_id is not None else ""
                if log is not None and log.exists():
                    detail += f"\nlog:\n{log.read_text()[-4000:]}"
                raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
            time.sleep(0.25)

    def wait_done(self, job_id: int, *, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait until the job has ended for good (requeued jobs pass through PENDING)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        self.wait_for(f"job {job_id} to end", lambda: self.job(job_id)["JobState"] in final,
                      timeout=timeout, job_id=job_id, log=log)
        return self.job(job_id)


def start_cluster(state: Path) -> Cluster:
    """launch/local-cluster up in `state` on free ports (installs slurm-wlm if missing)."""
    port = free_ports(3)
    subprocess.run([str(LAUNCH / "local-cluster"), "up", "--state", str(state), "--port",
                    str(port)], check=True, capture_output=True, text=True, timeout=300)
    return Cluster(state=state, env=launch_env(SLURM_CONF=str(state / "slurm.conf")))


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run([str(LAUNCH / "local-cluster"), "down", "--state", str(cluster.state)],
                   check=True, capture_output=True, timeout=60)


def write_corpus(directory: Path, *, num_bytes: int = 300_000) -> Path:
    """A few hundred KB of real text: the first standard-library modules, one document each."""
    directory.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for source in sorted(stdlib.glob("*.py")):
        text = source.read_text(encoding="utf-8", errors="replace")
        (directory / f"{source.stem}.txt").write_text(text)
        total += len(text)
        if total >= num_bytes:
            break
    return directory


def tiny_overrides(base: Path, *, steps: int, interval: int) -> list[str]:
    """A model of about 0.1M parameters on sequences of 64 tokens: seconds per run on a CPU. The
    corpus and its prepared cache live in `base`, so tests that share it prepare it once."""
    corpus = base / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    cache_dir = base / "cache"
    return [
        "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--model.vocab_size=512", "--model.multiple_of=32", "--model.max_seq_len=64",
        "--train.seq_len=64", "--train.micro_batch_size=2", "--train.global_batch_tokens=512",
        f"--train.steps={steps}", "--train.warmup_steps=2", "--train.deterministic=true",
        f"--checkpoint.interval={interval}", "--checkpoint.keep=5",
        f"--data.source={corpus}", f"--data.cache_dir={cache_dir}", "--data.workers=1",
        "--data.tokenizer_sample=20000", "--metrics.log_interval=1",
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return metrics.read_metrics(run_dir / "metrics.jsonl")
