"""Training throughput, side by side: the trainer's tokens/s per device (and MFU) against a bare
PyTorch loop with the same model, batch and optimizer but no data loading, metrics or FSDP; then,
on a GPU with float8 tensor cores, the float8 row (float8_rows): bf16, tensorwise and rowwise
float8, each compiled, their tokens/s per device and loss after the same steps.

Target (issue 4): on one CPU process the trainer reaches at least 90% of the bare loop.
`python benchmarks/train.py [--config CONFIG] [--steps 20] [--float8-steps 10] [--json PATH]
[overrides]`

`section(ctx, backend)` is `make gpu-check`'s training: the real Llama 2 7B (Table 1, 4,096
tokens) on the one GPU, in the layout llamatrain.plan picks for it (with too little memory, the
most layers that fit, and the report says so), through the same `run_trainer` as above, with
`kernels.backend` forced to `backend`; a tiny model on the CPU in the rehearsal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llamatrain import ops
from llamatrain.config import FLOAT8_MODES, load_config
from llamatrain.distributed.float8 import Float8
from llamatrain.distributed.parallel_dims import batch_geometry
from llamatrain.distributed.world import init_distributed
from llamatrain.flops import mfu
from llamatrain.metrics import read_metrics
from llamatrain.model import Transformer
from llamatrain.train import Trainer, build_optimizer

WARMUP = 3
# Without --config: configs/tiny.toml on a CPU; on a GPU, a 0.87B-parameter Llama 2 (GQA 16:8) in
# bf16, big enough for tokens/s and MFU to mean something, small enough for one GPU in a minute.
GPU_MODEL = [
    "--model.dim=2048", "--model.n_layers=16", "--model.n_heads=16", "--model.n_kv_heads=8",
    "--model.vocab_size=32000", "--model.max_seq_len=2048", "--train.seq_len=2048",
    "--train.micro_batch_size=4", "--train.global_batch_tokens=8192", "--train.dtype=bf16",
    "--train.lr=3e-4",
]


def bare_loop(cfg, device: torch.device, steps: int) -> list[float]:
    """Step times of the plainest possible loop: random tokens, forward, backward, AdamW."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Transformer(cfg.model).to(device=device, dtype=dtype)
    optimizer = build_optimizer(model, cfg.train, device)
    global_batch, accum = batch_geometry(cfg.train, 1)
    mbs, seq = cfg.train.micro_batch_size, cfg.train.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (accum, mbs, seq + 1), device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for micro in tokens:
            logits = model(micro[:, :-1])
            loss = ops.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten()) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def run_trainer(config: str | Path, overrides: list[str], *, steps: int, run_dir: Path
                ) -> tuple[Trainer, list[dict[str, Any]], dict[str, Any]]:
    """Train `steps` steps of `config` with `overrides` in `run_dir` through the Trainer, as
    `python -m llamatrain.train` would (no checkpoint, a metrics record every step); the
    trainer, its training records and its report.json."""
    cfg = load_config(config, [*overrides, f"--run.dir={run_dir}", f"--train.steps={steps}",
                               f"--train.warmup_steps={min(steps - 1, 2)}",
                               "--train.eval_interval=0", "--checkpoint.interval=0",
                               "--metrics.log_interval=1"])
    world = init_distributed()
    trainer = Trainer(cfg, world)
    try:
        trainer.train()
    finally:
        trainer.release()
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return trainer, records, json.loads((run_dir / "report.json").read_text())


