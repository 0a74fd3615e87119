"""`make gpu-check` rehearsed on the CPU, as every CI run does: the same program as on a GPU, tiny
shapes, the interpreter, fp32. One rehearsal (with a section that fails and one that overruns its
budget injected) writes the files that the tests here read; the Makefile's choice of python is
checked with stand-ins for python3; the pieces of the sections are checked on data of their own."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
SECTIONS = ["preflight", "injected_failure", "injected_overrun", "limits", "correctness",
            "kernels", "loss_memory", "train_triton", "train_torch"]
OPS = ["rms_norm", "add_rms_norm", "swiglu", "rotary", "attention", "attention_det",
       "cross_entropy", "linear_cross_entropy"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict:
    """`make gpu-check OUT=...` without CUDA, with the injected sections: its output and files."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, LLAMATRAIN_GPU_CHECK_INJECT="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the check sets what its sections need
    done = subprocess.run(["make", "--no-print-directory", "gpu-check", f"OUT={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    (json_path,) = out.glob("cpu-*.json")
    return {"out": out, "stdout": done.stdout, "results": json.loads(json_path.read_text()),
            "md": json_path.with_suffix(".md").read_text(), "stem": json_path.stem}


def test_the_rehearsal_writes_at_most_six_small_files_named_after_the_device_and_date(rehearsal):
    files = sorted(p.name for p in rehearsal["out"].iterdir())
    stem = rehearsal["stem"]
    assert files == sorted(f"{stem}{s}" for s in (".json", ".md", "-kernels-time.png",
                                                  "-kernels-rate.png", "-train.png"))
    for p in rehearsal["out"].iterdir():
        assert p.is_file() and 0 < p.stat().st_size < 16 * MiB
    assert stem.startswith("cpu-") and rehearsal["results"]["date"] in stem
    for png in rehearsal["out"].glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in rehearsal["md"]


def test_the_preflight_line_comes_first_and_names_versions_and_skips(rehearsal):
    lines = rehearsal["stdout"].splitlines()
    first_section_line = next(i for i, line in enumerate(lines) if line.startswith("[injected"))
    pre = [i for i, line in enumerate(lines) if line.startswith("preflight: ")]
    assert len(pre) == 1 and pre[0] < first_section_line
    line = lines[pre[0]]
    for word in ("no GPU (rehearsal)", "python ", "torch ", "triton ", "numpy ", "Python.h",
                 "imports: ", "missing: ", "skipping: "):
        assert word in line, word
    result = rehearsal["results"]["sections"]["preflight"]["result"]
    assert result["line"] == line and result["compiler"]["python_h"] in (True, False)
    assert set(result["optional"]) >= {"zstandard", "liger_kernel", "flash_attn", "lm_eval",
                                       "wandb", "torchao", "datatrove"}


def test_a_failing_and_an_overrunning_section_are_recorded_and_the_next_ones_run(rehearsal):
    results = rehearsal["results"]
    assert results["order"] == SECTIONS and list(results["sections"]) == SECTIONS
    failed = results["sections"]["injected_failure"]
    assert failed["status"] == "failed"
    assert failed["reason"] == ("RuntimeError: injected failure: the sections after this one "
                                "still run")
    overrun = results["sections"]["injected_overrun"]
    assert overrun["status"] == "overrun" and overrun["budget_s"] == 4
    assert 4 <= overrun["wall_s"] < 4 + 3 + 5  # killed at the budget (SIGTERM, then SIGKILL)
    assert overrun["reason"].startswith("killed at its budget of 4 s")
    assert overrun["partial"] == [{"done": "the part before the overrun"}]
    for name in SECTIONS[3:]:
        section = results["sections"][name]
        assert section["status"] == "ok", (name, section.get("reason"), section["output_tail"])
        assert section["wall_s"] <= section["budget_s"]
    assert results["mode"] == "rehearsal" and results["wall_s"] < 180
    assert "| injected_overrun | overrun | 4 |" in rehearsal["md"]


def test_limits_and_kernel_rows_are_finite_measurements(rehearsal):
    s = rehearsal["results"]["sections"]
    limits = s["limits"]["result"]
    assert 0 < limits["copy_gbs"] < 1e4 and 0 < limits["matmul_tflops"] < 1e3
    rows = s["kernels"]["result"]["rows"]
    measured = {(r["op"], r["provider"]) for r in rows if "error" not in r}
    assert {(op, "llamatrain") for op in OPS} <= measured  # every kernel, through the interpreter
    assert {(op, "torch") for op in OPS} <= measured
    assert ("attention", "sdpa_flash") in measured
    for r in rows:
        if "error" in r:
            continue
        for mode in ("fwd", "bwd", "fwd_bwd"):
            assert math.isfinite(r[f"{mode}_ms"]) and r[f"{mode}_ms"] >= 0
        assert r["fwd_bwd_frac"] == pytest.approx(
            r["fwd_bwd_rate"] / (limits["copy_gbs"] if r["unit"] == "GB/s"
                                 else limits["matmul_tflops"]))
    assert "## Kernels" in rehearsal["md"] and "| attention | tiny | sdpa_flash |" in \
        rehearsal["md"]


def test_correctness_runs_the_kernel_tests_and_reports_their_worst_errors(rehearsal):
    c = rehearsal["results"]["sections"]["correctness"]["result"]
    assert c["tests"] == c["passed"] == 7 and c["failed"] == 0
    files = {g["file"] for g in c["summary"]}
    assert files == {"test_kernel_attention.py", "test_kernel_cross_entropy.py",
                     "test_kernel_linear_cross_entropy.py", "test_kernel_rmsnorm.py",
                     "test_kernel_rotary.py", "test_kernel_swiglu.py"}
    for g in c["summary"]:
        assert g["dtype"] == "fp32" and 0 <= g["worst_ratio"] < 1


def test_both_training_runs_train_alike_and_write_no_checkpoint(rehearsal):
    s = rehearsal["results"]["sections"]
    triton, torch_ = s["train_triton"]["result"], s["train_torch"]["result"]
    assert triton["kernel_choice"]["how"] == torch_["kernel_choice"]["how"] == "forced"
    assert set(triton["kernel_choice"]["ops"].values()) == {"triton"}
    assert set(torch_["kernel_choice"]["ops"].values()) == {"torch"}
    assert triton["layout"] == torch_["layout"] and "llamatrain.plan" in triton["layout"]["note"]
    for run in (triton, torch_):
        assert run["steps"] == 3 and run["checkpoints"] == []  # checkpoint.interval = 0
        assert run["tokens_per_s"] > 0 and run["peak_memory_gb"] > 0
        assert all(math.isfinite(x) for x in run["losses"])
    for a, b in zip(triton["losses"], torch_["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert triton["losses"][-1] < triton["losses"][0]
    assert "Loss (fp32-accumulated) per step" in rehearsal["md"]


def test_the_fused_loss_needs_less_memory_for_the_same_value(rehearsal):
    rows = {r["variant"]: r for r in
            rehearsal["results"]["sections"]["loss_memory"]["result"]["rows"]}
    assert set(rows) == {"unfused-torch", "unfused-kernel", "fused"}
    assert not any("error" in r for r in rows.values())
    assert rows["fused"]["loss"] == pytest.approx(rows["unfused-torch"]["loss"], rel=1e-5)
    assert rows["fused"]["peak_added_bytes"] < rows["unfused-torch"]["peak_added_bytes"]


# ---------------------------------------------------------------------------------------------
# The Makefile's python


def _make_n(tmp_path: Path, probe_exit: int) -> str:
    """`make -n gpu-check` with a stand-in python3 first on PATH whose torch does (exit 0) or
    does not (exit 1) see CUDA, and no nvidia-smi anywhere on PATH."""
    fake = tmp_path / f"bin{probe_exit}"
    fake.mkdir()
    (fake / "python3").write_text(f"#!/bin/sh\nexit {probe_exit}\n")
    (fake / "python3").chmod(0o755)
    path = f"{fake}:/usr/bin:/bin"
    assert shutil.which("nvidia-smi", path=path) is None
    done = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check", "OUT=/tmp/x"],
                          cwd=ROOT, env=dict(os.environ, PATH=path), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_gpu_check_takes_the_systems_python_when_its_torch_sees_cuda(tmp_path):
    # The .venv of this checkout (CPU torch) is there, as if carried along: it must not win.
    assert _make_n(tmp_path, 0).strip() == \
        "PYTHONPATH=src python3 benchmarks/gpu_check.py --out /tmp/x"


def test_make_gpu_check_rehearses_with_the_venv_elsewhere_and_needs_no_network(tmp_path):
    venv = ".venv/bin/python" if (ROOT / ".venv/bin/python").exists() else "python3"
    commands = _make_n(tmp_path, 1)
    assert commands.strip() == f"PYTHONPATH=src {venv} benchmarks/gpu_check.py --out /tmp/x"
    for word in ("pip", "venv ", "curl", "wget", "download", "apt"):
        assert word not in commands


# ---------------------------------------------------------------------------------------------
# Pieces


def test_the_most_layers_that_fit_are_found_by_bisection():
    train = load_benchmark("train")
    asked = []

    def fits(n):
        asked.append(n)
        return n <= 20

    assert train.most_layers_that_fit(31, fits) == 20 and len(asked) <= 5
    assert train.most_layers_that_fit(31, lambda n: False) == 0
    assert train.most_layers_that_fit(31, lambda n: True) == 31


def test_junit_and_recorded_errors_become_the_correctness_table(tmp_path):
    correctness = load_benchmark("correctness")
    (tmp_path / "junit.xml").write_text(textwrap.dedent("""\
        <testsuites><testsuite>
        <testcase classname="tests.test_kernel_rmsnorm" name="test_a[(4, 256)-bfloat16]"
                  time="1.5"/>
        <testcase classname="tests.test_kernel_rmsnorm" name="test_a[(4, 256)-float32]" time="0.5">
          <failure message="AssertionError: grad of input 0: relative error 3.0e-04 > 1e-04">x
          </failure></testcase>
        <testcase classname="tests.test_kernel_attention" name="test_b" time="0.1">
          <skipped message="no GPU"/></testcase>
        </testsuite></testsuites>"""))
    (tmp_path / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"test": "tests/test_kernel_rmsnorm.py::test_a[(4, 256)-bfloat16]", "what": "output 0",
         "error": 1e-3, "tolerance": 2e-2},
        {"test": "tests/test_kernel_rmsnorm.py::test_a[(4, 256)-bfloat16]", "what": "grad 0",
         "error": 4e-3, "tolerance": 2e-2},
        {"test": "tests/test_kernel_rmsnorm.py::test_a[(4, 256)-float32]", "what": "grad 0",
         "error": 3e-4, "tolerance": 1e-4}]))
    rows = correctness.read_junit(tmp_path / "junit.xml")
    assert [(r["dtype"], r["outcome"]) for r in rows] == [
        ("bf16", "passed"), ("fp32", "failed"), ("-", "skipped")]
    assert rows[1]["message"] == "AssertionError: grad of input 0: relative error 3.0e-04 > 1e-04"
    worst = correctness.read_errors(tmp_path / "errors.jsonl")
    for r in rows:
        w = worst.get(r["test"])
        r["worst_ratio"], r["worst_error"] = (w["ratio"], w["error"]) if w else (None, None)
    summary = {(g["file"], g["dtype"]): g for g in correctness.summarise(rows)}
    assert summary[("test_kernel_rmsnorm.py", "bf16")]["worst_ratio"] == pytest.approx(0.2)
    assert summary[("test_kernel_rmsnorm.py", "fp32")]["failed"] == 1
    assert summary[("test_kernel_rmsnorm.py", "fp32")]["worst_ratio"] == pytest.approx(3.0)
    assert summary[("test_kernel_attention.py", "-")]["skipped"] == 1


def test_a_loss_variant_that_fails_reports_what_its_process_said():
    loss_memory = load_benchmark("loss_memory")
    (row,) = loss_memory.compare(["unfused-torch"], tokens=-1, vocab=8, dim=4, timeout_s=120)
    assert "negative dimension" in row["error"]
