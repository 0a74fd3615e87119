"""`make bench`: measure what llamatrain exists for and leave results that a person can read and a
machine can compare, in benchmarks/results/<device>-<date>.{json,md} plus PNG plots.

On CUDA: this GPU's limits (limits.py), then the kernel table (kernel_speed.py). Everywhere: the
data, training and checkpoint benchmarks (data.py, train.py, checkpoint.py in this folder, each run
as `python X.py --json PATH`; a missing one is skipped with one line), Table 2 and projections of
the paper's runs (llamatrain.carbon), and the energy and carbon of this benchmark run itself. With
--profile, a torch.profiler trace of the five ops forward and backward, for Perfetto or TensorBoard.

Usage: python benchmarks/run.py [--profile] [--out DIR] [--quick]
(works with a system python and PYTHONPATH=src on a machine without the project's venv).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUB_BENCHMARKS = ("data", "train", "checkpoint")
PROJECTED = ("llama2_7b", "llama2_70b")
# Layouts the trainer accepts on 2,048 GPUs (at most 1,024 data-parallel ranks for 1,024
# sequences per step): tensor parallelism inside the node.
PROJECTED_LAYOUT = {"llama2_7b": ["--parallel.tp=2", "--train.micro_batch_size=1"],
                    "llama2_70b": ["--parallel.tp=8"]}
OPTIONAL_PACKAGES = ("liger_kernel", "flash_attn", "apex", "nvidia-ml-py", "triton", "numpy")
PROFILE_ENV = "LLAMATRAIN_BENCH_PROFILE_DIR"

try:
    import llamatrain  # noqa: F401
except ImportError:  # a plain checkout without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from llamatrain import carbon  # noqa: E402
from llamatrain.config import CarbonConfig, load_config  # noqa: E402


def _sibling(name: str) -> ModuleType:
    """Load benchmarks/<name>.py under a private name, never as a top-level module that could
    shadow an installed package."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Provenance


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count)
    return info


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        try:
            nccl = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception:
            out["nccl"] = None
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            out["driver"] = None
    for package in OPTIONAL_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Sections


def gpu_sections(device: torch.device, device_name: str, kernels_mod: ModuleType, *,
                 quick: bool, budget_s: float) -> dict[str, Any]:
    """This GPU's limits, then the kernel table at the 7B and 70B shapes."""
    limits_mod = _sibling("limits")
    print(f"GPU: {device_name}; measuring its copy bandwidth and bf16 matmul throughput")
    limits = limits_mod.measure(device, quick=quick)
    print(f"limits: copy {limits['copy_gbs']:,.0f} GB/s, "
          f"bf16 matmul {limits['matmul_tflops']:,.0f} TFLOP/s")
    tokens = 512 if quick else 4096
    shapes = [kernels_mod.Shape.of(n.removeprefix("llama2_"),
                                   load_config(ROOT / "configs" / f"{n}.toml").model, tokens)
              for n in PROJECTED]
    rep_ms = 20 if quick else 50
    print(f"kernels at the {' and '.join(s.name for s in shapes)} shapes, {tokens} tokens, bf16")
    rows = kernels_mod.run(
        shapes, device, limits=limits, budget_s=budget_s,
        timer=lambda fn, **kw: limits_mod.median_ms(fn, device, warmup_ms=10, rep_ms=rep_ms, **kw),
    )
    return {"limits": limits, "kernels": rows}


