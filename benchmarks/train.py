"""Training throughput, side by side: the trainer's tokens/s per device (and MFU) against a bare
PyTorch loop with the same model, batch and optimizer but no data loading, metrics or FSDP; then,
on a GPU with float8 tensor cores, the float8 row (float8_rows): bf16, tensorwise and rowwise
float8, each compiled, their tokens/s per device and loss after the same steps.

Target (issue 4): on one CPU process the trainer reaches at least 90% of the bare loop.
`python benchmarks/train.py [--config CONFIG] [--steps 20] [--float8-steps 10] [--json PATH]
[overrides]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def run_trainer(config: str, overrides: list[str], steps: int) -> tuple[Trainer, list[dict]]:
    """The trainer on `config` for `steps` steps in a temporary run directory, logging every
    step, no validation or checkpoint before the end: (the trainer, its metrics records)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*overrides, f"--run.dir={tmp}/run", f"--train.steps={steps}",
                                   f"--train.warmup_steps={min(steps - 1, 2)}",
                                   "--train.eval_interval=0", "--checkpoint.interval=100000",
                                   "--metrics.log_interval=1"])
        trainer = Trainer(cfg, init_distributed())
        try:
            trainer.train()
        finally:
            trainer.release()
        records = [r for r in read_metrics(Path(tmp) / "run/metrics.jsonl") if "loss" in r]
    return trainer, records


def float8_rows(config: str, overrides: list[str], steps: int) -> dict:
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
        trainer, records = run_trainer(config, [*overrides, "--parallel.compile=true",
                                                f"--train.float8={mode}"], steps)
        cfg = trainer.cfg
        tps = cfg.train.global_batch_tokens / statistics.median(
            r["step_time_s"] for r in records[WARMUP:]) / trainer.world.world_size
        rows.append({"float8": mode, "tokens_per_s_per_device": tps, "loss": records[-1]["loss"],
                     "mfu": mfu(tps, cfg.model, cfg.train.seq_len, trainer.device_name, "bf16")})
    for row in rows:
        row["vs_bf16"] = row["tokens_per_s_per_device"] / rows[0]["tokens_per_s_per_device"]
    return {"steps": steps, "compiled": True, "rows": rows}


def format_float8(result: dict) -> list[str]:
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
    trainer, records = run_trainer(args.config, overrides, args.steps)
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


if __name__ == "__main__":
    sys.exit(main())
