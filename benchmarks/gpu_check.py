"""`make gpu-check [OUT=DIR]`: the first contact with a GPU in one command of at most 8 minutes on
one H100/H200, with the machine's own python and packages (no venv, no pip, no network).

Sections, in order, each in its own process with a wall-clock budget (killed at it, the overrun
recorded with its reason, and the next section run), each written to the results as soon as it
ends, so that a run stopped from outside still leaves every finished section behind:

- preflight: GPU, driver, python, torch, triton, numpy, the C compiler, optional packages, and
  what the check will therefore skip (printed first);
- limits: this GPU's copy bandwidth and bf16 matmul rate, measured (the "% of limit" of kernels);
- correctness: every kernel test in bf16 and fp32 on the GPU, pass/fail and the worst errors;
- kernels: every op forward and backward at the 7B and 70B shapes against torch eager,
  torch.compile, SDPA (flash and cuDNN), Liger-Kernel and flash-attn where they import;
- loss_memory: the fused loss's peak memory against logits + cross-entropy;
- train_triton, train_torch: the real Llama 2 7B on this one GPU (the layout llamatrain.plan
  picks; with too little memory the most layers that fit), with our kernels and with PyTorch.

Without CUDA the same program rehearses (tiny shapes, Triton's interpreter, fp32, seconds per
section): `make test` runs it, so every line here but the device calls is exercised on CI.

Files, in --out (default benchmarks/results/): <gpu>-<date>.json and .md, and the plots
<gpu>-<date>-kernels-time.png, -kernels-rate.png and -train.png.
`LLAMATRAIN_GPU_CHECK_INJECT=1` adds a section that fails and one that overruns its budget
(for the test of the isolation), after the preflight.

Usage: python benchmarks/gpu_check.py [--out DIR] [--total-s 460]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INJECT_ENV = "LLAMATRAIN_GPU_CHECK_INJECT"
# Seconds kept back from the total for writing the files and the processes' start and end.
RESERVE_S = 8.0
# After SIGTERM at the budget, how long a section has to go before SIGKILL.
KILL_GRACE_S = 3.0


@dataclass(frozen=True)
class Section:
    """A section: `benchmarks/<module>.py`'s `function(ctx, *args)`, and its budgets (seconds)
    on a GPU and in the rehearsal."""

    name: str
    title: str
    module: str
    gpu_s: float
    rehearsal_s: float
    function: str = "section"
    args: tuple[str, ...] = ()


# On a GPU the budgets add up to about the whole check (--total-s): most sections end well
# within theirs, and the total, not the sum, is what holds the check to 8 minutes. The training
# runs go last: the 7B's start (its weights drawn on the CPU) is the least known cost.
SECTIONS = (
    Section("preflight", "Preflight", "preflight", 30, 45),
    Section("limits", "GPU limits", "limits", 20, 20),
    Section("correctness", "Correctness of every kernel", "correctness", 90, 60),
    Section("kernels", "Kernels against PyTorch and the others", "kernel_speed", 120, 60),
    Section("loss_memory", "Peak memory of the loss", "loss_memory", 30, 45),
    Section("train_triton", "Training, llamatrain kernels", "train", 90, 45, args=("triton",)),
    Section("train_torch", "Training, kernels.backend = torch", "train", 75, 45,
            args=("torch",)),
)
# The sections whose results are plotted: the plots are redrawn when one of them ends.
PLOTTED = ("kernels", "train_triton", "train_torch")
INJECTED = (
    Section("injected_failure", "Injected failure", "gpu_check", 20, 20, "injected_failure"),
    Section("injected_overrun", "Injected overrun", "gpu_check", 4, 4, "injected_overrun"),
)


@dataclass
class Context:
    """What a section's process is told: the mode, its budget, where to write, and the results
    of the sections before it."""

    name: str
    rehearsal: bool
    budget_s: float
    out: str
    stem: str
    results_path: str
    result_path: str
    progress_path: str

    def earlier(self, name: str) -> dict[str, Any] | None:
        """The result of an earlier section that ended well, else None."""
        try:
            sections = json.loads(Path(self.results_path).read_text())["sections"]
        except (OSError, ValueError, KeyError):
            return None
        section = sections.get(name) or {}
        return section.get("result") if section.get("status") == "ok" else None

    def progress(self, row: dict[str, Any]) -> None:
        """Keep one finished piece of work: an overrun section is reported with these."""
        with open(self.progress_path, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, paths and other objects strings."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py under a private name (`kernels` alone is the top-level package)."""
    key = f"_gpu_check_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Injected sections (LLAMATRAIN_GPU_CHECK_INJECT=1)


def injected_failure(ctx: Context) -> dict[str, Any]:
    raise RuntimeError("injected failure: the sections after this one still run")


def injected_overrun(ctx: Context) -> dict[str, Any]:
    ctx.progress({"done": "the part before the overrun"})
    time.sleep(10 * ctx.budget_s)
    return {"never": "reached"}


# ---------------------------------------------------------------------------------------------
# One section, in its own process


