"""`python -m llamatrain.data`: prepare a corpus into token shards, whole or in parts.

  python -m llamatrain.data prepare --input PATH [PATH ...] --out DIR
      [--tokenizer MODEL | --vocab-size N] [--workers N] [--text-key KEY] ...
  python -m llamatrain.data prepare --input PATH [PATH ...] --out DIR --part I/N ...
  python -m llamatrain.data prepare --merge DIR
The --part form tokenises share I of N of the files (an array task of launch/prepare.sbatch);
--merge then writes DIR/meta.json, after which DIR is the same token stream as a one-process
prepare of the same inputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

from llamatrain.data.parts import build_part, merge, parse_part
from llamatrain.data.prepare import (
    EMPTY,
    FORMATS,
    PrepareOptions,
    build,
    publish,
)
from llamatrain.data.readers import STDLIB, collect_files


def prepare_dir(
    inputs: list[str],
    out: Path,
    opts: PrepareOptions,
    *,
    tokenizer: str = "",
    vocab_size: int = 32_000,
    overwrite: bool = False,
) -> dict:
    """Prepare inputs into out, built aside and renamed so out never looks complete too early."""
    out = out.expanduser()
    if out.exists() and not overwrite:
        if (out / "meta.json").is_file():
            raise ValueError(f"--out={str(out)!r} is already prepared; pass --overwrite to redo it")
        if not out.is_dir() or any(out.iterdir()):
            raise ValueError(f"--out={str(out)!r} exists and is not empty; pass --overwrite")
    collect_files(inputs)  # fail on missing inputs before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        meta = build(inputs, tmp, opts, tokenizer=tokenizer, vocab_size=vocab_size)
        publish(tmp, out, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamatrain.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise a corpus into token shards")
    p.add_argument("--input", nargs="+", help=f"files, directories or {STDLIB}")
    p.add_argument("--out", type=Path, help="output directory")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default="", help="existing SentencePiece model to use")
    tok.add_argument("--vocab-size", type=int, default=32_000, help="train a tokenizer this big")
    p.add_argument("--workers", type=int, default=0, help="tokenising processes; 0 = all cores")
    p.add_argument("--format", default="pretrain", choices=FORMATS)
    p.add_argument("--text-key", default="text",
                   help="JSON field of a .jsonl document, column of a parquet file")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--tokenizer-sample", type=int, default=200_000, help="lines to train on")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared --out")
    p.add_argument("--part", metavar="I/N",
                   help="tokenise share I (0-based) of N of the files into OUT/parts/ (one task "
                        "of a SLURM array); --merge OUT then completes OUT")
    p.add_argument("--merge", type=Path, metavar="DIR",
                   help="write DIR/meta.json from the finished parts of DIR")
    args = parser.parse_args(argv)
    opts = PrepareOptions(
        format=args.format,
        text_key=args.text_key,
        val_fraction=args.val_fraction,
        workers=args.workers,
        tokenizer_sample=args.tokenizer_sample,
    )
    try:
        if args.merge is not None:
            if args.input or args.part:
                raise ValueError("--merge DIR takes no --input or --part; it reads DIR/parts")
            meta = merge(args.merge.expanduser())
            _print_summary(args.merge, meta)
            return 0
        if not args.input or args.out is None:
            raise ValueError("--input and --out: required (or --merge DIR)")
        if args.part:
            part, num_parts = parse_part(args.part)
            info = build_part(args.input, args.out.expanduser(), opts, part=part,
                              num_parts=num_parts, tokenizer=args.tokenizer,
                              vocab_size=args.vocab_size)
            lo, hi = info["files"]
            print(f"{args.out}: part {part}/{num_parts}: files {lo}-{hi} of "
                  f"{info['num_files_total']}, {sum(info['num_tokens'].values()):,} tokens, "
                  f"{len(info['skipped'])} files skipped")
            return 0
        meta = prepare_dir(
            args.input,
            args.out,
            opts,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(args.out, meta)
    return 0


def _print_summary(out: Path, meta: dict) -> None:
    bad = [s for s in meta["skipped"] if s["reason"] != EMPTY]
    for s in bad[:20]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(bad) > 20:
        print(f"... and {len(bad) - 20} more (see meta.json)", file=sys.stderr)
    if len(meta["skipped"]) > len(bad):
        print(f"skipped {len(meta['skipped']) - len(bad)} empty files", file=sys.stderr)
    sp = meta["splits"]
    print(
        f"{out}: {meta['num_tokens']:,} tokens ({meta['dtype']}), {meta['num_documents']:,} "
        f"documents (train {sp['train']['num_documents']:,}, val {sp['val']['num_documents']:,}), "
        f"{len(meta['skipped'])} files skipped"
    )


if __name__ == "__main__":
    sys.exit(main())
