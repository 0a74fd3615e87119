"""The data pipeline at the paper's scale without the disk: a 2T-token mixture of three prepared
sources made of sparse shard files (233 shards of 8.6G tokens, as FACTS.md measured for one
source), weights 0.7 / 0.2 / 0.1. Opens them as the trainer does (meta.json, shard sizes, the
tokenizer against a 32,000-token model), then serves the 7B global batch (1024 x 4096 tokens) at
step 400,000 from the sampler's one-integer state, and counts the tokens each source has given.
Reading the batch touches 1024 never-written pages of sparse files, which costs what the file
system charges for holes; the order and the counts are what the mixture adds.

`python benchmarks/data_scale.py [--json PATH]`; a few seconds, a few MB of real disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from llamatrain.config import DataConfig, MixSource
from llamatrain.data.datasets import open_training_data
from llamatrain.data.tokenizer import train_tokenizer

TOKENS, WEIGHTS = 2 * 10**12, (0.7, 0.2, 0.1)
SHARD_TOKENS = 1 << 33
SEQ_LEN, BATCH, STEP = 4096, 1024, 400_000


def sparse_source(root: Path, name: str, num_tokens: int, tokenizer_model: bytes, sha: str) -> Path:
    """A prepared directory whose shards are holes: the right sizes, no data on disk."""
    out = root / name
    out.mkdir()
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    shards, left = [], num_tokens
    while left:
        n = min(left, SHARD_TOKENS)
        file = f"train_{len(shards):06d}.bin"
        os.truncate(os.open(out / file, os.O_CREAT | os.O_WRONLY), 2 * n)
        shards.append({"file": file, "num_tokens": n})
        left -= n
    meta = {"version": 1, "format": "pretrain", "dtype": "uint16", "num_tokens": num_tokens,
            "num_documents": 1, "vocab_size": 300, "bos_id": 1, "eos_id": 2, "sep_id": 3,
            "tokenizer_sha256": sha,
            "splits": {"train": {"num_tokens": num_tokens, "num_documents": 1, "shards": shards},
                       "val": {"num_tokens": 0, "num_documents": 0, "shards": []}}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the numbers here as a JSON dict")
    args = parser.parse_args(argv)
    words = ["def", "return", "value", "class", "import", "print"]
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) * 3 for i in range(6)] * 50,
                          vocab_size=300)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [sparse_source(Path(tmp), name, int(TOKENS * w), tok.model_proto, tok.sha256)
                 for name, w in zip(("web", "books", "code"), WEIGHTS, strict=True)]
        cfg = DataConfig(mix=[MixSource(source=str(p), weight=w)
                              for p, w in zip(paths, WEIGHTS, strict=True)])
        start = time.perf_counter()
        data = open_training_data(paths, cfg, seq_len=SEQ_LEN, vocab_size=32_000, seed=0)
        open_s = time.perf_counter() - start
        data.sampler.load_state_dict({"consumed": STEP * BATCH})
        start = time.perf_counter()
        indices = data.sampler.next_indices(BATCH, 0, 1)
        order_s = time.perf_counter() - start
        data.train.get_batch([0])  # imports torch
        start = time.perf_counter()
        batch = data.train.get_batch(indices)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        per_source = data.samples_per_source(data.sampler.consumed)
        count_s = time.perf_counter() - start
        num_shards = sum(len(d.stream.arrays) for d in data.train.datasets)
    results = {
        "tokens": TOKENS, "shards": num_shards, "weights": list(WEIGHTS),
        "open_s": open_s, "order_batch_at_step_400000_s": order_s,
        "read_batch_s": read_s,
        "samples_per_source_s": count_s,
        "batch_shape": list(batch["input_ids"].shape),
        "share_per_source": {k: v / sum(per_source.values()) for k, v in per_source.items()},
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"{TOKENS / 1e12:.0f}T tokens in {num_shards} sparse shards, 3 sources "
          f"{'/'.join(map(str, WEIGHTS))}: opened in {open_s:.2f} s; the 7B batch "
          f"{BATCH} x {SEQ_LEN} at step {STEP:,}: sample ids in {order_s:.3f} s, read (first "
          f"touch of holes) in {read_s:.2f} s; tokens per source "
          f"counted in {count_s * 1e3:.2f} ms; shares "
          + ", ".join(f"{k} {v:.4f}" for k, v in results["share_per_source"].items())
          + f"; max RSS {results['max_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
