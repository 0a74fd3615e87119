"""When to save: every `checkpoint.interval` steps and at the end, never (0: benchmarks), or
"auto", the Young-Daly interval.

A save that costs C seconds of training, on a job that fails every M seconds on average (the whole
job's mean time between failures, `checkpoint.mtbf_hours`), loses the least time to saving plus
recomputing when saves are sqrt(2 x C x M) seconds apart (Young 1974; Daly 2006). C is the time a
save blocks the loop (all of it for a synchronous save, the staging for `checkpoint.async`); an
asynchronous save also needs its total time to reach the disk, and a save waits for the previous
one, so the interval is at least that total. In steps: the interval over the median step time.

With "auto", the first save comes once AUTO_FIRST_STEPS steps of the attempt are timed (it
measures C), then every computed interval, recomputed after each save from the cost all ranks
agree on (the largest); a resumed run carries the interval and its costs in trainer.json.
"""

from __future__ import annotations

import math
from typing import Any

from llamatrain.config import CheckpointConfig

AUTO_FIRST_STEPS = 5


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval in seconds that minimises the expected lost time."""
    return math.sqrt(2.0 * cost_s * mtbf_s)


def interval_steps(*, blocked_s: float, total_s: float, mtbf_hours: float,
                   step_s: float) -> int:
    """The Young-Daly interval in whole steps (at least 1, and no shorter than a save's total)."""
    seconds = max(young_daly_s(blocked_s, mtbf_hours * 3600.0), total_s)
    return max(1, round(seconds / step_s))


class SaveSchedule:
    """Which steps save; the measured save costs for the report."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.auto = cfg.interval == "auto"
        self.every: int | None = None if self.auto else int(cfg.interval)
        self.blocked: list[float] = []
        self.totals: list[float] = []
        self.step_s: float | None = None

    def due(self, step: int, *, last_saved: int, steps_this_run: int, final: bool) -> bool:
        """Whether `step` saves; `final` is the run's last step (saved unless interval = 0)."""
        if self.every == 0:
            return False
        if final:
            return True
        if not self.auto:
            return step % self.every == 0
        if self.every is None:  # no save timed yet: the first one measures the cost
            return steps_this_run >= AUTO_FIRST_STEPS
        return step - last_saved >= self.every

    def measured(self, *, blocked_s: float, total_s: float | None, step_s: float | None) -> None:
        """A save's cost as every rank agreed on it; total_s is the last save that reached the
        disk (the previous one for an asynchronous save, None before the first)."""
        self.blocked.append(blocked_s)
        if total_s:
            self.totals.append(total_s)
        if step_s:
            self.step_s = step_s
        if self.auto and self.step_s:
            self.every = interval_steps(blocked_s=blocked_s, total_s=total_s or blocked_s,
                                        mtbf_hours=self.cfg.mtbf_hours, step_s=self.step_s)

    def state_dict(self) -> dict[str, Any]:
        return {"auto": self.auto, "every": self.every, "blocked_s": self.blocked[-20:],
                "total_s": self.totals[-20:], "step_s": self.step_s}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A resume (trainer.json, untrusted): the costs, and an auto interval already computed."""
        if not isinstance(state, dict):
            return
        every = state.get("every")
        if self.auto and state.get("auto") is True and isinstance(every, int) and every > 0:
            self.every = every
        def seconds(values: Any) -> list[float]:
            ok = isinstance(values, list) and all(isinstance(x, int | float) for x in values)
            return [float(x) for x in values if math.isfinite(x) and x >= 0] if ok else []

        self.blocked, self.totals = seconds(state.get("blocked_s")), seconds(state.get("total_s"))
        step_s = state.get("step_s")
        if isinstance(step_s, int | float) and math.isfinite(step_s) and step_s > 0:
            self.step_s = float(step_s)

    def report(self) -> dict[str, Any]:
        """Measured cost (mean blocking and total seconds per save), and the Young-Daly interval
        when checkpoint.mtbf_hours is given."""
        blocked = sum(self.blocked) / len(self.blocked) if self.blocked else None
        total = sum(self.totals) / len(self.totals) if self.totals else blocked
        out: dict[str, Any] = {"interval": self.cfg.interval, "interval_steps": self.every,
                               "saves_timed": len(self.blocked), "blocked_s": blocked,
                               "total_s": total, "median_step_s": self.step_s,
                               "mtbf_hours": self.cfg.mtbf_hours or None,
                               "young_daly_s": None, "young_daly_steps": None}
        if self.cfg.mtbf_hours and blocked is not None:
            out["young_daly_s"] = max(young_daly_s(blocked, self.cfg.mtbf_hours * 3600), total)
            if self.step_s:
                out["young_daly_steps"] = interval_steps(
                    blocked_s=blocked, total_s=total, mtbf_hours=self.cfg.mtbf_hours,
                    step_s=self.step_s)
        return out


def markdown(report: dict[str, Any]) -> str:
    def s(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g} s"

    every = report["interval_steps"]
    now = "never" if every == 0 else f"now every {every} steps"
    lines = [f"| interval | {report['interval']} ({now}) |",
             f"| save cost, blocking | {s(report['blocked_s'])} (mean of "
             f"{report['saves_timed']} saves) |",
             f"| save cost, total | {s(report['total_s'])} |"]
    if report["mtbf_hours"]:
        lines.append(f"| Young-Daly sqrt(2 x cost x MTBF {report['mtbf_hours']:g} h) | "
                     f"{s(report['young_daly_s'])} = {report['young_daly_steps']} steps of "
                     f"{s(report['median_step_s'])} |")
    else:
        lines.append("| Young-Daly interval | set checkpoint.mtbf_hours to get it |")
    return "| what | value |\n| --- | --- |\n" + "\n".join(lines) + "\n"
