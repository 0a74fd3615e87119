"""The report a person reads of one `make gpu-check` (the results dict gpu_check.py writes as
JSON): the machine and versions, every section's status, and each section's tables; and the plots
its results allow. Rewritten after every section, so it reads whole at any moment."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.{digits}f}".rstrip("0").rstrip(".") if abs(value) < 100 \
                else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in row) + " |"
              for row in rows]
    return lines + [""]


def _result(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = results["sections"].get(name) or {}
    return section.get("result")


def _not_there(results: dict[str, Any], name: str) -> list[str]:
    """One line for a section without a result: not run yet, failed, overrun or skipped."""
    section = results["sections"].get(name)
    if section is None:
        return ["Not run (yet).", ""]
    return [f"**{section['status']}** after {section['wall_s']:.0f} s: "
            f"{_fmt(section.get('reason'))}", ""]


def header(results: dict[str, Any]) -> list[str]:
    mode = ("a rehearsal without CUDA: tiny shapes, Triton's interpreter, fp32; the numbers "
            "say nothing about any GPU" if results["mode"] == "rehearsal" else "on the GPU")
    lines = [f"# make gpu-check: {results['device_name']}, {results['date']}", "",
             f"- mode: {mode}",
             f"- command: `{results['command']}` ({results['python']})",
             f"- git commit: `{results['git_commit']}`"
             + (" (uncommitted changes)" if results["git_dirty"] else ""),
             f"- wall time: {results.get('wall_s', 0):.0f} s of {results['total_s']:.0f} s", ""]
    pre = _result(results, "preflight")
    if pre:
        lines += [f"`{pre['line']}`", ""]
    return lines


def status_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for name in results["order"]:
        s = results["sections"].get(name)
        if s is None:
            rows.append([name, "not run yet", "", "", "", ""])
            continue
        result = s.get("result") or {}
        rows.append([name, s["status"], _fmt(s.get("budget_s")), _fmt(s["wall_s"], 1),
                     _fmt(result.get("triton_compile_s"), 1) if result else "-",
                     _fmt(s.get("reason", ""))])
    return ["## Sections", "", "Each section ran in its own process within its budget; Triton "
            "compile s is the time its process spent in `triton.compiler.compile`.", "",
            *_table(["section", "status", "budget s", "wall s", "Triton compile s", "reason"],
                    rows)]


def preflight_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Machine and versions", ""]
    pre = _result(results, "preflight")
    if not pre:
        return lines + _not_there(results, "preflight")
    g, c = pre["gpu"], pre["compiler"]
    rows = [["GPU", f"{g['name']} x{g['count']}" if g["name"] else "none (rehearsal)"]]
    if g["name"]:
        rows += [["memory GiB", g["memory_gib"]], ["compute capability", g["compute_capability"]],
                 ["SMs", g["sm_count"]], ["driver", g["driver"]], ["CUDA", g["cuda"]]]
    rows += [[k, v] for k, v in pre["versions"].items()]
    rows += [["C compiler", c["cc_version"] or c["cc"] or "none"], ["Python.h", c["python_h"]],
             ["CPUs", pre["cpu_count"]]]
    rows += [[f"optional: {k}", v] for k, v in pre["optional"].items()]
    lines += _table(["what", "value"], rows)
    if pre["skipped"]:
        lines += ["Skipped or reduced here:", ""] + [f"- {s}" for s in pre["skipped"]] + [""]
    return lines


def limits_section(results: dict[str, Any]) -> list[str]:
    lines = ["## GPU limits (measured in this run)", ""]
    lim = _result(results, "limits")
    if not lim:
        return lines + _not_there(results, "limits")
    sheet = lim["datasheet"]
    lines += _table(["device-to-device copy GB/s", "bf16 matmul TFLOP/s (8192^3)",
                     "data sheet bf16 TFLOP/s (llamatrain.hardware)", "measured / data sheet"],
                    [[lim["copy_gbs"], lim["matmul_tflops"], sheet["bf16_tflops"],
                      _pct(lim["matmul_of_datasheet"])]])
    return lines


def correctness_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Correctness (every kernel test on this device)", ""]
    c = _result(results, "correctness")
    if not c:
        return lines + _not_there(results, "correctness")
    lines += [f"{c['passed']} of {c['tests']} passed, {c['failed']} failed"
              + (" (pytest stopped at the budget)" if c["stopped_at_budget"] else "")
              + f"; `{' '.join(c['command'][:4])} ...`; error = max |kernel - fp32 reference| "
              "over max |reference|, against the test's tolerance.", ""]
    lines += _table(["file", "dtype", "passed", "failed", "worst error / tolerance",
                     "worst error", "in"],
                    [[g["file"], g["dtype"], g["passed"], g["failed"],
                      _fmt(g["worst_ratio"], 2), _fmt(g["worst_error"]),
                      _fmt(g["worst_test"]).split("::")[-1]] for g in c["summary"]])
    if c["failures"]:
        lines += ["Failures:", ""] + [f"- `{f['test']}`: {_fmt(f['message'])}"
                                      for f in c["failures"]] + [""]
    return lines


def kernels_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Kernels", ""]
    k = _result(results, "kernels")
    rows = k["rows"] if k else (results["sections"].get("kernels") or {}).get("partial")
    if not rows:
        return lines + _not_there(results, "kernels")
    if not k:
        lines += _not_there(results, "kernels") + ["The rows measured before that:", ""]
    lines += ["Median time; rate = GB/s (TFLOP/s for attention and the fused loss); % = of the "
              "copy bandwidth (matmul rate) measured above; first call = compile included.", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["op"], r["shape"], r["provider"], "-", "-", "-", "-", "-", "-",
                          _fmt(r["error"])])
            continue
        table.append([r["op"], r["shape"], r["provider"], r["fwd_ms"], r["bwd_ms"],
                      r["fwd_bwd_ms"], r["fwd_bwd_rate"], r["unit"], _pct(r.get("fwd_bwd_frac")),
                      f"first call {r['first_call_s']:.1f} s"
                      + (f", peak {r['peak_mem_mb']:.0f} MB" if "peak_mem_mb" in r else "")])
    lines += _table(["op", "shape", "provider", "fwd ms", "bwd ms", "fwd+bwd ms",
                     "fwd+bwd rate", "unit", "% of limit", "notes / error"], table)
    attention = [r for r in rows if r["op"] == "attention" and "error" not in r]
    if attention:
        lines += ["Causal attention, forward + backward (TFLOP/s):", ""]
        lines += _table(["shape", "provider", "TFLOP/s", "% of measured matmul"],
                        [[r["shape"], r["provider"], r["fwd_bwd_rate"],
                          _pct(r.get("fwd_bwd_frac"))] for r in attention])
    return lines


def training_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Training (the trainer, one GPU)", ""]
    runs = {b: _result(results, f"train_{b}") for b in ("triton", "torch")}
    if not any(runs.values()):
        return lines + _not_there(results, "train_triton") + _not_there(results, "train_torch")
    first = next(r for r in runs.values() if r)
    lines += [f"{first['params']:,} parameters, {first['n_layers']} layers "
              f"({first['layout']['note']}), {first['tokens_per_step']:,} tokens per step, "
              f"{first['steps']} steps of which the first {first['warmup_steps']} are warm-up.",
              ""]
    header = ["", *(f"kernels.backend = {b}" for b in runs)]

    def row(label: str, key: str, fmt=_fmt) -> list[str]:
        return [label, *(fmt(r[key]) if r else "-" for r in runs.values())]

    lines += _table(header, [
        row("tokens/s", "tokens_per_s"), row("MFU (data sheet peak)", "mfu", _pct),
        row("MFU (measured matmul rate)", "mfu_of_measured_matmul", _pct),
        row("peak memory GB", "peak_memory_gb"), row("first step s (compiles)", "first_step_s"),
        row("median step s", "median_step_s"), row("wall s", "wall_s"),
        ["ops on Triton", *("-" if not r else ", ".join(
            op for op, impl in r["kernel_choice"]["ops"].items() if impl == "triton") or "none"
            for r in runs.values())],
    ])
    for b in runs:
        if not runs[b]:
            lines += [f"kernels.backend = {b}:"] + _not_there(results, f"train_{b}")
    if all(runs.values()):
        a, b = runs["triton"]["losses"], runs["torch"]["losses"]
        pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
        worst = max((abs(x - y) / abs(y) for x, y in pairs), default=None)
        lines += [f"Loss (fp32-accumulated) per step, triton / torch; largest relative "
                  f"difference {_fmt(worst, 5)}:", ""]
        lines += _table(["step", "triton", "torch"],
                        [[i + 1, _fmt(x, 6), _fmt(y, 6)] for i, (x, y) in enumerate(pairs)])
    return lines


def loss_memory_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Peak memory of the loss (forward + backward)", ""]
    m = _result(results, "loss_memory")
    if not m:
        return lines + _not_there(results, "loss_memory")
    lines += [f"{m['tokens']:,} tokens x {m['vocab']:,} logits, hidden size {m['dim']:,}; memory "
              "added on top of the inputs and their gradient buffers.", ""]
    lines += _table(["variant", "peak added MiB", "loss", "s", "device", "error"],
                    [[r["variant"], _fmt(r["peak_added_bytes"] / 2**20 if "peak_added_bytes" in r
                                         else None, 0), _fmt(r.get("loss"), 6),
                      _fmt(r.get("seconds"), 2), _fmt(r.get("device")), _fmt(r.get("error"))]
                     for r in m["rows"]])
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = header(results) + status_table(results) + preflight_section(results)
    lines += limits_section(results) + correctness_section(results) + kernels_section(results)
    lines += training_section(results) + loss_memory_section(results)
    if results.get("files"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in results["files"]]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """The kernel plots and the two training runs' curves, as far as the results go."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # preflight says so
        return []
    spec = importlib.util.spec_from_file_location("_gpu_report_plots",
                                                  Path(__file__).with_name("plots.py"))
    assert spec is not None and spec.loader is not None
    plots_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots_mod)
    paths: list[Path] = []
    k = _result(results, "kernels")
    if k:
        paths += plots_mod.kernel_plots(k["rows"], k["limits"], out, stem)
    curves = {b: r["records"] for b in ("triton", "torch") if (r := _result(results, f"train_{b}"))}
    if curves:
        paths += plots_mod.train_compare_plot(curves, out, stem)
    return paths
