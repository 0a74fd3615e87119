"""`make gpu-check`'s correctness: every kernel test (tests/test_kernel_*.py) on the GPU in bf16
and fp32, both attention backwards, the fused residual and the fused loss included, as one pytest
run whose JUnit report gives pass or fail and whose recorded comparisons (kernel_helpers'
LLAMATRAIN_TEST_ERRORS) give the worst error of each test against its tolerance.

In the rehearsal, one test of each kernel file on the CPU (the interpreter, fp32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALL = ["tests/test_kernel_attention.py", "tests/test_kernel_cross_entropy.py",
       "tests/test_kernel_linear_cross_entropy.py", "tests/test_kernel_model.py",
       "tests/test_kernel_rmsnorm.py", "tests/test_kernel_rotary.py", "tests/test_kernel_swiglu.py"]
REHEARSAL = [
    "tests/test_kernel_attention.py::test_attention_matches_reference"
    "[mha-d16-seq64-causal-atomic-float32]",
    "tests/test_kernel_attention.py::test_attention_matches_reference"
    "[mha-d16-seq64-causal-deterministic-float32]",
    "tests/test_kernel_rmsnorm.py::test_rms_norm_with_residual_returns_norm_of_sum_and_sum"
    "[(2, 37, 123)-float32]",
    "tests/test_kernel_swiglu.py::test_swiglu_matches_reference[(4, 2100)-float32]",
    "tests/test_kernel_rotary.py::test_rotary_matches_reference[2-16-4-4-64-9-float32]",
    "tests/test_kernel_cross_entropy.py::test_cross_entropy_matches_reference[(74,)-123-0-float32]",
    "tests/test_kernel_linear_cross_entropy.py::test_linear_cross_entropy_matches_reference"
    "[ragged-float32]",
]
DTYPE_WORDS = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
               "float32": "fp32"}
# Seconds kept from the section's budget to read the reports after pytest stops.
MARGIN_S = 6


def dtype_of(test: str) -> str:
    """The dtype a test id names in its parameters (bf16, fp16, fp32), else "-"."""
    params = test.partition("[")[2]
    for word, short in DTYPE_WORDS.items():
        if re.search(rf"(^|[-\[]){word}($|[-\]])", params):
            return short
    return "-"


def read_junit(path: Path) -> list[dict[str, Any]]:
    """One row per test case: id, file, outcome (passed, failed, error, skipped), seconds and
    the first line of the failure."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test = f"{module}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        rows.append({"test": test, "file": Path(module).name + ".py", "dtype": dtype_of(test),
                     "outcome": outcome, "seconds": float(case.get("time") or 0),
                     "message": message})
    return rows


def read_errors(path: Path) -> dict[str, dict[str, Any]]:
    """test id -> its worst comparison (the largest error / tolerance)."""
    worst: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return worst
    for line in path.read_text().splitlines():
        r = json.loads(line)
        r["ratio"] = r["error"] / r["tolerance"] if r["tolerance"] else float("inf")
        if r["test"] not in worst or r["ratio"] > worst[r["test"]]["ratio"]:
            worst[r["test"]] = r
    return worst


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel file and dtype: tests passed and failed, and the worst error / tolerance."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault((r["file"], r["dtype"]), {
            "file": r["file"], "dtype": r["dtype"], "passed": 0, "failed": 0, "skipped": 0,
            "worst_ratio": None, "worst_test": None, "worst_error": None})
        g["skipped" if r["outcome"] == "skipped" else
          "passed" if r["outcome"] == "passed" else "failed"] += 1
        ratio = r.get("worst_ratio")
        if ratio is not None and (g["worst_ratio"] is None or ratio > g["worst_ratio"]):
            g.update(worst_ratio=ratio, worst_test=r["test"], worst_error=r["worst_error"])
    return sorted(groups.values(), key=lambda g: (g["file"], g["dtype"]))


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def command(rehearsal: bool, junit: Path, budget_s: float) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
           "addopts=", f"--junitxml={junit}"]
    if not rehearsal and _importable("xdist"):
        # Triton compiles on the CPU: spread the compilations (the tests share the GPU).
        cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if _importable("pytest_timeout"):
        cmd += [f"--timeout={max(10, int(budget_s / 2))}"]
    return cmd + (REHEARSAL if rehearsal else ALL)


def section(ctx: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="correctness-") as tmp:
        junit, errors = Path(tmp) / "junit.xml", Path(tmp) / "errors.jsonl"
        env = dict(os.environ, LLAMATRAIN_TEST_ERRORS=str(errors),
                   LLAMATRAIN_TEST_DEVICE="cpu" if ctx.rehearsal else "cuda")
        cmd = command(ctx.rehearsal, junit, ctx.budget_s)
        stopped = False
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=ctx.budget_s - MARGIN_S,
                                  capture_output=True, text=True)
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            stopped, returncode = True, None
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        worst = read_errors(errors)
        rows = read_junit(junit) if junit.is_file() else [
            {"test": t, "file": t.split("::")[0].rsplit("/", 1)[-1], "dtype": dtype_of(t),
             "outcome": "unknown", "seconds": None, "message": ""} for t in worst]
    for r in rows:
        w = worst.get(r["test"])
        r["worst_ratio"] = w["ratio"] if w else None
        r["worst_error"] = w["error"] if w else None
        r["worst_what"] = w["what"] if w else None
    if returncode not in (0, 1) and not rows:  # pytest could not even collect
        raise RuntimeError(f"pytest exit {returncode}: {output.strip().splitlines()[-1:]}")
    passed = sum(r["outcome"] == "passed" for r in rows)
    return {"command": cmd[1:], "returncode": returncode, "stopped_at_budget": stopped,
            "tests": len(rows), "passed": passed,
            "failed": sum(r["outcome"] in ("failed", "error") for r in rows),
            "summary": summarise(rows), "rows": rows,
            "failures": [r for r in rows if r["outcome"] in ("failed", "error")],
            "last_line": output.strip().splitlines()[-1] if output.strip() else ""}
