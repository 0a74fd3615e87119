"""Per-step figures: one readable line on rank 0's stdout, a record in metrics.jsonl, and optionally
Weights & Biases and TensorBoard; plus the loss curve (the paper's Figure 5, for this run)."""

from __future__ import annotations

import io
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llamatrain.checkpoint.rundir import RunDir, append_text, make_dir, write_atomic
from llamatrain.config import MetricsConfig


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_line(rec: dict[str, Any], total_steps: int, elapsed: float, eta: float) -> str:
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"gnorm {rec['grad_norm']:.3f}",
        f"{_si(rec['tokens_per_s'])} tok/s/dev",
        "mfu n/a" if rec["mfu"] is None else f"mfu {100 * rec['mfu']:.1f}%",
        f"mem {rec['mem_gb']:.2f} GB",
        f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}",
    ]
    if rec.get("energy_kwh") is not None:
        parts.insert(-1, f"{rec['energy_kwh']:.3g} kWh")
    return " | ".join(parts)


class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: str | Path, cfg: MetricsConfig, *, enabled: bool,
                 total_steps: int, run_name: str, config: dict[str, Any]):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = RunDir(run_dir).metrics
        self.start = time.perf_counter()
        self._wandb, tb = require_optional(cfg)
        self._tb = None
        if tb is not None and enabled:
            self._tb = tb.SummaryWriter(str(make_dir(RunDir(run_dir).tensorboard)))
        if enabled and self._wandb is not None:
            self._wandb.init(project="llamatrain", name=run_name, config=config,
                             dir=str(run_dir), resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by an attempt that died after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= step]
        # Replaced in one rename: a kill during the rewrite leaves the old file whole.
        write_atomic(self.path, "".join(kept))

    def log(self, rec: dict[str, Any], *, steps_done_this_run: int, step: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(1, steps_done_this_run)
        eta = per_step * (self.total_steps - step)
        print(format_line(rec, self.total_steps, elapsed, eta), flush=True)
        self.write(rec)

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in rec.items()}
        append_text(self.path, json.dumps(clean) + "\n")
        numbers = {k: v for k, v in rec.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=rec["step"])
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None and self.enabled:
            self._wandb.finish()


def require_optional(cfg: MetricsConfig):
    """(wandb, torch.utils.tensorboard) modules as asked for, else None; one that is asked for and
    not installed is a ValueError, raised by the trainer before it does anything else."""
    wandb = _require("wandb", "metrics.wandb") if cfg.wandb else None
    tb = _require("torch.utils.tensorboard", "metrics.tensorboard") if cfg.tensorboard else None
    return wandb, tb


def _require(module: str, key: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        extra = key.split(".")[1]
        raise ValueError(f"{key} = true: {module} is not installed "
                         f"(pip install 'llamatrain[{extra}]')") from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut short (the writer was killed mid-line) is
    dropped; a bad line anywhere else is a ValueError naming it."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1)
             if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                print(f"{path}: line {i} is incomplete (a write was cut short): dropped",
                      file=sys.stderr)
                break
            raise ValueError(f"{path}: line {i} is not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {i} is not a metrics record: {line[:80]!r}")
        records.append(record)
    return records


def plot_loss(run_dir: str | Path) -> Path:
    """Training (and validation) loss against tokens seen, as the paper's Figure 5 draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = RunDir(run_dir)
    records = read_metrics(run_dir.metrics)
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([r["tokens_seen"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["tokens_seen"] for r in val], [r["val_loss"] for r in val], "o-",
                label="validation")
    ax.set_xlabel("processed tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"training loss: {run_dir.path.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir.loss_plot
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_atomic(out, image.getvalue())
    return out


if __name__ == "__main__":
    print(plot_loss(sys.argv[1]))
