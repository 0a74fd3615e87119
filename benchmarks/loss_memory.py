"""Peak memory of the training loss, fused against unfused, at Llama 2's 8,192 tokens x 32,000.

`python benchmarks/loss_memory.py [--tokens 8192] [--vocab 32000] [--dim 256] [--out FILE]`
runs forward + backward of the loss over (tokens, dim) hidden states and a (vocab, dim) output
weight, each variant in a fresh process, and reports the peak memory it added on top of its inputs:
on a GPU the allocator's peak (`torch.cuda.max_memory_allocated`), on a CPU the growth of the
process's peak resident set (`ru_maxrss`). Variants:

- `unfused-torch`: logits = hidden @ weight.T, then ops.cross_entropy_ref (PyTorch);
- `unfused-kernel`: the same logits, then llamatrain.kernels.cross_entropy;
- `fused`: llamatrain.kernels.linear_cross_entropy (chunks of tokens, no full logits).

On a CPU the kernels run through Triton's interpreter (slow, but memory is what is measured here),
in fp32; the hidden size barely matters to the loss's memory, which is dominated by tokens x vocab.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("unfused-torch", "unfused-kernel", "fused")


def _peak_bytes(device_type: str) -> int:
    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, tokens: int, vocab: int, dim: int) -> dict:
    """Forward + backward of one variant in this process; its added peak memory in bytes."""
    import torch

    from llamatrain import ops

    if variant != "unfused-torch":  # Triton only where a kernel runs
        from llamatrain import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, dim, device=device, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, dim, device=device, generator=gen) * 0.02).to(dtype)
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    # The gradients' own buffers are part of every variant's cost: allocate them up front.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(device.type) if device.type == "cuda" else _current_rss()
    start = time.perf_counter()
    if variant == "unfused-torch":
        loss = ops.cross_entropy_ref(hidden @ weight.t(), targets)
    elif variant == "unfused-kernel":
        loss = kernels.cross_entropy(hidden @ weight.t(), targets)
    else:
        loss = kernels.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"variant": variant, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "loss": loss.item(), "peak_added_bytes": _peak_bytes(device.type) - base,
            "seconds": seconds}  # fmt: skip


def _current_rss() -> int:
    """Resident set now (bytes); the peak can only be above it."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def compare(variants: list[str], tokens: int, vocab: int, dim: int,
            timeout_s: float | None = None) -> list[dict]:
    """Each variant in a fresh process, all within `timeout_s`; a variant that fails gives a row
    with its `error`: the last lines its process wrote to stderr, which is where the reason is."""
    rows = []
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    for variant in variants:
        left = None if deadline is None else max(1.0, deadline - time.perf_counter())
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--tokens", str(tokens),
                 "--vocab", str(vocab), "--dim", str(dim)],
                capture_output=True, text=True, timeout=left,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            rows.append({"variant": variant, "error": f"timed out after {left:.0f} s"})
            continue
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = done.stderr.strip().splitlines()[-3:] or [f"exit status {done.returncode}"]
            rows.append({"variant": variant, "error": " | ".join(tail)})
            continue
        rows.append(json.loads(lines[-1]))
    return rows


# `make gpu-check`: Llama 2's 8,192 tokens x 32,000 at the 7B's hidden size on the GPU; in the
# rehearsal a problem small for the interpreter whose logits (8 MiB) still stand out of the
# process's own memory noise.
SIZES = {"gpu": (8192, 32000, 4096), "rehearsal": (1024, 2048, 32)}


def section(ctx) -> dict:
    tokens, vocab, dim = SIZES["rehearsal" if ctx.rehearsal else "gpu"]
    rows = compare(list(VARIANTS), tokens, vocab, dim, timeout_s=ctx.budget_s - 3)
    for r in rows:
        ctx.progress(r)
    return {"tokens": tokens, "vocab": vocab, "dim": dim, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variants to compare (each in its own process)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.dim)))
        return 0
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            print(f"loss_memory: --variants {variant}: expected one of {', '.join(VARIANTS)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    rows = compare(variants, args.tokens, args.vocab, args.dim)
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<15} failed: {r['error']}", flush=True)
            continue
        print(f"{r['variant']:<15} peak +{r['peak_added_bytes'] / 2**20:8.0f} MiB  loss "
              f"{r['loss']:.6f}  {r['seconds']:.1f} s  ({r['device']}, {r['dtype']})", flush=True)
    if args.out:
        result = {
            "command": " ".join(sys.argv), "machine": platform.machine(),
            "cpus": os.cpu_count(), "tokens": args.tokens, "vocab": args.vocab, "dim": args.dim,
            "rows": rows,
        }  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
