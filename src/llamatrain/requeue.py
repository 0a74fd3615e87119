"""The requeue protocol between the trainer's ranks and launch/pretrain.sbatch.

Every rank leaves an exit record when it ends (under pretrain.sbatch, which sets
LLAMATRAIN_REQUEUE_DIR): its exit code, its node and why, in `<dir>/rank-<RANK>`. A rank killed
with its node leaves none. launch/torchrun.sh leaves its node's exit code in `<dir>/node-<name>`
(a bad configuration ends it before any rank starts). After srun returns, the batch script asks
`python -m llamatrain.requeue verdict` what to do, which reads those records:

- `done`: every rank finished.
- `requeue`: every rank saved on request (SIGUSR1/SIGTERM): come back as before.
- `retry`: a failure (a rank crashed or vanished, a hang): come back, counted against
  MAX_FAILURES, without the nodes that failed unless every node did (then it was the run's own
  doing, not a node's). A rank that lost its peer (a collective failed because another rank
  died) or saw a hang exits 75 and clears its node.
- `stop`: do not come back: a configuration or run-directory error (exit 2), too many non-finite
  steps (3), a full disk (4), an interrupt (130), or more failures than MAX_FAILURES.

Each failure is appended to `<run.dir>/failures.jsonl` (time, job, restart, nodes, failed nodes,
the ranks' records), which the next attempt's report shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llamatrain.checkpoint.rundir import (
    FAILURES,
    RunDirRefused,
    append_text,
    make_dir,
    read_text,
    write_atomic,
)

REQUEUE_EXIT_CODE = 75
# Exit codes that a requeue would only repeat: the configuration or run directory (2), a streak of
# non-finite losses (3), a full disk (4), an interrupt by the user (130).
NEVER_REQUEUE = {2: "configuration or run directory", 3: "too many non-finite steps",
                 4: "disk full", 130: "interrupted"}
ENV_DIR = "LLAMATRAIN_REQUEUE_DIR"
# gloo's words for a peer that went away, or a collective that waited past its timeout.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Socket closed",
              "Timed out waiting", "gloo/transport")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def node_name() -> str:
    """This process's node: SLURM's name for it, else the host name."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def peer_lost(error: BaseException) -> bool:
    """Whether an exception says that a collective failed because of another rank (it died, or
    never came within the process group's timeout), not because of this one."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, dist.DistError):
            return True
        if isinstance(e, RuntimeError) and any(words in str(e) for words in _PEER_LOST):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: one per rank
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


@dataclass
class ExitRecord:
    rank: int
    code: int
    node: str
    local_world_size: int
    reason: str


def record_exit(code: int, reason: str) -> None:
    """Leave this rank's exit record for the launcher (nothing without LLAMATRAIN_REQUEUE_DIR)."""
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return
    env = os.environ
    rank = int(env.get("RANK", "0"))
    record = ExitRecord(rank, code, node_name(), int(env.get("LOCAL_WORLD_SIZE", "1")), reason)
    path = Path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(make_dir(path) / f"rank-{rank}", json.dumps(asdict(record)) + "\n")
    except (OSError, ValueError) as e:  # advice to the launcher: never fail an exit over it
        print(f"rank {rank}: could not leave the exit record in {directory}: {e}",
              file=sys.stderr, flush=True)


def read_node_codes(directory: Path) -> dict[str, int]:
    """The exit codes launch/torchrun.sh left per node (`node-<name>`: it finds a bad
    configuration before any rank starts)."""
    codes = {}
    for path in directory.glob("node-*"):
        try:
            codes[path.name.removeprefix("node-")] = int(read_text(path, limit=16))
        except (OSError, ValueError):
            continue
    return codes


def read_records(directory: Path) -> dict[int, ExitRecord]:
    """The ranks' exit records; a file that is not one (the directory is untrusted) is skipped."""
    records = {}
    for path in directory.glob("rank-*"):
        try:
            raw = json.loads(read_text(path, limit=4096))
            record = ExitRecord(**{k: raw[k] for k in ExitRecord.__dataclass_fields__})
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if (isinstance(record.rank, int) and isinstance(record.code, int)
                and isinstance(record.local_world_size, int) and isinstance(record.node, str)
                and isinstance(record.reason, str) and path.name == f"rank-{record.rank}"):
            records[record.rank] = record
    return records


@dataclass
class Verdict:
    action: str  # done, requeue, retry or stop
    exit_code: int
    exclude: list[str]
    message: str

    def line(self) -> str:
        return f"{self.action} {self.exit_code} {','.join(self.exclude) or '-'} {self.message}"


def failed_nodes(records: dict[int, ExitRecord], nodes: Iterable[str]) -> list[str]:
    """Nodes with a rank that crashed (an exit code other than 0 and 75) or left no record: it
    was killed, with its node or alone. A node none of whose ranks left a record failed too."""
    failed = []
    for node in nodes:
        mine = [r for r in records.values() if r.node == node]
        expected = max((r.local_world_size for r in mine), default=1)
        if len(mine) < expected or any(r.code not in (0, REQUEUE_EXIT_CODE) for r in mine):
            failed.append(node)
    return failed