def float8_rows(config: str | Path, overrides: list[str], steps: int) -> dict[str, Any]:
    """bf16 and torchao's float8 recipes on this GPU, each with parallel.compile (float8 is meant
    compiled; bf16 too, for a fair row): {"rows": [{float8, tokens_per_s_per_device, vs_bf16,
    loss, mfu}]}, tokens/s the median after WARMUP steps, loss the last step's; or {"skipped":
    one line} on a CPU, a GPU below sm_89 or without torchao."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU (on a CPU float8 is emulated: numerics, not speed)"}
    try:
        Float8.for_run("tensorwise", torch.device("cuda", torch.cuda.current_device()))
    except ValueError as e:
        return {"skipped": str(e)}
    rows = []
    for mode in FLOAT8_MODES:
        torch._dynamo.reset()  # each row compiles its own graphs
        with tempfile.TemporaryDirectory(prefix=f"bench-float8-{mode}-") as tmp:
            trainer, records, _ = run_trainer(
                config, [*overrides, "--parallel.compile=true", f"--train.float8={mode}"],
                steps=steps, run_dir=Path(tmp) / "run")
        cfg = trainer.cfg
        tps = cfg.train.global_batch_tokens / statistics.median(
            r["step_time_s"] for r in records[WARMUP:]) / trainer.world.world_size
        rows.append({"float8": mode, "tokens_per_s_per_device": tps, "loss": records[-1]["loss"],
                     "mfu": mfu(tps, cfg.model, cfg.train.seq_len, trainer.device_name, "bf16")})
    for row in rows:
        row["vs_bf16"] = row["tokens_per_s_per_device"] / rows[0]["tokens_per_s_per_device"]
    return {"steps": steps, "compiled": True, "rows": rows}


def format_float8(result: dict[str, Any]) -> list[str]:
    if "skipped" in result or "error" in result:
        return [f"float8: {'skipped' if 'skipped' in result else 'failed'}: "
                f"{result.get('skipped') or result['error']}"]
    lines = [f"float8 (compiled, {result['steps']} steps; MFU against the bf16 peak):"]
    for r in result["rows"]:
        name = "bf16" if r["float8"] == "none" else f"float8 {r['float8']}"
        lines.append(f"  {name:<18} {r['tokens_per_s_per_device']:12,.0f} tokens/s per device "
                     f"({r['vs_bf16']:.2f}x bf16), loss {r['loss']:.4f}, MFU {r['mfu']:.1%}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help="default: configs/tiny.toml, with a 0.87B model on a GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--float8-steps", type=int, default=10,
                        help="steps of each row of the float8 comparison (GPUs of sm_89 and up)")
    parser.add_argument("--json", type=Path)
    args, overrides = parser.parse_known_args()
    if args.config is None:
        args.config = "configs/tiny.toml"
        overrides = (GPU_MODEL if torch.cuda.is_available() else []) + overrides
    with tempfile.TemporaryDirectory() as tmp:
        trainer, records, _ = run_trainer(args.config, overrides, steps=args.steps,
                                          run_dir=Path(tmp) / "run")
    cfg, world = trainer.cfg, trainer.world
    device = world.device
    trainer_times = [r["step_time_s"] for r in records][WARMUP:]
    bare_times = bare_loop(cfg, device, args.steps)[WARMUP:]
    tokens = cfg.train.global_batch_tokens
    trainer_tps = tokens / statistics.median(trainer_times) / world.world_size
    bare_tps = tokens / statistics.median(bare_times)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {
        "device": name, "config": args.config, "params": trainer.num_params,
        "steps": args.steps, "tokens_per_step": tokens,
        "trainer_tokens_per_s_per_device": trainer_tps,
        "bare_loop_tokens_per_s": bare_tps,
        "trainer_vs_bare": trainer_tps / bare_tps,
        "mfu": mfu(trainer_tps, cfg.model, cfg.train.seq_len, name, "bf16"),
        "data_wait_s_median": statistics.median(r["data_wait_s"] for r in records),
        "steps_records": [{"step": r["step"], "loss": r["loss"],
                           "tokens_per_s": r["tokens_per_s"]} for r in records],
    }
    print(f"train ({name}, {trainer.num_params:,} params, {tokens} tokens/step):")
    print(f"  trainer    {trainer_tps:12,.0f} tokens/s per device"
          + (f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else ""))
    print(f"  bare loop  {bare_tps:12,.0f} tokens/s")
    print(f"  trainer / bare = {100 * result['trainer_vs_bare']:.1f}% (target >= 90%)")
    try:
        result["float8"] = float8_rows(args.config, overrides, args.float8_steps)
    except Exception as e:  # the row fails alone: the measurements above still count
        result["float8"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    print("\n".join(format_float8(result["float8"])))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# make gpu-check

ROOT = Path(__file__).resolve().parents[1]
# Steps (warm-up, then measured): 10-20 measured after warm-up on the GPU, seconds' worth in
# the rehearsal.
STEPS = {"gpu": (3, 10), "rehearsal": (1, 2)}
# The rehearsal's model: every code path of the section in seconds on a CPU.
REHEARSAL_MODEL = [
    "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
    "--model.vocab_size=512", "--model.multiple_of=32", "--model.max_seq_len=32",
    "--train.seq_len=32", "--train.global_batch_tokens=128",
]
# The GPU a rehearsal plans for: the one the check is made for.
REHEARSAL_GPU = "h200-141gb"
# The text trained on: a package of the interpreter's standard library, tokenised with a small
# vocabulary (seconds to prepare; the model keeps its 32,000 rows). Real text, so the loss falls.
CORPUS = "email"
CORPUS_VOCAB = 512


def prepare_corpus(tmp: Path) -> Path:
    """A prepared directory of the standard library's email package (its .py files only)."""
    from llamatrain.config import DataConfig
    from llamatrain.data.cache import prepare_source

    src = Path(sysconfig.get_paths()["stdlib"]) / CORPUS
    text = tmp / "corpus"
    for f in sorted(src.rglob("*.py")):
        dest = text / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    if not text.is_dir():
        raise ValueError(f"no .py files under {src}: the check trains on them")
    cfg = DataConfig(source=str(text), cache_dir=str(tmp / "cache"), workers=2,
                     val_fraction=0.05)
    return prepare_source(cfg, vocab_size=CORPUS_VOCAB)


