"""PNG plots of one benchmark run's results (the dict that run.py writes as JSON): kernel time and
throughput per provider, FSDP scaling efficiency on IB and RoCE, and training loss and throughput
curves when the training benchmark reports them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

MODE_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}


def _cases(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        seen.setdefault((r["op"], r["shape"]), None)
    return list(seen)


def _save(fig: Any, path: Path) -> Path:
    """Lay the figure out, write it as a PNG at `path` and free it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grid(n: int) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def kernel_plots(rows: list[dict[str, Any]], limits: dict[str, float] | None, out: Path,
                 stem: str) -> list[Path]:
    """Time per mode and provider, and forward+backward throughput against the measured limit."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return []
    cases = _cases(ok)
    paths = []

    fig, axes = _grid(len(cases))
    for ax, (op, shape) in zip(axes, cases, strict=True):
        here = [r for r in ok if (r["op"], r["shape"]) == (op, shape)]
        width = 0.8 / len(MODE_LABELS)
        for i, (mode, label) in enumerate(MODE_LABELS.items()):
            ax.bar([j + i * width for j in range(len(here))], [r[f"{mode}_ms"] for r in here],
                   width, label=label)
        ax.set_xticks([j + width for j in range(len(here))], [r["provider"] for r in here],
                      rotation=20)
        ax.set_title(f"{op} ({shape})")
        ax.set_ylabel("median ms")
    axes[0].legend(fontsize=8)
    fig.suptitle("Kernel time per provider (lower is better)")
    paths.append(_save(fig, out / f"{stem}-kernels-time.png"))

    fig, axes = _grid(len(cases))
    for ax, (op, shape) in zip(axes, cases, strict=True):
        here = [r for r in ok if (r["op"], r["shape"]) == (op, shape) and r["fwd_bwd_rate"]]
        unit = here[0]["unit"] if here else ""
        ax.bar([r["provider"] for r in here], [r["fwd_bwd_rate"] for r in here])
        if limits:
            limit = limits["copy_gbs"] if unit == "GB/s" else limits["matmul_tflops"]
            ax.axhline(limit, color="k", linestyle="--", linewidth=1,
                       label="measured copy" if unit == "GB/s" else "measured bf16 matmul")
            ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=20)
        ax.set_title(f"{op} ({shape})")
        ax.set_ylabel(f"forward+backward {unit}")
    fig.suptitle("Kernel throughput per provider (higher is better)")
    paths.append(_save(fig, out / f"{stem}-kernels-rate.png"))
    return paths


def scaling_plot(projections: dict[str, dict[str, Any]], out: Path, stem: str) -> list[Path]:
    """Scaling efficiency against GPU count, IB solid and RoCE dashed, one colour per model."""
    if not projections:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, proj) in enumerate(projections.items()):
        rows = [r for r in proj["scaling"] if r["feasible"]]  # the trainer's layouts only
        gpus = [r["gpus"] for r in rows]
        colour = f"C{i}"
        ax.plot(gpus, [r["ib_efficiency"] for r in rows], "-o", color=colour,
                markersize=3, label=f"{name} InfiniBand")
        ax.plot(gpus, [r["roce_efficiency"] for r in rows], "--s", color=colour,
                markersize=3, label=f"{name} RoCE")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.axvline(2000, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("GPUs (A100, 8 per node, 8 x 200 Gbps per node)")
    ax.set_ylabel("scaling efficiency (compute / step time)")
    batch = next(iter(projections.values()))["global_batch_tokens"]
    ax.set_title(f"FSDP + TP at a {batch / 2**20:g}M-token global batch: modelled scaling")
    ax.legend(fontsize=8)
    return [_save(fig, out / f"{stem}-scaling.png")]


def find_curve(data: Any) -> list[dict[str, Any]]:
    """Per-step records in a training benchmark's JSON: the first list of dicts that have a
    "step" and a "loss" or "tokens_per_s", or the metrics.jsonl a "metrics_jsonl" key names."""
    if isinstance(data, dict):
        path = data.get("metrics_jsonl")
        if isinstance(path, str) and Path(path).is_file():
            lines = Path(path).read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        values = list(data.values())
    elif isinstance(data, list):
        if data and all(isinstance(d, dict) and "step" in d for d in data) and any(
            "loss" in d or "tokens_per_s" in d for d in data
        ):
            return data
        values = data
    else:
        return []
    for value in values:
        found = find_curve(value)
        if found:
            return found
    return []


def train_plot(train: Any, out: Path, stem: str) -> list[Path]:
    curve = find_curve(train)
    if not curve:
        return []
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = [(r["step"], r["loss"]) for r in curve if r.get("loss") is not None]
    tps = [(r["step"], r["tokens_per_s"]) for r in curve if r.get("tokens_per_s") is not None]
    if loss:
        ax_loss.plot(*zip(*loss, strict=True))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    if tps:
        ax_tps.plot(*zip(*tps, strict=True))
    ax_tps.set_xlabel("step")
    ax_tps.set_ylabel("tokens/s per device")
    fig.suptitle("Training benchmark")
    return [_save(fig, out / f"{stem}-train.png")]


def train_compare_plot(curves: dict[str, list[dict[str, Any]]], out: Path, stem: str
                       ) -> list[Path]:
    """Loss and tokens/s per step of several runs of one model (label -> records), overlaid."""
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, records in curves.items():
        loss = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        tps = [(r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s")]
        if loss:
            ax_loss.plot(*zip(*loss, strict=True), marker=".", label=label)
        if tps:
            ax_tps.plot(*zip(*tps, strict=True), marker=".", label=label)
    for ax, what in ((ax_loss, "training loss"), (ax_tps, "tokens/s per device")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle("Training: the same model, data and seed with each kernels.backend")
    return [_save(fig, out / f"{stem}-train.png")]


def plot_all(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Every plot the results allow; returns the files written."""
    sections = results["sections"]
    paths = kernel_plots(sections.get("kernels") or [], sections.get("limits"), out, stem)
    paths += scaling_plot(sections["accounting"].get("projections", {}), out, stem)
    train = sections.get("train") or {}
    paths += train_plot(train.get("result"), out, stem)
    return paths
