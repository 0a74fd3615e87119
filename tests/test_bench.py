"""The benchmark harness on a CPU: `benchmarks/run.py` end to end with stand-in sub-benchmarks,
and the kernel and limit benchmarks' accounting at tiny shapes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


kernels = load_benchmark("kernel_speed")
limits = load_benchmark("limits")
run = load_benchmark("run")
plots = load_benchmark("plots")

CPU = torch.device("cpu")
TINY = kernels.Shape("tiny", dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=64,
                     tokens=16)


def cpu_timer(fn, **kw):
    return limits.median_ms(fn, CPU, rep_ms=2, **kw)


def write(path: Path, body: str) -> None:
    path.write_text(textwrap.dedent(body))


@pytest.fixture
def bench_dir(tmp_path):
    """Stand-ins for data.py (a nested dict), train.py (a loss curve); checkpoint.py is missing."""
    d = tmp_path / "benches"
    d.mkdir()
    write(d / "data.py", """
        import json, sys
        assert sys.argv[1] == "--json"
        result = {"prepare_tokens_s": 420000.5, "loader": {"seq_len": 2048}}
        json.dump(result, open(sys.argv[2], "w"))
    """)
    write(d / "train.py", """
        import json, sys
        curve = [{"step": s, "loss": 10.0 / s, "tokens_per_s": 1000.0 + s} for s in range(1, 21)]
        json.dump({"tokens_per_s": 1010.0, "mfu": None, "metrics": curve}, open(sys.argv[2], "w"))
    """)
    return d


def test_cpu_run_writes_json_markdown_plots_and_a_trace(tmp_path, bench_dir):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--out", str(out), "--bench-dir", str(bench_dir),
         "--profile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sum("no GPU" in line for line in lines) == 1
    assert sum(line.startswith("checkpoint:") for line in lines) == 1
    assert any(line.startswith("checkpoint:") and "not found, skipped" in line for line in lines)

    (json_path,) = out.glob("cpu-*.json")
    results = json.loads(json_path.read_text())
    assert results["device"] == "cpu"
    assert results["command"].endswith("--profile")
    assert results["versions"]["torch"] == torch.__version__
    assert results["git_commit"]
    s = results["sections"]
    assert "kernels" not in s and "limits" not in s
    assert s["data"]["result"]["loader"]["seq_len"] == 2048
    assert s["train"]["result"]["tokens_per_s"] == 1010.0
    assert s["checkpoint"]["skipped"] == "checkpoint.py not found"
    table2 = {r["model"]: r for r in s["accounting"]["table2"]}
    assert all(abs(r["rel_error"]) < 1e-3 for r in table2.values())
    assert set(s["accounting"]["projections"]) == {"llama2_7b", "llama2_70b"}
    this_run = s["accounting"]["this_run"]
    assert this_run["energy_source"] == "tdp"
    assert this_run["gpu_hours"] == pytest.approx(results["wall_s"] / 3600)

    md = json_path.with_suffix(".md").read_text()
    assert "| prepare_tokens_s | 420,000.5 |" in md
    assert "| loader.seq_len | 2048 |" in md
    assert "| 70B | 1,720,320 | 400 | 291.42 | 291.42 |" in md
    plot_names = sorted(Path(p).name for p in results["plots"])
    assert plot_names == sorted([f"{json_path.stem}-scaling.png", f"{json_path.stem}-train.png"])
    for p in results["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({Path(p).name})" in md

    trace = json.loads(Path(results["profile_trace"]).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"rms_norm (torch)", "attention (torch)", "cross_entropy (torch)"} <= names


def test_sub_benchmarks_that_fail_or_hang_are_reported_and_skipped(tmp_path, capsys):
    write(tmp_path / "data.py", "import sys; sys.exit(3)\n")
    write(tmp_path / "train.py", "import time; time.sleep(30)\n")
    write(tmp_path / "checkpoint.py", "print('no json written')\n")
    env = dict(os.environ)
    failed = run.run_sub_benchmark("data", tmp_path, timeout_s=60, env=env)
    hung = run.run_sub_benchmark("train", tmp_path, timeout_s=1, env=env)
    silent = run.run_sub_benchmark("checkpoint", tmp_path, timeout_s=60, env=env)
    assert failed["error"] == "exit status 3"
    assert hung["error"] == "timed out after 1 s"
    assert silent["error"].startswith("no readable JSON")
    out = capsys.readouterr().out
    assert "data: failed with exit status 3" in out
    assert "train: timed out after 1 s" in out


def test_kernel_work_counts_the_bytes_and_flops_of_an_ideal_kernel():
    e = 2  # bf16
    t, d, h = TINY.tokens, TINY.dim, TINY.ffn_hidden
    assert kernels.rms_norm_case(TINY).work == {
        "fwd": (2 * t * d + d) * e, "bwd": (3 * t * d + 2 * d) * e,
        "fwd_bwd": (5 * t * d + 3 * d) * e,
    }
    assert kernels.swiglu_case(TINY).work == {"fwd": 3 * t * h * e, "bwd": 5 * t * h * e,
                                              "fwd_bwd": 8 * t * h * e}
    # Causal attention: QK^T and PV over half the (t, t) square, 8 heads of dim 8.
    assert kernels.attention_case(TINY).work["fwd"] == 2 * t * t * 8 * 4
    assert kernels.attention_case(TINY).work["bwd"] == 2.5 * 2 * t * t * 8 * 4
    assert kernels.cross_entropy_case(TINY).work["fwd_bwd"] == 3 * t * 64 * e
    # Fused residual: x and r in, y and h out; back: dy, dh and h in, dx out (+ the weight).
    assert kernels.add_rms_norm_case(TINY).work == {
        "fwd": (4 * t * d + d) * e, "bwd": (4 * t * d + 2 * d) * e,
        "fwd_bwd": (8 * t * d + 3 * d) * e,
    }
    # Linear cross-entropy: the logits' matmul, then two for the gradients (vocab 64).
    assert kernels.linear_cross_entropy_case(TINY).work == {
        "fwd": 2 * t * d * 64, "bwd": 4 * t * d * 64, "fwd_bwd": 6 * t * d * 64,
    }
    det = kernels.attention_case(TINY, deterministic=True)
    assert det.op == "attention_det" and det.work == kernels.attention_case(TINY).work


def test_kernel_bench_times_every_op_on_cpu_and_reports_rates_and_fractions(tmp_path):
    lim = {"copy_gbs": 10.0, "matmul_tflops": 0.5}
    rows = kernels.run([TINY], CPU, timer=cpu_timer, limits=lim, providers=["torch"],
                       dtype=torch.float32, log=lambda line: None)
    assert [r["op"] for r in rows] == ["rms_norm", "add_rms_norm", "swiglu", "rotary",
                                       "attention", "attention_det", "cross_entropy",
                                       "linear_cross_entropy"]
    work = {c.op: c.work for c in kernels.cases([TINY])}
    for r in rows:
        assert "error" not in r, r
        for mode in kernels.MODES:
            assert r[f"{mode}_ms"] > 0
            scale = 1e9 if r["unit"] == "GB/s" else 1e12
            assert r[f"{mode}_rate"] == pytest.approx(work[r["op"]][mode] / r[f"{mode}_ms"] * 1e3
                                                      / scale)
        limit = lim["copy_gbs"] if r["unit"] == "GB/s" else lim["matmul_tflops"]
        assert r["fwd_bwd_frac"] == pytest.approx(r["fwd_bwd_rate"] / limit)

    failed = {"op": "swiglu", "shape": "tiny", "provider": "liger", "unit": "GB/s",
              "error": "ImportError: no liger"}
    written = plots.kernel_plots([*rows, failed], lim, tmp_path, "bench")
    assert [p.name for p in written] == ["bench-kernels-time.png", "bench-kernels-rate.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_a_failing_provider_leaves_an_error_and_the_others_run():
    case = kernels.swiglu_case(TINY)

    def broken(inputs):
        raise ImportError("No module named 'liger_kernel'")

    case.providers["liger"] = broken
    bad = kernels.measure(case, "liger", CPU, torch.float32, cpu_timer)
    good = kernels.measure(case, "torch", CPU, torch.float32, cpu_timer)
    assert bad["error"] == "ImportError: No module named 'liger_kernel'"
    assert good["fwd_bwd_ms"] > 0 and "error" not in good


def test_spent_budget_skips_the_remaining_providers():
    rows = kernels.run([TINY], CPU, timer=cpu_timer, providers=["torch"], dtype=torch.float32,
                       budget_s=0.0, log=lambda line: None)
    assert len(rows) == 8
    assert all(r["error"] == "skipped: budget of 0 s spent" for r in rows)


def test_optional_providers_only_where_importable():
    assert kernels.available_providers(CPU) == ["llamatrain", "torch", "compile"]


def test_cpu_limits_are_positive_and_finite():
    measured = limits.measure(CPU, quick=True)
    assert 0 < measured["copy_gbs"] < 10_000
    assert 0 < measured["matmul_tflops"] < 1_000


def test_train_curve_is_found_in_the_json_or_its_metrics_jsonl(tmp_path):
    curve = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    assert plots.find_curve({"summary": {"mfu": 0.4}, "steps": curve}) == curve
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in curve))
    assert plots.find_curve({"metrics_jsonl": str(jsonl)}) == curve
    assert plots.find_curve({"tokens_per_s": 5.0, "sizes": [1, 2]}) == []
