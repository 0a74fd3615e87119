"""Run accounting and projections: GPU-hours, energy and carbon of a finished run, the paper's
Table 2, and the cost of a planned run, whose layouts and step times on IB or RoCE come from
llamatrain.plan (the rules the trainer applies).

Method (Llama 2 §2.2.1, Table 2): energy = devices x hours x power x PUE, where the power is NVML's
measured total-energy counter when there is one, else the configured power or the device's TDP;
tCO2eq = energy x carbon intensity.

The default intensity, 0.4235 kg CO2eq/kWh (`carbon.intensity_kg_per_kwh`), is read off Table 2
itself: 31.22 t / (184,320 h x 0.400 kW) = 0.42345, 62.44 / (368,640 x 0.400) = 0.42345,
153.90 / (1,038,336 x 0.350) = 0.42348 and 291.42 / (1,720,320 x 0.400) = 0.42350; 0.4235
reproduces every row within 0.02%. It equals the US-average 0.385 kg/kWh times a PUE of 1.1, the
method of the LLaMA 1 paper; Table 2's caption says its power is already "adjusted for power usage
efficiency", so `carbon.pue` defaults to 1.0 and the PUE lives in the factor.

CLI: `python -m llamatrain.carbon estimate ...` and `python -m llamatrain.carbon project ...`;
`project` takes the config's `--section.key=value` overrides, `--train.float8` included (the
converted linears at the device's fp8 peak, plan.peak_seconds_per_token; MFU stays against bf16's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from llamatrain.config import CarbonConfig, Config, load_config, run_cli
from llamatrain.flops import flops_per_token, num_params
from llamatrain.hardware import gpu, is_gpu, peak_flops, tdp_watts
from llamatrain.plan import (
    FABRICS,
    candidate_layouts,
    check_cluster,
    check_layout,
    peak_seconds_per_token,
    state_bytes,
    step_model,
)

# (model, GPU-hours, W per GPU, tCO2eq): Table 2 of the paper.
TABLE2: tuple[tuple[str, float, float, float], ...] = (
    ("7B", 184_320, 400.0, 31.22),
    ("13B", 368_640, 400.0, 62.44),
    ("34B", 1_038_336, 350.0, 153.90),
    ("70B", 1_720_320, 400.0, 291.42),
)

# MFU implied by Table 2 for 2T tokens, by flops.py's count at A100's 312 TFLOP/s: 44.5% (7B),
# 42.1% (13B), 37.8% (34B, the 350 W production cluster), 46.0% (70B). 45% sits between the 7B and
# 70B runs, both on RSC.
PAPER_MFU = 0.45

# ---------------------------------------------------------------------------------------------
# Measured energy


def _nvml_index(device: Any) -> int:
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        # Maps through CUDA_VISIBLE_DEVICES (NVML numbers every GPU on the machine).
        return torch.cuda._get_nvml_device_index(index)
    except Exception:
        return index


class EnergyMeter:
    """Energy drawn by this process's GPU since construction, from NVML's total-energy counter.

    Readings are None where there is nothing to read: a CPU, no nvidia-ml-py, no driver, a GPU
    older than Volta. The counter is the whole GPU's, so another process on the same GPU counts.
    """

    def __init__(self, device: Any) -> None:
        self._pynvml: Any = None
        self._handle: Any = None
        self._start_mj = 0
        try:
            import torch

            device = torch.device(device)
            if device.type != "cuda":
                return
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:
            # Never fail a training run over accounting: the caller falls back to TDP x time.
            return
        self._pynvml, self._handle = pynvml, handle

    def kwh(self) -> float | None:
        if self._handle is None:
            return None
        try:
            now_mj = self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception:
            return None
        return (now_mj - self._start_mj) / 3.6e9  # mJ -> kWh


# ---------------------------------------------------------------------------------------------
# Accounting


def _check(key: str, value: float, *, low: float = 0.0, strict: bool = False) -> None:
    bad = value <= low if strict else value < low
    if bad or math.isnan(value):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{key} = {value!r}: expected a number {bound}")


def estimate(
    gpu_hours: float, power_w: float, *, pue: float | None = None, intensity: float | None = None
) -> dict[str, float]:
    """Energy and carbon of gpu_hours at power_w per device (Table 2's method)."""
    defaults = CarbonConfig()
    pue = defaults.pue if pue is None else pue
    intensity = defaults.intensity_kg_per_kwh if intensity is None else intensity
    _check("gpu_hours", gpu_hours)
    _check("power_w", power_w)
    _check("pue", pue, strict=True)
    _check("intensity_kg_per_kwh", intensity)
    energy_kwh = gpu_hours * power_w / 1000.0 * pue
    return {
        "gpu_hours": gpu_hours,
        "power_w": power_w,
        "pue": pue,
        "intensity_kg_per_kwh": intensity,
        "energy_kwh": energy_kwh,
        "tco2eq": energy_kwh * intensity / 1000.0,
    }


def account(
    cfg_carbon: Any,
    *,
    num_devices: int,
    wall_s: float,
    device_name: str,
    measured_kwh: float | None,
) -> dict[str, Any]:
    """GPU-hours, energy and carbon of a run.

    measured_kwh is the energy of all devices together (the sum of every rank's
    `EnergyMeter.kwh()`), or None to charge carbon.power_w (0: the device's TDP) per device.
    `power_w` in the result is then the measured average per device.
    """
    cfg = cfg_carbon if cfg_carbon is not None else CarbonConfig()
    if num_devices < 1:
        raise ValueError(f"num_devices = {num_devices!r}: expected an integer >= 1")
    _check("wall_s", wall_s)
    gpu_hours = num_devices * wall_s / 3600.0
    if measured_kwh is not None:
        _check("measured_kwh", measured_kwh)
        power_w = measured_kwh * 1000.0 / gpu_hours if gpu_hours > 0 else 0.0
        source = "nvml"
    else:
        _check("carbon.power_w", cfg.power_w)
        power_w = cfg.power_w or tdp_watts(device_name)
        source = "tdp"
    out = estimate(gpu_hours, power_w, pue=cfg.pue, intensity=cfg.intensity_kg_per_kwh)
    out.update(
        energy_source=source, num_devices=num_devices, wall_s=wall_s, device_name=device_name
    )
    return out


def _num(x: float) -> str:
    if x == 0 or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def _carbon(tco2eq: float) -> str:
    if tco2eq >= 1:
        return f"{tco2eq:.2f} tCO2eq"
    if tco2eq >= 1e-3:
        return f"{_num(tco2eq * 1e3)} kgCO2eq"
    return f"{_num(tco2eq * 1e6)} gCO2eq"


def format_accounting(acct: dict[str, Any]) -> str:
    """One line for the log and report.md, e.g.
    `GPU-hours 2.00 | 0.8 kWh (tdp 400 W, PUE 1.00) | 339 gCO2eq`."""
    hours = "GPU-hours" if is_gpu(acct.get("device_name", "gpu")) else "device-hours"
    return (
        f"{hours} {_num(acct['gpu_hours'])} | {_num(acct['energy_kwh'])} kWh "
        f"({acct.get('energy_source', 'tdp')} {_num(acct['power_w'])} W, PUE {acct['pue']:.2f}) "
        f"| {_carbon(acct['tco2eq'])}"
    )


# ---------------------------------------------------------------------------------------------
# Projection


def scaling_gpu_counts(num_gpus: int, gpus_per_node: int) -> list[int]:
    """GPU counts for the scaling table: powers of two from one node to 8192 (or num_gpus)."""
    counts, g = [], gpus_per_node
    while g <= max(8192, num_gpus):
        counts.append(g)
        g *= 2
    return sorted(set(counts) | {num_gpus})


@dataclass
class Plan:
    """A planned run: its config (model, batch and parallel layout) and the cluster it would run
    on."""

    config: Config
    tokens: float
    num_gpus: int
    device: str
    mfu: float | None = None
    tokens_per_s_per_gpu: float | None = None
    fabric: str | None = None
    link_gbps: float = 200.0
    gpus_per_node: int = 8
    nics_per_node: int = 8
    power_w: float = 0.0
    pue: float | None = None
    intensity: float | None = None


def project(plan: Plan) -> dict[str, Any]:
    """GPU-hours, days, energy and carbon of a planned run, with the IB/RoCE scaling table.

    Layouts and step times come from llamatrain.plan: a GPU count at which the trainer would
    refuse the config's layout is a row marked infeasible, without an efficiency, and a projection
    at such a count is an error naming a layout the trainer accepts."""
    _check("tokens", plan.tokens, strict=True)
    check_cluster(plan.num_gpus, plan.gpus_per_node, link_gbps=plan.link_gbps,
                  nics_per_node=plan.nics_per_node)
    if plan.fabric is not None and plan.fabric not in FABRICS:
        raise ValueError(f"fabric = {plan.fabric!r}: expected one of {', '.join(FABRICS)}")
    cfg = plan.config
    device = gpu(plan.device)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = peak_flops(device.name, "bf16")
    try:
        layout, _ = check_layout(cfg, plan.num_gpus, plan.gpus_per_node)
    except ValueError as e:
        raise ValueError(f"{e} (at {plan.num_gpus} GPUs){_accepted(cfg, plan)}") from None
    # One token's FLOPs at the device's peaks; under train.float8 the converted linears at fp8's.
    at_peak = peak_seconds_per_token(cfg, device, tp=layout.tp)
    if plan.tokens_per_s_per_gpu is not None:
        _check("tokens_per_s_per_gpu", plan.tokens_per_s_per_gpu, strict=True)
        tps = plan.tokens_per_s_per_gpu
        compute_mfu = tps * at_peak
    else:
        compute_mfu = PAPER_MFU if plan.mfu is None else plan.mfu
        if not 0 < compute_mfu <= 1:
            raise ValueError(f"mfu = {compute_mfu!r}: expected a fraction in (0, 1]")
        tps = compute_mfu / at_peak
    # Against the bf16 peak, as the trainer logs it: above compute_mfu under float8, equal without.
    mfu = tps * fpt / peak if cfg.train.float8 != "none" else compute_mfu

    def step(g: int, fabric: str) -> dict[str, Any]:
        layout, _ = check_layout(cfg, g, plan.gpus_per_node)
        out = step_model(cfg, layout, num_gpus=g, gpus_per_node=plan.gpus_per_node,
                         device=device, mfu=compute_mfu, fabric=FABRICS[fabric],
                         link_gbps=plan.link_gbps, nics_per_node=plan.nics_per_node)
        return {**out, "layout": layout}

    headline = step(plan.num_gpus, plan.fabric or "ib")
    efficiency = headline["efficiency"] if plan.fabric is not None else 1.0
    gpu_hours = plan.tokens / tps / 3600.0 / efficiency
    power_w = plan.power_w or tdp_watts(device.name)
    out: dict[str, Any] = {
        "params": num_params(cfg.model),
        "flops_per_token": fpt,
        "seq_len": cfg.train.seq_len,
        "tokens": plan.tokens,
        "gpus": plan.num_gpus,
        "device": plan.device,
        "peak_flops": peak,
        "mfu": mfu,
        "float8": cfg.train.float8,
        "compute_mfu": compute_mfu,
        "tokens_per_s_per_gpu": tps,
        "fabric": plan.fabric,
        "scaling_efficiency": efficiency,
        "days": gpu_hours / plan.num_gpus / 24.0,
        **estimate(gpu_hours, power_w, pue=plan.pue, intensity=plan.intensity),
    }
    rows = []
    for g in scaling_gpu_counts(plan.num_gpus, plan.gpus_per_node):
        try:
            ib, roce = step(g, "ib"), step(g, "roce")
        except ValueError as e:
            rows.append({"gpus": g, "feasible": False, "refusal": str(e),
                         "tokens_per_gpu": cfg.train.global_batch_tokens / g,
                         "ib_efficiency": None, "roce_efficiency": None})
            continue
        layout = ib["layout"]
        rows.append({"gpus": g, "feasible": True, "pp": layout.pp, "tp": layout.tp,
                     "dp_shard": layout.dp_shard,
                     "dp_replicate": layout.dp_replicate,
                     "tokens_per_gpu": cfg.train.global_batch_tokens / g,
                     "state_gb_per_gpu": state_bytes(cfg.model, layout) / 1e9,
                     "node_gb_per_step": ib["node_gb_per_step"], "compute_s": ib["compute_s"],
                     "ib_comm_s": ib["fsdp_comm_s"] + ib["tp_comm_s"],
                     "ib_efficiency": ib["efficiency"],
                     "roce_comm_s": roce["fsdp_comm_s"] + roce["tp_comm_s"],
                     "roce_efficiency": roce["efficiency"]})
    out["scaling"] = rows
    out["global_batch_tokens"] = cfg.train.global_batch_tokens
    out["link_gbps"] = plan.link_gbps
    return out


def _accepted(cfg: Config, plan: Plan) -> str:
    """'; the trainer accepts --parallel.tp=N ...' for the first layout of plan.py's search at
    this GPU count that keeps the config's activation checkpointing, if any."""
    for layout in candidate_layouts(cfg, plan.num_gpus, plan.gpus_per_node):
        if layout.activation_checkpointing == cfg.parallel.activation_checkpointing:
            return (f"; the trainer accepts {layout.overrides()} (python -m llamatrain.plan "
                    "checks its memory)")
    return ""


def format_projection(p: dict[str, Any]) -> str:
    peak = f" of {p['peak_flops'] / 1e12:.0f} TFLOP/s bf16" if p["peak_flops"] else ""
    mfu = f"MFU {p['mfu']:.1%}{peak}" if p["mfu"] is not None else "MFU unknown"
    float8 = ""
    if p.get("float8", "none") != "none":
        float8 = (f"; float8 {p['float8']}: {p['compute_mfu']:.1%} of each peak, the block "
                  "linears at fp8's")
    fabric = ""
    if p["fabric"]:
        fabric = f", {FABRICS[p['fabric']].name} scaling efficiency {p['scaling_efficiency']:.1%}"
    lines = [
        f"model: {p['params'] / 1e9:.2f}B parameters, {p['flops_per_token'] / 1e9:.2f} GFLOP per "
        f"token at sequence length {p['seq_len']}",
        f"throughput: {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU ({mfu} on {p['device']}"
        f"{float8}){fabric}",
        f"{p['tokens']:.3g} tokens on {p['gpus']:,} GPUs: {p['gpu_hours']:,.0f} GPU-hours, "
        f"{p['days']:.1f} days",
        f"energy {p['energy_kwh']:,.0f} kWh ({p['power_w']:.0f} W x PUE {p['pue']:.2f}) -> "
        f"{p['tco2eq']:.2f} tCO2eq at {p['intensity_kg_per_kwh']} kg/kWh",
        "",
        f"scaling of the config's layout at a global batch of {p['global_batch_tokens']:,.0f} "
        f"tokens, {p['link_gbps']:g} Gbps per NIC (efficiency = the step's model FLOPs at this "
        "MFU / step time: communication, pipeline bubble and recomputation cost it):",
        f"{'GPUs':>6} {'pp':>3} {'tp':>3} {'shard':>6} {'tok/GPU':>8} {'state GB':>9} "
        f"{'node GB':>8} "
        f"{'compute s':>10} {'IB comm s':>10} {'IB eff':>7} {'RoCE comm s':>12} {'RoCE eff':>9}",
    ]
    for r in p["scaling"]:
        if not r["feasible"]:
            lines.append(f"{r['gpus']:>6}  infeasible: {r['refusal']}")
            continue
        lines.append(
            f"{r['gpus']:>6} {r['pp']:>3} {r['tp']:>3} {r['dp_shard']:>6} "
            f"{r['tokens_per_gpu']:>8,.0f} "
            f"{r['state_gb_per_gpu']:>9.1f} {r['node_gb_per_step']:>8.1f} {r['compute_s']:>10.3f} "
            f"{r['ib_comm_s']:>10.3f} {r['ib_efficiency']:>7.1%} {r['roce_comm_s']:>12.3f} "
            f"{r['roce_efficiency']:>9.1%}"
        )
    lines.append(
        "state GB: fp32 weights, gradients and AdamW moments per GPU (activations not included: "
        "python -m llamatrain.plan measures them); node GB: bytes each node sends over its NICs "
        "per step; infeasible: the trainer refuses the layout at that count."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, through run_cli, instead of usage + exit
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m llamatrain.carbon", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    est = sub.add_parser("estimate", help="energy and carbon of a number of GPU-hours")
    est.add_argument("--gpu-hours", type=float, required=True)
    est.add_argument("--power-w", type=float, required=True, help="watts per GPU (TDP)")
    est.add_argument("--pue", type=float, default=None, help="default: carbon.pue's default")
    est.add_argument("--intensity", type=float, default=None, metavar="KG_PER_KWH",
                     help="default: carbon.intensity_kg_per_kwh's default (0.4235, Table 2)")
    est.add_argument("--json", action="store_true")

    proj = sub.add_parser("project", help="GPU-hours, days, energy and carbon of a planned run")
    proj.add_argument("--config", required=True, help="a run config TOML (configs/*.toml)")
    proj.add_argument("--tokens", type=float, required=True)
    proj.add_argument("--gpus", type=int, required=True)
    proj.add_argument("--device", default="a100", help="a100, h100 or h200 (default a100)")
    rate = proj.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=float, help=f"default {PAPER_MFU}, Table 2's")
    rate.add_argument("--tokens-per-s-per-gpu", type=float)
    proj.add_argument("--fabric", choices=sorted(FABRICS), default=None,
                      help="charge FSDP communication on this fabric at --gpus")
    proj.add_argument("--link-gbps", type=float, default=200.0, help="per NIC (paper: 200)")
    proj.add_argument("--gpus-per-node", type=int, default=8)
    proj.add_argument("--nics-per-node", type=int, default=8, help="paper: one per GPU")
    proj.add_argument("--power-w", type=float, default=None,
                      help="watts per GPU (default: the TDP of --device; the config's "
                      "carbon.power_w describes the machine it runs on, not this one)")
    proj.add_argument("--pue", type=float, default=None)
    proj.add_argument("--intensity", type=float, default=None, metavar="KG_PER_KWH")
    proj.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    if args.command == "estimate" and overrides:
        raise ValueError(f"unrecognized arguments: {' '.join(overrides)}")
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=")[0])]
    if bad:
        raise ValueError(f"argument {bad[0]!r}: expected --section.key=value")
    if args.command == "estimate":
        result = estimate(args.gpu_hours, args.power_w, pue=args.pue, intensity=args.intensity)
        if args.json:
            print(json.dumps({k: result[k] for k in ("gpu_hours", "energy_kwh", "tco2eq")}))
        else:
            print(
                f"GPU-hours {result['gpu_hours']:,.0f} x {result['power_w']:g} W x PUE "
                f"{result['pue']:g} = {result['energy_kwh']:,.1f} kWh -> "
                f"{result['tco2eq']:.2f} tCO2eq at {result['intensity_kg_per_kwh']} kg/kWh"
            )
        return 0
    cfg = load_config(args.config, overrides)
    plan = Plan(
        config=cfg,
        tokens=args.tokens,
        num_gpus=args.gpus,
        device=args.device,
        mfu=args.mfu,
        tokens_per_s_per_gpu=args.tokens_per_s_per_gpu,
        fabric=args.fabric,
        link_gbps=args.link_gbps,
        gpus_per_node=args.gpus_per_node,
        nics_per_node=args.nics_per_node,
        power_w=args.power_w or 0.0,
        pue=cfg.carbon.pue if args.pue is None else args.pue,
        intensity=cfg.carbon.intensity_kg_per_kwh if args.intensity is None else args.intensity,
    )
    result = project(plan)
    print(json.dumps(result, indent=1) if args.json else format_projection(result))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
