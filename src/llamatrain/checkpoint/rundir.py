"""The run directory's layout, in one place: the name of everything a run writes under `run.dir`
and the step directories of its checkpoints. The trainer, the checkpointer, the run lock, the
metrics logger, `convert` and `evaluate` ask this module instead of spelling the names.

    run.dir/
      checkpoints/step-<N>/   one DCP checkpoint (checkpoint.dcp), written as .tmp-step-<N>/
      checkpoints/latest      names the newest complete step
      metrics.jsonl  config.toml  tokenizer.model  report.json  report.md  loss.png
      requeue                 left by a stop for requeue (step and reason)
      LOCK  .flock            the run lock (checkpoint.runlock)
      profile/  tensorboard/  when metrics.profile_steps / metrics.tensorboard ask for them
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_NAME = re.compile(r"step-\d+")
TMP_STEP_PREFIX = ".tmp-step-"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
TOKENIZER = "tokenizer.model"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "loss.png"
REQUEUE = "requeue"
LOCK = "LOCK"
FLOCK = ".flock"
PROFILE = "profile"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of_checkpoint(cls, step_dir: str | Path) -> RunDir:
        """The run directory a `checkpoints/step-<N>` directory belongs to."""
        return cls(Path(step_dir).parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def report_json(self) -> Path:
        return self.path / REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def requeue(self) -> Path:
        return self.path / REQUEUE

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def flock(self) -> Path:
        return self.path / FLOCK

    @property
    def profile(self) -> Path:
        return self.path / PROFILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD


def step_name(step: int) -> str:
    return f"step-{step}"


def tmp_step_name(step: int) -> str:
    return f"{TMP_STEP_PREFIX}{step}"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Every `step-<N>` directory, complete or not, newest first."""
    return sorted((p for p in ckpt_dir.glob("step-*")
                   if STEP_NAME.fullmatch(p.name) and p.is_dir()),
                  key=step_of, reverse=True)


def tmp_step_dirs(ckpt_dir: Path) -> list[Path]:
    """Directories of saves that were never published."""
    return list(ckpt_dir.glob(f"{TMP_STEP_PREFIX}*"))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