def run_sub_benchmark(name: str, bench_dir: Path, *, timeout_s: float,
                      env: dict[str, str]) -> dict[str, Any]:
    """Run bench_dir/<name>.py --json PATH; its output streams through, its JSON is returned."""
    path = bench_dir / f"{name}.py"
    if not path.is_file():
        print(f"{name}: {path} not found, skipped")
        return {"skipped": f"{path.name} not found"}
    print(f"{name}: running {path.name}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        json_path = Path(tmp) / f"{name}.json"
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(path), "--json", str(json_path)], cwd=ROOT,
                                  env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {timeout_s:g} s")
            return {"error": f"timed out after {timeout_s:g} s"}
        wall_s = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{name}: failed with exit status {proc.returncode} (its output is above)")
            return {"error": f"exit status {proc.returncode}", "wall_s": wall_s}
        try:
            data = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            print(f"{name}: wrote no readable JSON ({type(e).__name__}: {e})")
            return {"error": f"no readable JSON: {e}", "wall_s": wall_s}
    print(f"{name}: done in {wall_s:.1f} s")
    return {"wall_s": wall_s, "result": data}


def accounting_section() -> dict[str, Any]:
    """Table 2 through carbon.estimate, and the 7B and 70B runs projected at the paper's MFU."""
    table2 = []
    for model, gpu_hours, power_w, paper_t in carbon.TABLE2:
        est = carbon.estimate(gpu_hours, power_w)
        table2.append({"model": model, "gpu_hours": gpu_hours, "power_w": power_w,
                       "paper_tco2eq": paper_t, "tco2eq": est["tco2eq"],
                       "rel_error": est["tco2eq"] / paper_t - 1})
    projections = {}
    for name in PROJECTED:
        path = ROOT / "configs" / f"{name}.toml"
        if not path.is_file():
            print(f"accounting: {path} not found, no projection for {name}")
            continue
        cfg = load_config(path, PROJECTED_LAYOUT[name])
        projections[name] = carbon.project(carbon.Plan(
            config=cfg, tokens=2e12, num_gpus=2048, device="a100", fabric="ib"))
    return {"table2": table2, "projections": projections}


def profile_ops(device: torch.device, kernels_mod: ModuleType, path: Path, *,
                quick: bool) -> Path:
    """A torch.profiler trace of the five ops, forward and backward, three times over: the fused
    kernels on CUDA (PyTorch references where they fail), the references on a CPU."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if device.type == "cuda" and not quick:
        shape = kernels_mod.Shape.of("7b", load_config(ROOT / "configs/llama2_7b.toml").model, 4096)
    else:
        shape = kernels_mod.Shape("tiny", 256, 8, 4, 704, 4096, 256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = []
    for case in kernels_mod.cases([shape]):
        inputs = case.make(device, dtype)
        fn: Any = None
        for provider in ("llamatrain", "torch") if device.type == "cuda" else ("torch",):
            try:
                fn, _ = case.providers[provider](inputs)
                out = fn()
                torch.autograd.backward(kernels_mod._as_tuple(out),
                                        [torch.ones_like(o) for o in kernels_mod._as_tuple(out)])
                break
            except Exception:
                fn = None
        if fn is not None:
            steps.append((f"{case.op} ({provider})", fn))

    def one_pass() -> None:
        for label, fn in steps:
            with record_function(label):
                outs = kernels_mod._as_tuple(fn())
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for _ in range(3):
            one_pass()
        if device.type == "cuda":
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Report


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, paths strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalars of a nested dict as (dotted key, value); lists are summarised by their length."""
    if isinstance(data, dict):
        items: list[tuple[str, Any]] = []
        for k, v in data.items():
            items += _flatten(v, f"{prefix}{k}.")
        return items
    if isinstance(data, list):
        return [(prefix.rstrip("."), f"[{len(data)} items]")]
    return [(prefix.rstrip("."), data)]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def float8_markdown(float8: dict[str, Any] | None) -> list[str]:
    """The float8 row of benchmarks/train.py (train.float8_rows): a table, or why it was skipped."""
    if float8 is None:
        return []
    lines = ["## Float8 training", ""]
    if "skipped" in float8:
        return lines + [f"Skipped: {float8['skipped']}.", ""]
    if "error" in float8:
        return lines + [f"Failed: {float8['error']}.", ""]
    lines += [f"bf16 and torchao's float8 recipes, each with `parallel.compile`, "
              f"{float8['steps']} steps from the same seed; tokens/s is the median step, loss "
              "the last step's, MFU against the bf16 peak.", ""]
    return lines + _table(
        ["precision", "tokens/s per device", "vs bf16", "loss", "MFU"],
        [["bf16" if r["float8"] == "none" else f"float8 {r['float8']}",
          f"{r['tokens_per_s_per_device']:,.0f}", f"{r['vs_bf16']:.2f}x", f"{r['loss']:.4f}",
          f"{r['mfu']:.1%}" if r["mfu"] is not None else None] for r in float8["rows"]])


