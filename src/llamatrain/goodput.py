"""Goodput: where a run's wall time went, across requeues and restarts.

Every attempt (a process lifetime, from its start to its end) adds to one ledger, which each
checkpoint carries in its trainer.json:

- `wall_s`: the attempts' time, process start to end (`device_s`: the same times the devices of
  each attempt, which carbon.account charges, lost work included);
- `productive_s`: steps that count (not redone later), less checkpoint staging waits;
- `startup_s`: process start to the first step (imports, data, model, restore), of which
  `restore_s` loading the checkpoint;
- `checkpoint_s`: the loop blocked by saves and their staging;
- `lost_s`, `lost_steps`: what attempts did after their last checkpoint, thrown away and
  recomputed (an attempt that stops for a requeue saves first and loses only its exit);
- `between_attempts_s`: from an attempt's end to the next one's start (requeue and queue time;
  the job held no devices, so it is outside wall_s);
- goodput = productive_s / wall_s.

An attempt that dies leaves no ledger of its own: the next one finds its end from what it left,
the `time` of its last metrics.jsonl record and pretrain.sbatch's failures.jsonl, and charges
everything after the checkpoint it resumes from as lost. An attempt that dies before its first
logged step therefore counts as time between attempts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def process_start_time() -> float:
    """When this process started (Linux /proc), else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return min(time.time(), boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


@dataclass
class Ledger:
    attempts: int = 0
    wall_s: float = 0.0
    device_s: float = 0.0
    productive_s: float = 0.0
    startup_s: float = 0.0
    restore_s: float = 0.0
    checkpoint_s: float = 0.0
    lost_s: float = 0.0
    lost_steps: int = 0
    between_attempts_s: float = 0.0

    @classmethod
    def from_dict(cls, data: Any) -> Ledger:
        """A ledger from trainer.json (untrusted): known keys with finite numbers >= 0 only."""
        ledger = cls()
        if isinstance(data, dict):
            for f in dataclasses.fields(cls):
                value = data.get(f.name)
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and 0 <= value < float("inf"):
                    setattr(ledger, f.name, int(value) if f.type == "int" else float(value))
        return ledger

    def __add__(self, other: Ledger) -> Ledger:
        return Ledger(*(getattr(self, f.name) + getattr(other, f.name)
                        for f in dataclasses.fields(self)))


def previous_end(records: list[dict[str, Any]], failures: list[dict[str, Any]], *,
                 checkpoint_step: int, checkpoint_time: float,
                 before: float) -> tuple[float, int]:
    """(when the attempt that ran past a checkpoint ended, how many steps past it it logged):
    the latest time its metrics records and the launcher's failure records show."""
    times = [r["time"] for r in records if isinstance(r.get("time"), int | float)]
    times += [f["time"] for f in failures if isinstance(f.get("time"), int | float)]
    end = max((t for t in times if t <= before), default=checkpoint_time)
    logged = [r["step"] for r in records if "loss" in r and r["step"] > checkpoint_step]
    return max(end, checkpoint_time), (max(logged) - checkpoint_step if logged else 0)


class Goodput:
    """This attempt's time, on top of the ledger the checkpoint it resumed from carried."""

    def __init__(self, *, num_devices: int, start: float | None = None):
        self.num_devices = num_devices
        self.start = process_start_time() if start is None else start
        self.carried = Ledger()
        self.own = Ledger(attempts=1)
        self._first_step_at: float | None = None

    def restored(self, state: dict[str, Any], *, end: float, lost_steps: int) -> None:
        """Resumed from a checkpoint whose trainer.json is `state`; the attempt that wrote it (or
        a later one) went on until `end` and logged `lost_steps` more steps."""
        carried = Ledger.from_dict(state.get("goodput"))
        saved_at = state.get("time")
        if isinstance(saved_at, int | float):
            tail = max(0.0, min(end, self.start) - saved_at)
            world = state.get("saved_world_size")
            carried.wall_s += tail
            carried.device_s += tail * (world if isinstance(world, int) and world > 0 else 1)
            carried.lost_s += tail
            carried.between_attempts_s += max(0.0, self.start - max(end, saved_at))
        carried.lost_steps += max(0, lost_steps)
        self.carried = carried

    def resumed(self, run_dir: Path, state: dict[str, Any], *,
                log: Callable[[str], None] = print) -> None:
        """Resumed from a checkpoint (its trainer.json `state`): the attempt that went past it
        ended when its last metrics record or the launcher's failure record says, and its steps
        after the checkpoint are lost. Call before metrics.jsonl is truncated to the checkpoint."""
        from llamatrain.metrics import read_metrics
        from llamatrain.requeue import read_failures

        metrics = Path(run_dir) / "metrics.jsonl"
        records = read_metrics(metrics) if metrics.is_file() else []
        saved_at = state.get("time")
        saved_at = saved_at if isinstance(saved_at, int | float) else self.start
        end, lost = previous_end(records, read_failures(Path(run_dir)),
                                 checkpoint_step=state["step"], checkpoint_time=saved_at,
                                 before=self.start)
        self.restored(state, end=end, lost_steps=lost)
        if lost:
            log(f"{lost} step(s) after step {state['step']} were lost with the previous attempt "
                "and are recomputed")

    def restore_took(self, seconds: float) -> None:
        self.own.restore_s += seconds

    def step(self, seconds: float) -> None:
        if self._first_step_at is None:
            self._first_step_at = time.time() - seconds
            self.own.startup_s = self._first_step_at - self.start
        self.own.productive_s += seconds

    def stalled(self, seconds: float) -> None:
        """Time the loop waited for a checkpoint (a save, or its staging)."""
        self.own.checkpoint_s += seconds

    def ledger(self) -> Ledger:
        """Everything so far, this attempt up to now included."""
        own = dataclasses.replace(self.own)
        own.wall_s = max(0.0, time.time() - self.start)
        own.device_s = own.wall_s * self.num_devices
        if self._first_step_at is None:
            own.startup_s = own.wall_s
        return self.carried + own

    def report(self) -> dict[str, Any]:
        ledger = self.ledger()
        out: dict[str, Any] = dataclasses.asdict(ledger)
        out["other_s"] = max(0.0, ledger.wall_s - ledger.productive_s - ledger.startup_s
                             - ledger.checkpoint_s - ledger.lost_s)
        out["device_hours"] = ledger.device_s / 3600
        out["goodput"] = ledger.productive_s / ledger.wall_s if ledger.wall_s > 0 else None
        return out


def markdown(report: dict[str, Any], failures: list[dict[str, Any]]) -> str:
    def pct(x: float) -> str:
        wall = report["wall_s"]
        return f"{100 * x / wall:.1f}%" if wall > 0 else "n/a"

    rows = [("wall time (every attempt)", report["wall_s"]),
            ("productive steps", report["productive_s"]),
            ("startup and restart", report["startup_s"]),
            ("of which restoring the checkpoint", report["restore_s"]),
            ("checkpoint stalls", report["checkpoint_s"]),
            (f"lost: {report['lost_steps']} step(s) recomputed, and exits", report["lost_s"]),
            ("other (evaluation, logging)", report["other_s"])]
    goodput = report["goodput"]
    lines = ["| where the time went | seconds | share |", "| --- | --- | --- |"]
    lines += [f"| {what} | {s:.1f} | {pct(s)} |" for what, s in rows]
    lines += [f"| between attempts (requeue, queue; not in wall) | "
              f"{report['between_attempts_s']:.1f} | |",
              f"| **goodput** (productive / wall), {report['attempts']} attempt(s) | | "
              f"**{'n/a' if goodput is None else f'{100 * goodput:.1f}%'}** |"]
    for f in failures:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.get("time", 0)))
        failed = ", ".join(map(str, f.get("failed") or [])) or "none"
        excluded = ", ".join(map(str, f.get("excluded") or [])) or "none"
        lines.append(f"\nFailure at {when} (job {f.get('job')}, restart {f.get('restart')}): "
                     f"failed node(s) {failed}; excluded {excluded}; {f.get('action')}.")
    return "\n".join(lines) + "\n"
