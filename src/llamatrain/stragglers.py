"""Stragglers: which ranks make the others wait.

Each log interval every rank gives its mean step time over the interval and its mean data wait, in
one all_gather of a small tensor. The step time of a rank leaves out what it waited for the others
at the step's first collective: in lock-step training every rank's wall time per step is the same,
and a rank that is slow before that collective (its data, its host) makes the others wait there,
which is their wait, not their slowness. metrics.jsonl records the slowest rank's figures and the
median; ranks slower than the median by metrics.straggler_factor are named with their host and GPU
in the log and in report.json.

A rank that is slow inside forward or backward makes the others wait inside FSDP's own
collectives, which a host-side figure does not separate; a profile (metrics.profile_steps) or the
flight recorder does.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llamatrain.distributed.world import World
from llamatrain.requeue import node_name

_HOST_BYTES = 64


@dataclass
class Placement:
    rank: int
    host: str
    gpu: int | None


def placements(world: World) -> list[Placement]:
    """Every rank's host and GPU index (one all_gather at setup; no pickled objects)."""
    own = torch.zeros(_HOST_BYTES + 1, dtype=torch.int64, device=world.device)
    name = node_name().encode()[:_HOST_BYTES]
    own[: len(name)] = torch.tensor(list(name), dtype=torch.int64)
    own[-1] = -1 if world.gpu is None else world.gpu
    rows = [own]
    if dist.is_initialized() and world.world_size > 1:
        rows = [torch.empty_like(own) for _ in range(world.world_size)]
        dist.all_gather(rows, own)
    out = []
    for rank, row in enumerate(rows):
        values = row.tolist()
        host = bytes(v for v in values[:_HOST_BYTES] if v).decode(errors="replace")
        out.append(Placement(rank, host, None if values[-1] < 0 else values[-1]))
    return out


def straggler_stats(per_rank: list[tuple[float, float]], factor: float) -> dict[str, Any]:
    """(step time, data wait) of every rank -> the slowest, the medians and the stragglers: ranks
    whose step time exceeds factor x the median."""
    steps = [s for s, _ in per_rank]
    waits = [w for _, w in per_rank]
    median = statistics.median(steps)
    slowest = max(range(len(steps)), key=steps.__getitem__)
    return {"step_time_median_s": median, "step_time_max_s": steps[slowest],
            "slowest_rank": slowest, "data_wait_median_s": statistics.median(waits),
            "data_wait_max_s": max(waits),
            "stragglers": [r for r, s in enumerate(steps) if s > factor * median]}


class Stragglers:
    """The straggler statistics of a run: `interval` on every rank at each log step."""

    def __init__(self, world: World, factor: float, log: Callable[[str], None]):
        self.world, self.factor, self.log = world, factor, log
        self.placement = placements(world)
        self.intervals = 0
        self.flagged: dict[int, dict[str, Any]] = {}

    def interval(self, step: int, step_time_s: float, data_wait_s: float) -> dict[str, Any]:
        """Gather this interval's figures from every rank (a collective); the fields for
        metrics.jsonl, with stragglers named in the log."""
        own = torch.tensor([step_time_s, data_wait_s], dtype=torch.float64,
                           device=self.world.device)
        rows = [own]
        if dist.is_initialized() and self.world.world_size > 1:
            rows = [torch.empty_like(own) for _ in range(self.world.world_size)]
            dist.all_gather(rows, own)
        per_rank = [tuple(r.tolist()) for r in rows]
        stats = straggler_stats(per_rank, self.factor)
        self.intervals += 1
        named = []
        for rank in stats["stragglers"]:
            p = self.placement[rank]
            step_s, wait_s = per_rank[rank]
            median = stats["step_time_median_s"]
            ratio = step_s / median if median > 0 else float("inf")
            seen = self.flagged.setdefault(rank, {"rank": rank, "host": p.host, "gpu": p.gpu,
                                                  "intervals": 0, "worst_ratio": 0.0})
            seen["intervals"] += 1
            if ratio > seen["worst_ratio"]:
                seen.update(worst_ratio=ratio, worst_step_time_s=step_s,
                            median_step_time_s=stats["step_time_median_s"],
                            data_wait_s=wait_s, step=step)
            gpu = f", GPU {p.gpu}" if p.gpu is not None else ""
            named.append(f"rank {rank} ({p.host}{gpu}) {step_s:.3f} s/step, data wait "
                         f"{wait_s:.3f} s")
        if named:
            self.log(f"step {step}: straggler(s) slower than {self.factor:g} x the median "
                     f"{stats['step_time_median_s']:.3f} s/step: " + "; ".join(named))
        return stats

    def report(self) -> dict[str, Any]:
        return {"factor": self.factor, "intervals": self.intervals,
                "ranks": sorted(self.flagged.values(), key=lambda r: -r["intervals"])}


def markdown(report: dict[str, Any]) -> str:
    ranks = report["ranks"]
    if not ranks:
        return (f"No straggler in {report['intervals']} log intervals (factor "
                f"{report['factor']:g}).\n")
    rows = "\n".join(
        f"| {r['rank']} | {r['host']} | {'n/a' if r['gpu'] is None else r['gpu']} | "
        f"{r['intervals']} of {report['intervals']} | {r['worst_step_time_s']:.4g} s vs median "
        f"{r['median_step_time_s']:.4g} s at step {r['step']} | {r['data_wait_s']:.4g} s |"
        for r in ranks)
    return ("| rank | host | GPU | intervals named | worst step time | its data wait |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + rows + "\n")
