"""Shared fixtures: a small prepared corpus and the command line of a tiny training run."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from llamatrain.metrics import read_metrics

# Triton reads TRITON_INTERPRET when it is first imported, and other tests' imports (transformers,
# torch.compile) may import it before the kernel tests do: on a CPU, turn the interpreter on first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a test's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py, loaded once under a private name, never as a top-level module that
    could shadow an installed package or another test's."""
    key = f"_test_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


WORDS = [
    "def", "class", "return", "import", "self", "value", "print", "for", "in", "range", "if",
    "else", "while", "with", "as", "yield", "lambda", "None", "True", "False", "list", "dict",
    "tuple", "int", "str", "float", "open", "read", "write", "data", "model", "train", "step",
    "loss", "token", "batch", "layer", "norm", "weight", "grad",
]


def write_corpus(root: Path, *, num_docs: int = 120, seed: int = 0) -> Path:
    """A few hundred KB of code-like text: enough for a 384-piece tokenizer and a tiny model."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        lines = []
        for _ in range(rng.randint(40, 120)):
            indent = "    " * rng.randint(0, 2)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            lines.append(f"{indent}{words} = {rng.randint(0, 9999)}")
        (root / f"doc{i:03d}.py").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """A prepared directory (tokenizer.model, shards, meta.json) that runs use as data.source."""
    from llamatrain.config import DataConfig
    from llamatrain.data.cache import prepare_source

    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus")
    cfg = DataConfig(source=str(corpus), cache_dir=str(root / "cache"), workers=1,
                     val_fraction=0.05)
    return prepare_source(cfg, vocab_size=384)


def tiny_args(data: Path, run_dir: Path, **overrides) -> list[str]:
    """Overrides for a ~100k-parameter model that steps in milliseconds on a CPU."""
    args = {
        "run.dir": str(run_dir), "data.source": str(data), "data.cache_dir": str(run_dir / "c"),
        "model.vocab_size": 384, "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.multiple_of": 32, "model.max_seq_len": 64,
        "train.seq_len": 64, "train.micro_batch_size": 4, "train.global_batch_tokens": 1024,
        "train.steps": 12, "train.warmup_steps": 2, "train.deterministic": "true",
        "train.eval_interval": 0, "checkpoint.interval": 4, "checkpoint.keep": 2,
        "metrics.log_interval": 1,
    }
    args.update(overrides)
    return ["--config", str(REPO / "configs/tiny.toml"), *(f"--{k}={v}" for k, v in args.items())]


def train_command(args: list[str], nproc: int = 1, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and not max_restarts:
        return [sys.executable, "-m", "llamatrain.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "llamatrain.train", *args]


def run_train(args: list[str], nproc: int = 1, *, env: dict | None = None,
              max_restarts: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(train_command(args, nproc, max_restarts), capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