def decide(records: dict[int, ExitRecord], nodes: list[str], *, srun_exit: int,
           failures_so_far: int, max_failures: int,
           node_codes: dict[str, int] | None = None) -> Verdict:
    """What the batch script does after srun returned `srun_exit` and the nodes' torchrun.sh
    `node_codes` (see the module docstring)."""
    codes_seen = [r.code for r in records.values()] + list((node_codes or {}).values())
    never = sorted({c for c in codes_seen if c in NEVER_REQUEUE}
                   | ({srun_exit} if srun_exit == 2 else set()))
    if never:
        code = never[0]
        return Verdict("stop", code, [], f"exit {code} ({NEVER_REQUEUE[code]}): not requeueing")
    codes = {r.code for r in records.values()}
    failed = failed_nodes(records, nodes)
    if not failed and codes <= {0} and srun_exit == 0:
        return Verdict("done", 0, [], "training finished")
    reasons = {r.reason for r in records.values()}
    if not failed and codes == {REQUEUE_EXIT_CODE} and reasons == {"saved"}:
        return Verdict("requeue", 0, [], f"checkpoint saved on request on all {len(nodes)} "
                                         "node(s)")
    if failed == nodes:
        # Every node failed the same way: the run's doing (or the cluster's), not one node's.
        exclude, what = [], f"every node failed ({_summary(records, nodes)})"
    elif failed:
        exclude, what = failed, (f"node(s) {', '.join(failed)} failed "
                                 f"({_summary(records, nodes)})")
    elif "hang" in reasons:
        exclude, what = [], "the run hung (stacks and the rank that stopped first in run.dir/hang/)"
    else:
        exclude, what = [], f"no node failed but the run stopped ({_summary(records, nodes)})"
    count = failures_so_far + 1
    if count > max_failures:
        return Verdict("stop", srun_exit or 1, exclude,
                       f"{what}; failure {count} > MAX_FAILURES={max_failures}: not requeueing")
    return Verdict("retry", 0, exclude, f"{what}; failure {count} of at most {max_failures}")


def _summary(records: dict[int, ExitRecord], nodes: list[str]) -> str:
    parts = []
    for node in nodes:
        mine = sorted((r for r in records.values() if r.node == node), key=lambda r: r.rank)
        if not mine:
            parts.append(f"{node}: no rank left a record")
        else:
            parts.append(f"{node}: " + ", ".join(f"rank {r.rank} exit {r.code} {r.reason}"
                                                  for r in mine))
    return "; ".join(parts)


def failures_of_job(run_dir: Path, job: str) -> int:
    return sum(1 for f in read_failures(run_dir) if f.get("job") == job)


def read_failures(run_dir: Path) -> list[dict[str, Any]]:
    """The failures pretrain.sbatch recorded for this run directory (bad lines are skipped)."""
    path = Path(run_dir) / FAILURES
    if not path.is_file() or path.is_symlink():
        return []
    out = []
    for line in read_text(path, limit=1 << 22).splitlines()[-1000:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _verdict_cli(args: argparse.Namespace) -> int:
    nodes = [n for n in args.nodes.split(",") if _NODE.fullmatch(n)]
    run_dir = Path(args.run_dir)
    records = read_records(Path(args.records))
    so_far = failures_of_job(run_dir, args.job)
    verdict = decide(records, nodes, srun_exit=args.srun_exit, failures_so_far=so_far,
                     max_failures=args.max_failures,
                     node_codes=read_node_codes(Path(args.records)))
    if verdict.action in ("retry", "stop") and verdict.exit_code not in NEVER_REQUEUE:
        entry = {"time": time.time(), "job": args.job, "restart": args.restart, "nodes": nodes,
                 "failed": [n for n in failed_nodes(records, nodes)], "excluded": verdict.exclude,
                 "srun_exit": args.srun_exit, "action": verdict.action,
                 "ranks": [asdict(r) for r in sorted(records.values(), key=lambda r: r.rank)]}
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            append_text(run_dir / FAILURES, json.dumps(entry) + "\n")
        except RunDirRefused as e:
            # A failure that cannot be counted must not be retried (MAX_FAILURES would not hold).
            verdict = Verdict("stop", 2, [], f"{e}; not requeueing")
    print(verdict.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamatrain.requeue",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verdict", help="what pretrain.sbatch does after srun returned: prints "
                                       "'ACTION EXIT_CODE EXCLUDE|- MESSAGE'")
    v.add_argument("--records", required=True, help="the job's LLAMATRAIN_REQUEUE_DIR")
    v.add_argument("--run-dir", required=True)
    v.add_argument("--nodes", required=True, help="the job's nodes, comma-separated")
    v.add_argument("--srun-exit", type=int, required=True)
    v.add_argument("--job", required=True)
    v.add_argument("--restart", type=int, default=0)
    v.add_argument("--max-failures", type=int, required=True)
    args = parser.parse_args(argv)
    return _verdict_cli(args)


if __name__ == "__main__":
    sys.exit(main())
