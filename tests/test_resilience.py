"""Failures at scale: the hang watchdog, straggler statistics, the Young-Daly checkpoint interval,
goodput across attempts and the requeue verdict of launch/pretrain.sbatch.

One scenario on 2 gloo ranks carries the end-to-end checks: rank 1 is slowed inside every step and
stops for good after step 6; the watchdog ends both ranks (exit 75, stacks on disk, rank 1 named);
the run is then requeued by hand and finishes, with the lost steps in its goodput and rank 1 named
as a straggler in its report.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import REPO, losses, tiny_args

from llamatrain import requeue
from llamatrain.checkpoint.interval import SaveSchedule, interval_steps, young_daly_s
from llamatrain.config import CheckpointConfig
from llamatrain.goodput import Goodput, Ledger, previous_end
from llamatrain.requeue import ExitRecord, decide
from llamatrain.stragglers import straggler_stats
from llamatrain.watchdog import auto_timeout_s, describe, first_stopped

SLOW_S = 0.4
HANG_TIMEOUT_S = 4
STEPS = 8


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """2 ranks under launch/torchrun_exit.py: the job's exit code is the workers' own."""
    import os

    cmd = [sys.executable, str(REPO / "launch/torchrun_exit.py"), "--standalone",
           "--nproc-per-node=2", "-m", "llamatrain.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.fixture(scope="module")
def hung_then_resumed(prepared_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resilience") / "run"
    records = run_dir.parent / "exit-records"
    args = tiny_args(prepared_data, run_dir, **{
        "train.steps": STEPS, "checkpoint.interval": 4, "metrics.log_interval": 2,
        "train.hang_timeout_s": HANG_TIMEOUT_S, "train.collective_timeout_s": 300})
    slow = {"LLAMATRAIN_FAULT_SLOW": f"1:{SLOW_S}"}
    hung = _torchrun(args, {**slow, "LLAMATRAIN_FAULT_HANG": "6:1",
                            "LLAMATRAIN_REQUEUE_DIR": str(records)})
    hang = {p.name: p.read_text() for p in (run_dir / "hang").iterdir() if p.is_file()}
    metrics_after_hang = (run_dir / "metrics.jsonl").read_text()
    marker = json.loads((run_dir / "requeue").read_text())
    resumed = _torchrun(args, slow)
    return {"run_dir": run_dir, "hung": hung, "resumed": resumed, "hang": hang, "marker": marker,
            "records": requeue.read_records(records), "metrics_after_hang": metrics_after_hang}


def test_a_rank_that_stops_stepping_ends_the_job_with_75_and_stacks_on_disk(hung_then_resumed):
    hung, hang = hung_then_resumed["hung"], hung_then_resumed["hang"]
    out = hung.stdout + hung.stderr
    assert hung.returncode == requeue.REQUEUE_EXIT_CODE, out[-3000:]
    # The process group itself holds train.collective_timeout_s.
    assert "collective timeout 300 s" in hung.stdout
    # Every thread's stack of both ranks: rank 1 asleep in the injected hang, rank 0 waiting for
    # it in the step boundary's all_reduce.
    assert "in at_step_boundary" in hang["stacks-rank-1.txt"]
    assert "in _agree_to_stop" in hang["stacks-rank-0.txt"]
    assert "in all_reduce" in hang["stacks-rank-0.txt"]
    for rank in (0, 1):
        record = json.loads(hang[f"rank-{rank}.json"])
        # Detected within the timeout and the watchdog's poll (a twentieth of it) plus slack.
        assert HANG_TIMEOUT_S <= record["idle_s"] <= HANG_TIMEOUT_S * 1.5, record
        assert record["step"] == 6
    summary = json.loads(hang["summary.json"])
    assert (summary["rank"], summary["step"], summary["phase"]) == (1, 6, "step")
    assert summary["others_reached"] == "step 6 boundary" and summary["missing"] == []
    assert f"hang: rank 1 ({requeue.node_name()}) stopped first at step 6 after step" \
        in hung.stdout
    assert summary["host"] == requeue.node_name()
    marker = hung_then_resumed["marker"]
    assert marker["step"] == 6 and marker["reason"].startswith("hang: rank 1")
    assert {r.rank: (r.code, r.reason) for r in hung_then_resumed["records"].values()} == {
        0: (75, "hang"), 1: (75, "hang")}
    # The next attempt keeps this hang's files aside and starts a clean hang/.
    [aside] = hung_then_resumed["run_dir"].glob("hang.*")
    assert (aside / "stacks-rank-1.txt").read_text() == hang["stacks-rank-1.txt"]


def test_the_slowed_rank_is_named_with_the_median_and_the_slowest_in_metrics(hung_then_resumed):
    records = [json.loads(line) for line in hung_then_resumed["metrics_after_hang"].splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train[1:]:  # the first interval holds the first step's warm-up
        assert r["slowest_rank"] == 1 and r["stragglers"] == [1], r
        # Two ranks: the median is their mean, so rank 0 = 2 x median - max; the difference is
        # the injected sleep, rank 0's wait for it at the first collective taken out.
        gap = 2 * (r["step_time_max_s"] - r["step_time_median_s"])
        assert 0.6 * SLOW_S < gap < 2 * SLOW_S, r
        assert r["data_wait_max_s"] < SLOW_S / 3
    report = json.loads((hung_then_resumed["run_dir"] / "report.json").read_text())
    named = report["stragglers"]["ranks"]
    assert [r["rank"] for r in named] == [1] and named[0]["gpu"] is None
    assert named[0]["host"] == requeue.node_name() and named[0]["worst_ratio"] > 1.2
    assert "straggler(s) slower than 1.2 x the median" in hung_then_resumed["resumed"].stdout


def test_goodput_across_the_requeue_counts_the_lost_steps_and_the_whole_wall_time(
        hung_then_resumed):
    resumed = hung_then_resumed["resumed"]
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    run_dir = hung_then_resumed["run_dir"]
    assert sorted(losses(run_dir)) == list(range(2, STEPS + 1, 2))
    report = json.loads((run_dir / "report.json").read_text())
    g = report["goodput"]
    # Steps 5 and 6 ran after the checkpoint of step 4 and were recomputed.
    assert g["attempts"] == 2 and g["lost_steps"] == 2
    assert "2 step(s) after step 4 were lost" in resumed.stdout
    # The hung attempt ran past its checkpoint for two slow steps and the hang timeout.
    assert g["lost_s"] > 2 * SLOW_S
    parts = g["productive_s"] + g["startup_s"] + g["checkpoint_s"] + g["lost_s"] + g["other_s"]
    assert math.isclose(parts, g["wall_s"], rel_tol=1e-6)
    assert g["goodput"] == pytest.approx(g["productive_s"] / g["wall_s"])
    assert 0 < g["goodput"] < 1 and g["restore_s"] > 0 and g["between_attempts_s"] > 0
    # Carbon charges every attempt's devices for its whole wall time, lost work included.
    assert report["device_hours"] == pytest.approx(2 * g["wall_s"] / 3600, rel=1e-6)
    assert report["gpu_hours"] == pytest.approx(report["device_hours"], rel=1e-6)
    assert report["wall_s"] == g["wall_s"] > report["step_time_total_s"]
    md = (run_dir / "report.md").read_text()
    assert "**goodput** (productive / wall), 2 attempt(s)" in md
    assert "lost: 2 step(s) recomputed" in md


def test_save_cost_is_measured_and_the_young_daly_interval_is_absent_without_mtbf(
        hung_then_resumed):
    report = json.loads((hung_then_resumed["run_dir"] / "report.json").read_text())
    c = report["checkpoint"]
    assert c["interval"] == 4 and c["saves_timed"] >= 1
    assert 0 < c["blocked_s"] < 30 and c["total_s"] >= 0.5 * c["blocked_s"]
    assert c["mtbf_hours"] is None and c["young_daly_s"] is None


# ---------------------------------------------------------------------------------------------
# The arithmetic and the decisions, without processes


def test_young_daly_interval_is_sqrt_of_two_cost_mtbf_in_whole_steps():
    assert young_daly_s(2.0, 4 * 3600) == pytest.approx(240.0)  # sqrt(2 x 2 x 14400)
    assert interval_steps(blocked_s=2.0, total_s=2.0, mtbf_hours=4, step_s=0.5) == 480
    assert interval_steps(blocked_s=2.0, total_s=2.0, mtbf_hours=4, step_s=7.0) == 34  # 34.3
    # An asynchronous save blocks 10 ms but needs 30 s to reach the disk: no closer than that.
    assert young_daly_s(0.01, 3600) == pytest.approx(math.sqrt(72))
    assert interval_steps(blocked_s=0.01, total_s=30.0, mtbf_hours=1, step_s=1.0) == 30
    assert interval_steps(blocked_s=1e-6, total_s=0.0, mtbf_hours=0.001, step_s=60.0) == 1


def test_auto_interval_saves_first_to_measure_then_every_young_daly_interval():
    schedule = SaveSchedule(CheckpointConfig(interval="auto", mtbf_hours=4.0))
    due = [s for s in range(1, 9) if schedule.due(s, last_saved=-1, steps_this_run=s, final=False)]
    assert due == [5, 6, 7, 8]
    schedule.measured(blocked_s=2.0, total_s=2.0, step_s=0.5)
    assert schedule.every == 480
    assert not schedule.due(484, last_saved=5, steps_this_run=484, final=False)
    assert schedule.due(485, last_saved=5, steps_this_run=485, final=False)
    again = SaveSchedule(CheckpointConfig(interval="auto", mtbf_hours=4.0))
    again.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert again.every == 480 and again.due(965, last_saved=485, steps_this_run=1, final=False)
    report = again.report()
    assert (report["young_daly_s"], report["young_daly_steps"]) == (pytest.approx(240.0), 480)
    fixed = SaveSchedule(CheckpointConfig(interval=4))
    due = [s for s in range(1, 13) if fixed.due(s, last_saved=0, steps_this_run=s, final=False)]
    assert due == [4, 8, 12]
    # A run that turns "auto" on at a resume measures again: a fixed interval is no Young-Daly.
    fixed.measured(blocked_s=1.0, total_s=1.0, step_s=1.0)
    turned = SaveSchedule(CheckpointConfig(interval="auto", mtbf_hours=4.0))
    turned.load_state_dict(fixed.state_dict())
    assert turned.every is None and turned.blocked == [1.0]
    # The last step saves, except with interval = 0: never (benchmarks).
    assert fixed.due(13, last_saved=12, steps_this_run=13, final=True)
    never = SaveSchedule(CheckpointConfig(interval=0))
    assert not any(never.due(s, last_saved=-1, steps_this_run=s, final=s == 12)
                   for s in range(1, 13))
    assert never.report()["interval_steps"] == 0


ONE_LINE = 'expected an integer >= 0 or "auto"'


@pytest.mark.parametrize(("override", "message"), [
    ("--checkpoint.interval=aut", "checkpoint.interval = 'aut': " + ONE_LINE),
    ("--checkpoint.interval=2.5", "checkpoint.interval = 2.5: " + ONE_LINE),
    ("--checkpoint.interval=true", "checkpoint.interval = True: " + ONE_LINE),
    ("--checkpoint.interval=-1", "checkpoint.interval = -1: " + ONE_LINE),
    ('--checkpoint.interval="7"', "checkpoint.interval = '7': " + ONE_LINE),
    ("--checkpoint.interval=auto", "checkpoint.interval = \"auto\": needs checkpoint.mtbf_hours"),
    ("--train.hang_timeout_s=600", "train.hang_timeout_s = 600.0: must be shorter than "
                                   "train.collective_timeout_s = 600.0"),
    ("--train.collective_timeout_s=0", "train.collective_timeout_s = 0.0: expected a number > 0"),
    ("--metrics.straggler_factor=1", "metrics.straggler_factor = 1.0: expected a number > 1"),
    ("--checkpoint.mtbf_hours=-1", "checkpoint.mtbf_hours = -1.0: expected a number >= 0"),
])
def test_resilience_settings_refuse_bad_values_in_one_line(override, message):
    from llamatrain.config import load_config

    with pytest.raises(ValueError) as err:
        load_config("configs/tiny.toml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_interval_auto_parses_from_file_and_cli_and_round_trips(tmp_path):
    from llamatrain.config import load_config, to_toml

    path = tmp_path / "c.toml"
    path.write_text('[checkpoint]\ninterval = "auto"\nmtbf_hours = 12\n')
    cfg = load_config(path)
    assert (cfg.checkpoint.interval, cfg.checkpoint.mtbf_hours) == ("auto", 12.0)
    assert load_config(None, ["--checkpoint.interval=auto", "--checkpoint.mtbf_hours=1"]) \
        .checkpoint.interval == "auto"
    assert load_config(None, ["--checkpoint.interval=250"]).checkpoint.interval == 250
    assert load_config(None, ["--checkpoint.interval=0"]).checkpoint.interval == 0  # never
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "again.toml") == cfg


def test_the_flight_recorder_dump_lands_in_the_hang_directory(tmp_path):
    from llamatrain.watchdog import Watchdog

    dog = Watchdog(tmp_path, rank=3, world_size=4, gpu=None, timeout_s=1.0,
                   on_fire=lambda step, line: None, flight_recorder=True)
    dog.dir.mkdir()
    path = dog._dump_flight_recorder()
    assert path == str(tmp_path / "hang" / "nccl_trace" / "rank_3")
    assert (tmp_path / "hang" / "nccl_trace" / "rank_3").stat().st_size > 0


def test_auto_hang_timeout_is_ten_median_steps_at_least_300_s():
    assert auto_timeout_s([1.0] * 4) == 1800.0  # fewer than 5 steps timed
    assert auto_timeout_s([1.0] * 5) == 300.0
    assert auto_timeout_s([40.0, 50.0, 45.0, 48.0, 1000.0]) == 480.0


def _record(rank, mark, t, step=3, phase="step"):
    return {"rank": rank, "host": f"n{rank // 2 + 1}", "gpu": rank % 2, "step": step,
            "mark": mark, "phase": phase, "progress_time": t}


def test_first_stopped_is_the_rank_that_never_reached_where_the_others_wait():
    records = [_record(0, 41, 100.5, 4, "boundary"), _record(1, 41, 100.6, 4, "boundary"),
               _record(2, 40, 100.0), _record(3, 41, 100.4, 4, "boundary")]
    summary = first_stopped(records, 4)
    assert (summary["rank"], summary["host"], summary["gpu"]) == (2, "n2", 0)
    assert summary["tied"] == [] and summary["others_reached"] == "step 4 boundary"
    assert describe(summary) == ("hang: rank 2 (n2, GPU 0) stopped first at step 3 after step; "
                                 "the others reached step 4 boundary")
    tied = first_stopped([_record(0, 40, 100.2), _record(1, 40, 100.0)], 3)
    assert tied["rank"] == 1 and tied["tied"] == [0] and tied["missing"] == [2]
    assert describe(tied).startswith("hang: rank(s) 2 never reported")


def test_straggler_statistics_name_ranks_beyond_the_factor_of_the_median():
    stats = straggler_stats([(1.0, 0.0), (1.05, 0.01), (1.3, 0.25), (0.98, 0.0)], 1.2)
    assert stats["step_time_median_s"] == pytest.approx(1.025)
    assert (stats["step_time_max_s"], stats["slowest_rank"]) == (1.3, 2)
    assert stats["stragglers"] == [2]  # 1.3 > 1.23; 1.05 is not
    assert stats["data_wait_max_s"] == 0.25 and stats["data_wait_median_s"] == 0.005
    assert straggler_stats([(2.0, 1.0)], 1.2)["stragglers"] == []


def test_goodput_charges_a_dead_attempt_after_its_checkpoint_as_lost():
    # Attempt 1 started at t=1000, saved step 40 at t=1100 (its ledger then), logged up to step 47
    # at t=1130 and died; the launcher recorded the failure at t=1140; attempt 2 starts at t=1200.
    carried = Ledger(attempts=1, wall_s=100.0, device_s=800.0, productive_s=80.0, startup_s=15.0)
    state = {"goodput": carried.__dict__, "time": 1100.0, "saved_world_size": 8, "step": 40}
    records = [{"step": s, "loss": 1.0, "time": 1000.0 + 3 * s} for s in range(1, 44)] + \
        [{"step": 47, "loss": 1.0, "time": 1130.0}]
    end, lost = previous_end(records, [{"time": 1140.0}], checkpoint_step=40,
                             checkpoint_time=1100.0, before=1200.0)
    assert (end, lost) == (1140.0, 7)
    g = Goodput(num_devices=4, start=1200.0)
    g.restored(state, end=end, lost_steps=lost)
    assert g.carried == Ledger(attempts=1, wall_s=140.0, device_s=800.0 + 40 * 8,
                               productive_s=80.0, startup_s=15.0, lost_s=40.0, lost_steps=7,
                               between_attempts_s=60.0)
    # Untrusted trainer.json: unknown keys, strings and infinities are dropped.
    assert Ledger.from_dict({"wall_s": "9", "lost_s": float("inf"), "x": 1, "attempts": 2}) == \
        Ledger(attempts=2)


def _exit(rank, code, node, reason, local_world_size=2):
    return ExitRecord(rank, code, node, local_world_size, reason)


NODES = ["n1", "n2"]


@pytest.mark.parametrize(("records", "srun_exit", "so_far", "expected"), [
    ([_exit(0, 75, "n1", "saved"), _exit(1, 75, "n1", "saved"), _exit(2, 75, "n2", "saved"),
      _exit(3, 75, "n2", "saved")], 0, 0, ("requeue", 0, [])),
    ([_exit(r, 0, NODES[r // 2], "done") for r in range(4)], 0, 0, ("done", 0, [])),
    # Every rank of n2 killed: n1's ranks saw their peers go.
    ([_exit(0, 75, "n1", "peer-lost"), _exit(1, 75, "n1", "peer-lost")], 137, 0,
     ("retry", 0, ["n2"])),
    # One rank of n1 crashed (an Xid, an OOM): n1 failed, n2 is fine.
    ([_exit(0, 1, "n1", "crash-RuntimeError"), _exit(1, 75, "n1", "peer-lost"),
      _exit(2, 75, "n2", "peer-lost"), _exit(3, 75, "n2", "peer-lost")], 1, 1,
     ("retry", 0, ["n1"])),
    # A crash on every node is the run's own: counted, nothing excluded.
    ([_exit(r, 1, NODES[r // 2], "crash-KeyError") for r in range(4)], 1, 0, ("retry", 0, [])),
    ([_exit(r, 75, NODES[r // 2], "hang") for r in range(4)], 0, 0, ("retry", 0, [])),
    ([_exit(0, 75, "n1", "peer-lost"), _exit(1, 75, "n1", "peer-lost")], 137, 3,
     ("stop", 137, ["n2"])),
    ([_exit(r, 2, NODES[r // 2], "configuration") for r in range(4)], 2, 0, ("stop", 2, [])),
    ([], 2, 0, ("stop", 2, [])),
    # torchrun.sh refused the configuration on one node; srun killed the other (143).
    ([], 143, 0, ("stop", 2, [])),
    ([_exit(0, 3, "n1", "bad-steps"), _exit(1, 75, "n1", "peer-lost")], 3, 0, ("stop", 3, [])),
])
def test_requeue_verdict(records, srun_exit, so_far, expected):
    node_codes = {"n1": 2} if not records and srun_exit == 143 else {}
    verdict = decide({r.rank: r for r in records}, NODES, srun_exit=srun_exit,
                     failures_so_far=so_far, max_failures=3, node_codes=node_codes)
    assert (verdict.action, verdict.exit_code, verdict.exclude) == expected, verdict.message


def test_verdict_cli_records_each_failure_and_counts_them_per_job(tmp_path, monkeypatch, capsys):
    records, run_dir = tmp_path / "records", tmp_path / "run"
    monkeypatch.setenv(requeue.ENV_DIR, str(records))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    requeue.record_exit(75, "peer-lost")
    (records / "rank-9").write_text("not json")  # an untrusted directory: skipped
    args = ["verdict", "--records", str(records), "--run-dir", str(run_dir), "--nodes", "n1,n2",
            "--srun-exit", "137", "--job", "17", "--max-failures", "1"]
    lines = []
    for _ in range(2):
        assert requeue.main(args) == 0
        lines.append(capsys.readouterr().out.strip())
    assert lines[0].startswith("retry 0 n2 node(s) n2 failed (n1: rank 0 exit 75 peer-lost; "
                               "n2: no rank left a record); failure 1 of at most 1")
    assert lines[1].startswith("stop 137 n2 ") and "failure 2 > MAX_FAILURES=1" in lines[1]
    failures = requeue.read_failures(run_dir)
    assert [(f["job"], f["failed"], f["action"]) for f in failures] == [
        ("17", ["n2"], "retry"), ("17", ["n2"], "stop")]
    assert requeue.failures_of_job(run_dir, "18") == 0


def test_a_lost_peer_is_told_from_a_crash_of_this_rank():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:36992: Connection reset by peer")
    assert requeue.peer_lost(gloo)
    assert requeue.peer_lost(dist.DistBackendError("NCCL error: remote process exited"))
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise ValueError("while saving") from e
    except ValueError as wrapped:
        assert requeue.peer_lost(wrapped)
    assert not requeue.peer_lost(RuntimeError("CUDA out of memory"))
    assert not requeue.peer_lost(KeyError("loss"))


def test_links_planted_at_hang_and_the_failure_records_are_refused_not_followed(
        tmp_path, monkeypatch, capsys):
    from llamatrain.checkpoint.rundir import RunDirRefused
    from llamatrain.watchdog import Watchdog, set_aside

    victim, run_dir = tmp_path / "victim", tmp_path / "run"
    victim.mkdir()
    run_dir.mkdir()
    (victim / "failures.jsonl").write_text("precious\n")
    # hang/: the watchdog writes nothing through it, and an attempt's start leaves it in place.
    (run_dir / "hang").symlink_to(victim)
    dog = Watchdog(run_dir, rank=0, world_size=1, gpu=None, timeout_s=1.0,
                   on_fire=lambda step, line: None, flight_recorder=False)
    with pytest.raises(RunDirRefused, match="hang' is a symbolic link"):
        dog._fire(2.0, 1.0)
    assert set_aside(run_dir) is None and (run_dir / "hang").is_symlink()
    # The ranks' exit records: a link at .requeue-<job> is refused, with one line.
    monkeypatch.setenv(requeue.ENV_DIR, str(run_dir / ".requeue-17"))
    monkeypatch.setenv("RANK", "0")
    (run_dir / ".requeue-17").symlink_to(victim)
    requeue.record_exit(75, "hang")
    assert "could not leave the exit record" in capsys.readouterr().err
    # failures.jsonl: not appended through; the failure cannot be counted, so no retry.
    (run_dir / "failures.jsonl").symlink_to(victim / "failures.jsonl")
    records = tmp_path / "records"
    records.mkdir()
    assert requeue.main(["verdict", "--records", str(records), "--run-dir", str(run_dir),
                         "--nodes", "n1,n2", "--srun-exit", "137", "--job", "17",
                         "--max-failures", "3"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("stop 2 - ") and "failures.jsonl' is a symbolic link" in line
    assert line.count("\n") == 1 and line.rstrip().endswith("not requeueing")
    assert sorted(p.name for p in victim.iterdir()) == ["failures.jsonl"]
    assert (victim / "failures.jsonl").read_text() == "precious\n"
