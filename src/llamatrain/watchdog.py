"""The hang watchdog: a thread on every rank that ends a run which stopped making progress.

The trainer marks its progress at the points of a step where a rank may wait for the others
(`mark`), and reports each step's time (`step_done`). When no mark comes for the hang timeout
(train.hang_timeout_s; 0 = auto: AUTO_FACTOR x the median step time, at least AUTO_MIN_S, once
AUTO_MIN_STEPS steps are timed, and AUTO_FIRST_S before that), the watchdog writes into
`run.dir/hang/`:

- `rank-<R>.json`: where this rank stopped (step, phase, the count of marks, when), its host, GPU
  and pid;
- `stacks-rank-<R>.txt`: every thread's Python stack (faulthandler);
- `nccl_trace/rank_<R>`: on CUDA, NCCL's flight recorder (launch/fabric.sh turns it on; read the
  folder with `torchfrtrace RUN_DIR/hang/nccl_trace`).

It then touches `hang/fired`, which makes every other rank's watchdog fire within one poll, waits a
few seconds at most for every rank's record, and names the rank that stopped first: the one with
the fewest marks (it never reached the point where the others wait for it), the earliest last mark
among equals, or a rank that never reported at all. Rank 0 logs that line and writes
`hang/summary.json`; every rank then leaves the requeue marker and its exit record and ends with
exit code 75 (os._exit: the main thread is stuck and cannot be asked to return).

Checkpoint saves, evaluation and benchmarks run as long phases, allowed max(timeout, AUTO_FIRST_S).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llamatrain.checkpoint.rundir import HANG, make_dir, read_text, write_atomic, write_with
from llamatrain.requeue import REQUEUE_EXIT_CODE, node_name, record_exit

FIRED = "fired"
AUTO_FACTOR = 10
AUTO_MIN_S = 300.0
AUTO_MIN_STEPS = 5
AUTO_FIRST_S = 1800.0


def auto_timeout_s(step_times: list[float]) -> float:
    """The hang timeout of train.hang_timeout_s = 0, given this attempt's step times so far."""
    if len(step_times) < AUTO_MIN_STEPS:
        return AUTO_FIRST_S
    return max(AUTO_MIN_S, AUTO_FACTOR * statistics.median(step_times))


def poll_interval_s(timeout_s: float) -> float:
    """How often the watchdog looks: a twentieth of the timeout, between 50 ms and 10 s."""
    return min(10.0, max(0.05, timeout_s / 20))


def first_stopped(records: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Who stopped first, from the ranks' records: a rank that never reported (its process is
    gone, or stuck holding the interpreter), else the fewest marks, the earliest among equals."""
    reported = {r["rank"] for r in records}
    missing = [r for r in range(world_size) if r not in reported]
    ordered = sorted(records, key=lambda r: (r["mark"], r["progress_time"]))
    summary: dict[str, Any] = {"world_size": world_size, "reported": len(records),
                               "missing": missing}
    if not ordered:
        return summary
    first = ordered[0]
    tied = [r["rank"] for r in ordered[1:] if r["mark"] == first["mark"]]
    ahead = [r for r in ordered[1:] if r["mark"] > first["mark"]]
    summary.update(rank=first["rank"], host=first["host"], gpu=first["gpu"], step=first["step"],
                   phase=first["phase"], tied=tied,
                   others_reached=(f"step {ahead[0]['step']} {ahead[0]['phase']}"
                                   if ahead else None))
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The log's line for a hang."""
    if summary["missing"]:
        return (f"hang: rank(s) {', '.join(map(str, summary['missing']))} never reported (gone, "
                f"or stuck holding the interpreter); {summary['reported']} of "
                f"{summary['world_size']} ranks did")
    gpu = f", GPU {summary['gpu']}" if summary["gpu"] is not None else ""
    where = f"at step {summary['step']} after {summary['phase']}"
    if summary["tied"]:
        also = ", ".join(map(str, summary["tied"]))
        return (f"hang: rank {summary['rank']} ({summary['host']}{gpu}) stopped first {where}, "
                f"with rank(s) {also} at the same point (the flight recorder in "
                f"{HANG}/nccl_trace tells which one a collective waited for)")
    reached = summary["others_reached"]
    others = f"; the others reached {reached}" if reached else ""
    return f"hang: rank {summary['rank']} ({summary['host']}{gpu}) stopped first {where}{others}"