def most_layers_that_fit(most: int, fits: Callable[[int], bool]) -> int:
    """The largest n in 1..most with fits(n), memory growing with n; 0 when not even 1 fits.
    A bisection: about log2(most) questions."""
    lo, hi = 0, most  # the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_layout(config: str | Path, overrides: list[str], device_key: str) -> dict[str, Any]:
    """The layout llamatrain.plan picks for `config` on one GPU of `device_key`; when no layout
    of the search fits, the most layers that do (each depth asked of the same plan at its
    leanest layout, full checkpointing and one sequence), and a note that says so."""
    from dataclasses import replace

    from llamatrain import plan

    cfg = load_config(config, overrides)
    setup = plan.Setup(num_gpus=1, gpus_per_node=1, device=device_key)
    depth, n_layers = cfg.model.n_layers, cfg.model.n_layers

    def best(c) -> dict[str, Any] | None:
        return plan.plan(c, setup, search=True)["best"]

    chosen = best(cfg)
    if chosen is None:
        lean = plan.with_layout(cfg, plan.Layout(1, 1, 1, "full", 1))

        def fits(layers: int) -> bool:
            c = replace(lean, model=replace(lean.model, n_layers=layers))
            return plan.plan(c, setup, search=False)["requested"]["fits"]

        n_layers = most_layers_that_fit(depth - 1, fits)
        if n_layers == 0:
            raise ValueError(f"not even one block of the model fits one {device_key}")
        chosen = best(replace(cfg, model=replace(cfg.model, n_layers=n_layers)))
        assert chosen is not None
    gpu = plan.gpu(device_key)
    layout = chosen["layout"]
    note = (f"all {depth} layers" if n_layers == depth else
            f"{n_layers} of the {depth} layers: the whole model fits no layout of one "
            f"{gpu.name} ({gpu.memory_gib:g} GiB, {plan.USABLE_FRACTION:.0%} planned)")
    return {"device": device_key, "n_layers": n_layers, "depth": depth,
            "overrides": chosen["overrides"].split() + [f"--model.n_layers={n_layers}"],
            "micro_batch_size": layout["micro_batch_size"],
            "planned_gib": chosen["memory"]["total"] / 2**30,
            "note": f"{note}; layout {plan.Layout(**layout).short()} (llamatrain.plan)"}


def section(ctx: Any, backend: str) -> dict[str, Any]:
    from llamatrain import hardware
    from llamatrain.flops import flops_per_token

    mode = "rehearsal" if ctx.rehearsal else "gpu"
    warmup, measured = STEPS[mode]
    if ctx.rehearsal:
        config, base = ROOT / "configs/tiny.toml", list(REHEARSAL_MODEL)
        device_key, device_name = REHEARSAL_GPU, "cpu"
    else:
        config, base = ROOT / "configs/llama2_7b.toml", []
        device_name = torch.cuda.get_device_name()
        known = hardware.from_name(device_name)
        # An unknown GPU is planned as the largest known one that its memory holds.
        memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        device_key = known.key if known else max(
            (g for g in hardware.GPUS if g.memory_gib <= memory_gib * 1.02),
            key=lambda g: g.memory_gib, default=hardware.GPUS[0]).key
    earlier = ctx.earlier("train_triton")
    layout = earlier["layout"] if earlier and earlier["layout"]["device"] == device_key \
        else fit_layout(config, base, device_key)
    seq_len = load_config(config, base).train.seq_len
    overrides = [*base, *layout["overrides"], f"--kernels.backend={backend}",
                 f"--train.global_batch_tokens={layout['micro_batch_size'] * seq_len}"]
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-train-{backend}-") as tmp:
        data = prepare_corpus(Path(tmp))
        overrides += [f"--data.source={data}", f"--data.cache_dir={tmp}/cache",
                      "--train.eval_batches=1"]
        start = time.perf_counter()
        trainer, records, report = run_trainer(config, overrides, steps=warmup + measured,
                                                run_dir=Path(tmp) / "run")
        wall_s = time.perf_counter() - start
        checkpoints = sorted(p.name for p in (Path(tmp) / "run/checkpoints").glob("step-*"))
    cfg = trainer.cfg
    times = [r["step_time_s"] for r in records]
    tokens = cfg.train.global_batch_tokens / trainer.world.world_size
    tps = tokens / statistics.median(times[warmup:])
    limits = ctx.earlier("limits")
    achieved = tps * flops_per_token(cfg.model, cfg.train.seq_len)
    return {
        "backend": backend, "kernels": report["kernels"], "kernel_choice": report["kernel_choice"],
        "layout": layout, "params": trainer.num_params, "n_layers": cfg.model.n_layers,
        "seq_len": cfg.train.seq_len, "tokens_per_step": cfg.train.global_batch_tokens,
        "steps": len(records), "warmup_steps": warmup, "tokens_per_s": tps,
        "mfu": mfu(tps, cfg.model, cfg.train.seq_len, device_name, "bf16"),
        "mfu_of_measured_matmul": achieved / (limits["matmul_tflops"] * 1e12) if limits else None,
        "peak_memory_gb": max(r["mem_gb"] for r in records),
        "first_step_s": times[0], "median_step_s": statistics.median(times[warmup:]),
        "wall_s": wall_s, "losses": [r["loss"] for r in records],
        "records": [{"step": r["step"], "loss": r["loss"], "tokens_per_s": r["tokens_per_s"],
                     "step_time_s": r["step_time_s"]} for r in records],
        "checkpoints": checkpoints,
    }


if __name__ == "__main__":
    sys.exit(main())