def _time_triton_compiles() -> list[float]:
    """Seconds of every Triton compilation in this process from now on (none in the
    interpreter): the compile time the check reports."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    try:
        import triton.compiler
    except ImportError:
        return []
    original = triton.compiler.compile
    seconds: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    # JITFunction binds `triton.compiler.compile` when it first runs: patch before any kernel.
    triton.compiler.compile = timed
    return seconds


def run_in_this_process(context_path: str) -> None:
    ctx = Context(**json.loads(Path(context_path).read_text()))
    spec = next(s for s in SECTIONS + INJECTED if s.name == ctx.name)
    compiles = _time_triton_compiles()
    result = getattr(sibling(spec.module), spec.function)(ctx, *spec.args)
    result = dict(result, triton_compiles=len(compiles), triton_compile_s=sum(compiles))
    Path(ctx.result_path).write_text(json.dumps(_clean(result), indent=1) + "\n")
    # Done: leave now rather than wait on the teardown of compile worker pools and the CUDA
    # context, which can take seconds of the budget.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The driver


def _tee(stream: Any, tail: collections.deque[str], prefix: str) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def _reason(tail: collections.deque[str], returncode: int) -> str:
    """The error a failed section ended with: the last line that names one, else its status."""
    for line in reversed(tail):
        if re.match(r"^\w*(Error|Exception|Interrupt)\b|^\w+(\.\w+)+Error\b", line.strip()):
            return line.strip()[:300]
    return f"exit status {returncode}"


def run_section(spec: Section, *, budget_s: float, rehearsal: bool, out: Path, stem: str,
                results_path: Path, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """Run one section in its own process group, killed at its budget; its record."""
    ctx = Context(spec.name, rehearsal, budget_s, str(out), stem, str(results_path),
                  str(tmp / f"{spec.name}.result.json"), str(tmp / f"{spec.name}.progress.jsonl"))
    context_path = tmp / f"{spec.name}.context.json"
    context_path.write_text(json.dumps(asdict(ctx)))
    record: dict[str, Any] = {"title": spec.title, "budget_s": budget_s}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--section", str(context_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: pytest's and compile's workers too
    reader = threading.Thread(target=_tee, args=(proc.stdout, tail, f"[{spec.name}] "),
                              daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=budget_s)
        overrun = False
    except subprocess.TimeoutExpired:
        overrun = True
        for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        returncode = proc.wait()
    reader.join(timeout=5)
    record["wall_s"] = time.perf_counter() - start
    record["output_tail"] = list(tail)[-15:]
    result_file, progress_file = Path(ctx.result_path), Path(ctx.progress_path)
    if progress_file.is_file():
        record["partial"] = [json.loads(x) for x in progress_file.read_text().splitlines() if x]
    if overrun:
        record["status"] = "overrun"
        record["reason"] = (f"killed at its budget of {budget_s:.0f} s (still running; "
                            f"{len(record.get('partial', []))} finished pieces kept)")
    elif returncode == 0 and result_file.is_file():
        record["status"] = "ok"
        record["result"] = json.loads(result_file.read_text())
        record.pop("partial", None)
    else:
        record["status"] = "failed"
        record["reason"] = _reason(tail, returncode)
    return record


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_slug(name: str | None) -> str:
    if not name:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_files(results: dict[str, Any], out: Path, stem: str, *, plots: bool) -> list[Path]:
    """The JSON and the report (atomically replaced), and with `plots` the plots the results
    allow so far."""
    report = sibling("gpu_report")
    if plots:
        made = {p.name for p in report.plots(results, out, stem)}
        results["files"] = sorted(made | set(results.get("files", [])))
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    texts = [json.dumps(_clean(results), indent=1) + "\n", report.markdown(results)]
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths + [out / name for name in results.get("files", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--total-s", type=float, default=460.0,
                        help="the whole check's wall-clock limit; section budgets shrink to fit")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a section's own process
    args = parser.parse_args(argv)
    if args.section:
        run_in_this_process(args.section)  # does not return

    started = time.perf_counter()
    import torch  # the driver only asks whether there is a GPU; sections do the rest

    rehearsal = not torch.cuda.is_available()
    name = None if rehearsal else torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    stem = f"{device_slug(name)}-{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH"))
                                        if p)
    if rehearsal:
        env["TRITON_INTERPRET"] = "1"
    sections = list(SECTIONS)
    if os.environ.get(INJECT_ENV) == "1":
        sections[1:1] = INJECTED
    results: dict[str, Any] = {
        "tool": "make gpu-check", "mode": "rehearsal" if rehearsal else "gpu",
        "device": device_slug(name), "device_name": name or "cpu", "date": date,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "python": sys.executable, "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")), "total_s": args.total_s,
        "sections": {}, "order": [s.name for s in sections],
    }
    print(f"gpu-check: {'rehearsal without CUDA' if rehearsal else name}; {len(sections)} "
          f"sections within {args.total_s:.0f} s; results in {args.out}/{stem}.*", flush=True)
    results_path = args.out / f"{stem}.json"
    write_files(results, args.out, stem, plots=False)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for spec in sections:
            left = args.total_s - (time.perf_counter() - started) - RESERVE_S
            budget = min(spec.rehearsal_s if rehearsal else spec.gpu_s, left)
            if budget < 3:
                record = {"title": spec.title, "status": "skipped", "wall_s": 0.0,
                          "reason": f"no time left of the check's {args.total_s:.0f} s"}
            else:
                record = run_section(spec, budget_s=budget, rehearsal=rehearsal, out=args.out,
                                     stem=stem, results_path=results_path, env=env,
                                     tmp=Path(tmp))
            results["sections"][spec.name] = record
            results["wall_s"] = time.perf_counter() - started
            if spec.name == "preflight" and record["status"] == "ok":
                print(record["result"]["line"], flush=True)
            print(f"gpu-check: {spec.name} {record['status']} in {record['wall_s']:.1f} s"
                  + (f": {record['reason']}" if "reason" in record else ""), flush=True)
            files = write_files(results, args.out, stem, plots=spec.name in PLOTTED)
    print(f"gpu-check: done in {results['wall_s']:.0f} s; wrote {', '.join(map(str, files))}")
    bad = [n for n, r in results["sections"].items()
           if r["status"] != "ok" and not n.startswith("injected_")]
    if bad:
        print(f"gpu-check: not ok: {', '.join(bad)} (see {stem}.md)")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
