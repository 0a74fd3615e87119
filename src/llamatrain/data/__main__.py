"""`python -m llamatrain.data`: clean a corpus, and prepare it into token shards, whole or in parts.

  python -m llamatrain.data clean --input PATH [PATH ...] --out DIR [--block-domains FILE]
      [--filters gopher,c4,fineweb] [--dedup exact,minhash] [--pii] ...
  python -m llamatrain.data clean ... --stage STAGE --task I/N     (launch/clean.sbatch)
  python -m llamatrain.data prepare --input PATH [PATH ...] --out DIR
      [--tokenizer MODEL | --vocab-size N] [--workers N] [--text-key KEY] ...
  python -m llamatrain.data prepare --input PATH [PATH ...] --out DIR --part I/N ...
  python -m llamatrain.data prepare --merge DIR
clean removes blocked sites, junk pages (datatrove's Gopher/C4/FineWeb filters) and duplicates
(exact and MinHash), replaces e-mail and IP addresses, and writes parquet or .jsonl shards that
prepare and data.source take as they are. The --part form tokenises share I of N of the files (an
array task of launch/prepare.sbatch); --merge then writes DIR/meta.json, after which DIR is the
same token stream as a one-process prepare of the same inputs.
"""

from __future__ import annotations

import argparse
import importlib
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
from llamatrain.data.readers import CLEAN_REPORT, STDLIB, collect_files


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


def _clean_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("clean", help="remove blocked sites, junk and duplicates (datatrove)",
                       description="Site removal, quality filters, exact and near deduplication "
                       "and PII replacement, in that order, each switchable; writes DIR/data/ "
                       "shards, DIR/clean_report.json and samples of what each step removed in "
                       "DIR/removed/. Needs pip install 'llamatrain[clean]'.")
    c.add_argument("--input", nargs="+", help=f"files, directories or {STDLIB}")
    c.add_argument("--out", type=Path, help="output directory")
    # Defaults (None here) are CleanOptions', in data/clean.py.
    c.add_argument("--text-key", help="JSON field of a .jsonl record, column of a parquet file "
                   "(default: text)")
    c.add_argument("--url-key", help="field holding a record's URL (default: url)")
    c.add_argument("--block-domains", metavar="FILE",
                   help="remove records whose URL is on one of these domains (one a line) or a "
                        "subdomain of one; records without a URL are kept and counted")
    c.add_argument("--filters", help="quality filters in order, comma-separated: gopher, c4, "
                   "fineweb; or none (default: gopher)")
    c.add_argument("--filter-param", action="append", default=[], metavar="FILTER.KEY=VALUE",
                   help="override a filter's threshold (datatrove's parameter name), e.g. "
                        "gopher.min_doc_words=30; repeatable")
    c.add_argument("--dedup", help="exact (normalised text), minhash (near duplicates), "
                   "exact,minhash (the default) or none")
    c.add_argument("--minhash-ngrams", type=int, help="words per shingle (default: FineWeb's)")
    c.add_argument("--minhash-bands", type=int, help="LSH bands (default: FineWeb's)")
    c.add_argument("--minhash-rows", type=int, help="hashes per band (default: FineWeb's)")
    c.add_argument("--pii", action="store_true", default=None,
                   help="replace e-mail and public IP addresses")
    c.add_argument("--nltk-data", metavar="DIR",
                   help="NLTK data directory with tokenizers/punkt_tab/english/ (trained "
                        "sentence splitting for the filters); default: untrained Punkt")
    c.add_argument("--output-format", choices=("parquet", "jsonl"), help="default: parquet")
    c.add_argument("--samples", type=int, help="removed documents kept per step in DIR/removed/")
    c.add_argument("--overwrite", action="store_true", help="replace a cleaned --out")
    c.add_argument("--verbose", action="store_true", help="datatrove's log on stderr too")
    c.add_argument("--stage", choices=STAGES_HELP, help="run one stage's task (--task I/N)")
    c.add_argument("--task", metavar="I/N", help="task I (0-based) of the stage's N")


# The stages of data/clean.py, here so that --help works without datatrove installed.
STAGES_HELP = ("filter", "exact", "minhash-signatures", "minhash-buckets", "minhash-cluster",
               "write", "report")


def _comma_list(text: str) -> tuple[str, ...]:
    return () if text.strip() in ("", "none") else tuple(t.strip() for t in text.split(","))


def clean_main(args: argparse.Namespace) -> int:
    """The clean subcommand: all stages in this process, or one task of one stage."""
    try:
        clean = importlib.import_module("llamatrain.data.clean")
    except ImportError as e:
        raise ValueError(f"clean needs datatrove and the packages of its filters ({e.name} is not "
                         "installed); allowed: pip install 'llamatrain[clean]'") from None
    assert tuple(clean.STAGES) == STAGES_HELP
    given = {
        "text_key": args.text_key, "url_key": args.url_key, "block_domains": args.block_domains,
        "filters": None if args.filters is None else _comma_list(args.filters),
        "filter_params": tuple(clean.parse_filter_param(p) for p in args.filter_param),
        "dedup": None if args.dedup is None else _comma_list(args.dedup),
        "minhash_ngrams": args.minhash_ngrams, "minhash_bands": args.minhash_bands,
        "minhash_rows": args.minhash_rows, "pii": args.pii, "nltk_data": args.nltk_data,
        "output_format": args.output_format, "samples": args.samples,
    }
    opts = clean.CleanOptions(**{k: v for k, v in given.items() if v is not None})
    if not args.input or args.out is None:
        raise ValueError("--input and --out: required")
    out = args.out.expanduser()
    if args.stage is None:
        if args.task:
            raise ValueError("--task I/N needs --stage")
        report = clean.clean(args.input, out, opts, overwrite=args.overwrite,
                             verbose=args.verbose)
        _print_skipped(report["in"]["skipped"], CLEAN_REPORT)
        print(clean.format_report(report, out))
        return 0
    if not args.task:
        raise ValueError(f"--stage={args.stage} needs --task I/N")
    if args.overwrite:
        raise ValueError("--overwrite: only without --stage; remove the --out of an array "
                         "yourself before submitting it again")
    task, num_tasks = parse_part(args.task, key="--task")
    if args.stage == "filter":
        clean.start(out, clean.make_plan(args.input, opts, num_tasks))
    else:
        clean.check_plan(out, clean.make_plan(args.input, opts, clean.load_plan(out)["tasks"]))
    report = clean.run_stage(out, args.stage, task, num_tasks, verbose=args.verbose)
    if report is not None:
        _print_skipped(report["in"]["skipped"], CLEAN_REPORT)
        print(clean.format_report(report, out))
    else:
        print(f"{out}: {args.stage} task {task}/{num_tasks} done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamatrain.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _clean_parser(sub)
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
    if args.command == "clean":
        try:
            return clean_main(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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


def _print_skipped(skipped: list[dict], where: str) -> None:
    for s in skipped[:20]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more (see {where})", file=sys.stderr)


def _print_summary(out: Path, meta: dict) -> None:
    bad = [s for s in meta["skipped"] if s["reason"] != EMPTY]
    _print_skipped(bad, "meta.json")
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