def markdown(results: dict[str, Any]) -> str:
    s = results["sections"]
    lines = [
        f"# Benchmark results: {results['device_name']}, {results['date']}",
        "",
        f"- command: `{results['command']}`",
        f"- git commit: `{results['git_commit']}`" + (" (uncommitted changes)"
                                                       if results["git_dirty"] else ""),
        f"- wall time: {results['wall_s']:.0f} s",
        "",
        "## Machine and versions",
        "",
        *_table(["key", "value"], [[k, v] for k, v in
                                   {**results["machine"], **results["versions"]}.items()]),
    ]
    lines += ["## GPU limits (measured at the start of the run)", ""]
    if s.get("limits"):
        lines += _table(["device-to-device copy GB/s", "bf16 matmul TFLOP/s"],
                        [[s["limits"]["copy_gbs"], s["limits"]["matmul_tflops"]]])
    else:
        lines += ["Not measured: no GPU.", ""]
    lines += ["## Kernels", ""]
    if s.get("kernels"):
        lines += ["Median of triton.testing.do_bench; rate = GB/s (TFLOP/s for attention); "
                  "% = fraction of the measured copy (matmul) limit; peak = memory above the "
                  "inputs during forward+backward.", ""]
        rows = []
        for r in s["kernels"]:
            if "error" in r:
                rows.append([r["op"], r["shape"], r["provider"], None, None, None, None, None,
                             None, r["error"]])
                continue
            frac = r.get("fwd_bwd_frac")
            rows.append([r["op"], r["shape"], r["provider"], r["fwd_ms"], r["bwd_ms"],
                         r["fwd_bwd_ms"], r["fwd_bwd_rate"], r["unit"],
                         f"{frac:.0%}" if frac is not None else None,
                         f"{r['peak_mem_mb']:.0f} MB" if "peak_mem_mb" in r else None])
        lines += _table(["op", "shape", "provider", "fwd ms", "bwd ms", "fwd+bwd ms",
                         "fwd+bwd rate", "unit", "% of limit", "peak / error"], rows)
    else:
        lines += ["Not run: no GPU.", ""]
    for name in SUB_BENCHMARKS:
        section = s.get(name) or {}
        lines += [f"## {name.capitalize()} benchmark", ""]
        if "result" in section:
            lines += [f"`benchmarks/{name}.py`, {section['wall_s']:.1f} s.", ""]
            rest = {k: v for k, v in section["result"].items() if k != "float8"}
            lines += _table(["key", "value"], [list(kv) for kv in _flatten(rest)])
        else:
            lines += [f"Not run: {section.get('skipped') or section.get('error')}.", ""]
    lines += float8_markdown(((s.get("train") or {}).get("result") or {}).get("float8"))
    acct = s["accounting"]
    lines += ["## Run accounting", "", "Table 2 through `python -m llamatrain.carbon estimate` "
              "(defaults: PUE 1.0, 0.4235 kg CO2eq/kWh):", ""]
    lines += _table(["model", "GPU-hours", "W", "paper tCO2eq", "tCO2eq", "error"],
                    [[r["model"], f"{r['gpu_hours']:,.0f}", f"{r['power_w']:.0f}",
                      f"{r['paper_tco2eq']:.2f}", f"{r['tco2eq']:.2f}", f"{r['rel_error']:+.3%}"]
                     for r in acct["table2"]])
    for name, p in acct.get("projections", {}).items():
        lines += [f"Projection of {name}: 2T tokens on 2,048 A100s at MFU {p['mfu']:.0%} with "
                  f"FSDP on InfiniBand: {p['gpu_hours']:,.0f} GPU-hours, {p['days']:.1f} days, "
                  f"{p['tco2eq']:.1f} tCO2eq.", ""]
        lines += _table(["GPUs", "tp", "shard", "tokens/GPU", "IB efficiency", "RoCE efficiency"],
                        [[r["gpus"], r["tp"], r["dp_shard"], f"{r['tokens_per_gpu']:,.0f}",
                          f"{r['ib_efficiency']:.1%}", f"{r['roce_efficiency']:.1%}"]
                         if r["feasible"] else
                         [r["gpus"], "", "", f"{r['tokens_per_gpu']:,.0f}", "infeasible", ""]
                         for r in p["scaling"]])
    lines += ["This benchmark run: " + carbon.format_accounting(acct["this_run"]), ""]
    if results.get("profile_trace"):
        lines += ["## Profile", "", f"torch.profiler trace: `{results['profile_trace']}` "
                  "(open in https://ui.perfetto.dev or TensorBoard's profiler plugin).", ""]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="where the results go (default benchmarks/results)")
    parser.add_argument("--profile", action="store_true",
                        help="also record a torch.profiler trace (make bench PROFILE=1)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and short timings: a smoke test, not for publishing")
    parser.add_argument("--bench-dir", type=Path, default=HERE,
                        help="where data.py, train.py and checkpoint.py live (default: here)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="limit for each of the data, train and checkpoint benchmarks")
    parser.add_argument("--kernel-budget-s", type=float, default=180.0,
                        help="after this long, the kernel benchmark skips what is left")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meter = carbon.EnergyMeter(device)
    stem = f"{device_slug(device)}-{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    kernels_mod = _sibling("kernel_speed")
    sections: dict[str, Any] = {}

    if device.type == "cuda":
        try:
            sections.update(gpu_sections(device, device_name, kernels_mod, quick=args.quick,
                                         budget_s=args.kernel_budget_s))
        except Exception as e:  # report it and go on with the rest of the bench
            print(f"GPU benchmarks failed: {type(e).__name__}: {e}")
            sections["gpu_error"] = f"{type(e).__name__}: {e}"
    else:
        print("no GPU: skipping the GPU limits and kernel benchmarks; running the rest")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH"))
                                        if p)
    profile_dir = args.out / "profile"
    if args.profile:
        env[PROFILE_ENV] = str(profile_dir)
    for name in SUB_BENCHMARKS:
        sections[name] = run_sub_benchmark(name, args.bench_dir, timeout_s=args.timeout_s, env=env)

    sections["accounting"] = accounting_section()
    results: dict[str, Any] = {
        "device": device_slug(device),
        "device_name": device_name,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "machine": machine(device),
        "versions": versions(),
        "sections": sections,
    }
    if args.profile:
        try:
            trace = profile_ops(device, kernels_mod, profile_dir / f"{stem}.pt.trace.json",
                                quick=args.quick)
            results["profile_trace"] = str(trace)
        except Exception as e:
            print(f"profile failed: {type(e).__name__}: {e}")

    plots_mod = _sibling("plots")
    results["plots"] = [str(p) for p in plots_mod.plot_all(results, args.out, stem)]
    results["wall_s"] = time.perf_counter() - start
    sections["accounting"]["this_run"] = carbon.account(
        CarbonConfig(), num_devices=1, wall_s=results["wall_s"], device_name=device_name,
        measured_kwh=meter.kwh(),
    )
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps(_clean(results), indent=1) + "\n")
    md_path.write_text(markdown(results))
    print("this run: " + carbon.format_accounting(sections["accounting"]["this_run"]))
    print(f"results: {json_path} and {md_path}")
    for p in results["plots"]:
        print(f"plot: {p}")
    if args.profile:
        print(f"profile trace (Perfetto or TensorBoard): {results['profile_trace']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