class Watchdog:
    """One per rank; `start` before the first step, `close` after the last."""

    def __init__(self, run_dir: str | Path, *, rank: int, world_size: int, gpu: int | None,
                 timeout_s: float, on_fire: Callable[[int, str], None],
                 flight_recorder: bool, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / HANG
        self.rank, self.world_size, self.gpu = rank, world_size, gpu
        self.host = node_name()
        self.fixed_timeout_s = timeout_s  # 0: auto
        self.on_fire, self.flight_recorder, self.log = on_fire, flight_recorder, log
        self.fired = False
        self._times: deque[float] = deque(maxlen=101)
        self._timeout_s = timeout_s or AUTO_FIRST_S
        self._long = False
        # (step, marks so far, phase, wall time, monotonic time): replaced whole, never mutated,
        # so the watchdog thread always reads one consistent progress state.
        self._state = (0, 0, "start", time.time(), time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    # -- called by the training loop --------------------------------------------------------

    def mark(self, step: int, phase: str) -> None:
        self._state = (step, self._state[1] + 1, phase, time.time(), time.monotonic())

    def step_done(self, step: int, seconds: float) -> None:
        self._times.append(seconds)
        if not self.fixed_timeout_s:
            self._timeout_s = auto_timeout_s(list(self._times))
        self.mark(step, "step")

    @property
    def median_step_s(self) -> float | None:
        return statistics.median(self._times) if self._times else None

    @property
    def timeout_s(self) -> float:
        """The timeout now: a long phase is allowed at least AUTO_FIRST_S."""
        return max(self._timeout_s, AUTO_FIRST_S) if self._long else self._timeout_s

    @contextlib.contextmanager
    def long_phase(self, step: int, phase: str) -> Iterator[None]:
        """A checkpoint save, evaluation or benchmark: no step marks for a while, legitimately."""
        self._long = True
        self.mark(step, phase)
        try:
            yield
        finally:
            self.mark(step, f"{phase} done")
            self._long = False

    def start(self, step: int) -> None:
        self._started = time.time()
        self.mark(step, "start")
        self._thread = threading.Thread(target=self._run, name="llamatrain-watchdog", daemon=True)
        self._thread.start()
        kind = "auto" if not self.fixed_timeout_s else "train.hang_timeout_s"
        self.log(f"watchdog: hang timeout {self.timeout_s:.0f} s ({kind}), stacks to {self.dir}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None

    def wait_for_exit(self) -> None:
        """The main thread, after an error, while the watchdog that fired ends the process."""
        if self._thread is not None:
            self._thread.join(timeout=300)

    # -- the watchdog thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # Polled at the pace of the step timeout even in a long phase, so that the end of
            # the phase is noticed at once.
            if self._stop.wait(poll_interval_s(self._timeout_s)):
                return
            timeout = self.timeout_s
            idle = time.monotonic() - self._state[4]
            if idle > timeout or self._fired_elsewhere():
                try:
                    self._fire(idle, timeout)
                except Exception as e:  # e.g. a link planted at hang/: refused, not followed
                    print(f"rank {self.rank} ({self.host}): no progress for {idle:.0f} s; the "
                          f"hang records could not be written: {e}", file=sys.stderr)
                    record_exit(REQUEUE_EXIT_CODE, "hang")
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(REQUEUE_EXIT_CODE)

    def _fired_elsewhere(self) -> bool:
        try:
            # A `fired` older than this attempt is a previous hang's (rank 0 sets hang/ aside at
            # the start of each attempt; the time check covers a rank that looked before).
            return (self.dir / FIRED).stat().st_mtime >= self._started - 1
        except OSError:
            return False

    def _fire(self, idle: float, timeout: float) -> None:
        self.fired = True
        step, marks, phase, wall, _ = self._state
        make_dir(self.dir)
        stacks = self.dir / f"stacks-rank-{self.rank}.txt"

        def dump(tmp: Path) -> None:
            with tmp.open("w") as f:
                f.write(f"rank {self.rank} on {self.host}, pid {os.getpid()}: no progress for "
                        f"{idle:.1f} s at step {step} after {phase}\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)

        write_with(stacks, dump)
        record = {"rank": self.rank, "host": self.host, "gpu": self.gpu, "pid": os.getpid(),
                  "step": step, "mark": marks, "phase": phase, "progress_time": wall,
                  "idle_s": idle, "timeout_s": timeout, "fired_at": time.time(),
                  "nccl_trace": self._dump_flight_recorder()}
        write_atomic(self.dir / f"rank-{self.rank}.json", json.dumps(record, indent=1) + "\n")
        write_atomic(self.dir / FIRED, f"{self.rank}\n")
        print(f"rank {self.rank} ({self.host}): no progress for {idle:.0f} s (hang timeout "
              f"{timeout:.0f} s) at step {step} after {phase}; stacks in {stacks}",
              file=sys.stderr, flush=True)
        summary = first_stopped(self._gather(timeout), self.world_size)
        line = describe(summary)
        if self.rank == 0:
            self.log(f"{line}; records and stacks in {self.dir}; exiting {REQUEUE_EXIT_CODE} "
                     "for a requeue")
            write_atomic(self.dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        self.on_fire(step, line)
        record_exit(REQUEUE_EXIT_CODE, "hang")

    def _gather(self, timeout: float) -> list[dict[str, Any]]:
        """Every rank's record of this hang, waiting a few polls at most for late ones."""
        poll = poll_interval_s(timeout)
        deadline = time.monotonic() + max(5.0, 3 * poll)
        while True:
            records = []
            for path in self.dir.glob("rank-*.json"):
                with contextlib.suppress(OSError, ValueError):
                    r = json.loads(read_text(path, limit=65536))
                    if isinstance(r, dict) and r.get("fired_at", 0) >= self._started - 1:
                        records.append(r)
            if len(records) >= self.world_size or time.monotonic() > deadline:
                return records
            time.sleep(poll)

    def _dump_flight_recorder(self) -> str | None:
        """NCCL's flight recorder into hang/nccl_trace/rank_<R>, in the pickle format of
        `torchfrtrace` (written, never read here)."""
        if not self.flight_recorder:
            return None
        import torch._C._distributed_c10d as c10d

        dump = getattr(c10d, "_dump_fr_trace", None) or getattr(c10d, "_dump_nccl_trace", None)
        if dump is None:
            return "this torch has no flight recorder dump"
        try:
            data = dump()
        except Exception as e:  # a diagnostic: report its failure, never fail the exit
            return f"dump failed: {type(e).__name__}: {e}"
        path = make_dir(self.dir / "nccl_trace") / f"rank_{self.rank}"
        write_atomic(path, data)
        return str(path)


def set_aside(run_dir: str | Path) -> Path | None:
    """Rank 0 at the start of an attempt: a previous hang's directory becomes hang.<time>/."""
    old = Path(run_dir) / HANG
    if not old.is_dir() or old.is_symlink():
        return None
    stamp = int(old.stat().st_mtime)
    target = old.with_name(f"{HANG}.{stamp}")
    n = 1
    while os.path.lexists(target):
        n += 1
        target = old.with_name(f"{HANG}.{stamp}-{n}")
    os.replace(old, target)
    return target

